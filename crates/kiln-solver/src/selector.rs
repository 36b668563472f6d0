//! Content checksums of what a `COPY` reads.
//!
//! A copy from the build context depends only on the paths it copies, not on
//! the whole context: editing a file the step does not read (or touching a
//! file's mtime) must keep the step cached. For a FileOp whose secondary
//! input is a local source, the solver replaces that input's cache key with
//! checksums of the copy sources inside it.

use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::checksum_dir;

/// Whether `pattern` has glob metacharacters.
fn has_wildcard(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Shell-style match of one path component (`*`, `?`, `[abc]`, `[a-z]`,
/// `[!x]`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn class(pattern: &[char], c: char) -> Option<(bool, usize)> {
        // Returns (matched, length of the class including brackets).
        let mut i = 1;
        let negate = matches!(pattern.get(1), Some('!') | Some('^'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        while i < pattern.len() {
            if pattern[i] == ']' && !first {
                return Some((matched != negate, i + 1));
            }
            first = false;
            if i + 2 < pattern.len() && pattern[i + 1] == '-' && pattern[i + 2] != ']' {
                if pattern[i] <= c && c <= pattern[i + 2] {
                    matched = true;
                }
                i += 3;
            } else {
                if pattern[i] == c {
                    matched = true;
                }
                i += 1;
            }
        }
        None
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| go(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => match (n.first(), class(p, n.first().copied().unwrap_or('\0'))) {
                (Some(_), Some((true, len))) => go(&p[len..], &n[1..]),
                (Some(_), Some((false, _))) => false,
                // An unterminated class matches a literal `[`.
                (Some('['), None) => go(&p[1..], &n[1..]),
                _ => false,
            },
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && go(&p[2..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// The clean relative form of `src` inside a root, or `None` if it would
/// leave the root (then the caller falls back to the whole input's key).
fn relative(src: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in Path::new(src).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A checksum of the entries `src` names inside `root` (a wildcard in the
/// last component matches several), or `None` when the content cannot be
/// pinned down safely — a symlink on the way, which a copy may follow —
/// and the caller must use the input's full key instead.
pub fn checksum_selector(
    root: &Path,
    src: &str,
    allow_wildcard: bool,
) -> std::io::Result<Option<String>> {
    let Some(relative) = relative(src) else {
        return Ok(None);
    };
    let (parent, last) = match (relative.parent(), relative.file_name()) {
        (Some(parent), Some(last)) => (parent.to_path_buf(), last.to_string_lossy().to_string()),
        _ => return checksum_entry(root, root).map(Some),
    };
    // No symlinks among the parents: a copy resolving through one could
    // read anywhere in the input.
    let mut walk = root.to_path_buf();
    for part in parent.components() {
        walk.push(part);
        match std::fs::symlink_metadata(&walk) {
            Ok(m) if m.file_type().is_symlink() => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(missing(src)));
            }
            Err(e) => return Err(e),
        }
    }
    let dir = root.join(&parent);
    let mut names = Vec::new();
    if allow_wildcard && has_wildcard(&last) {
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name().to_string_lossy().to_string();
                    if glob_match(&last, &name) {
                        names.push(name);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(missing(src))),
            Err(e) => return Err(e),
        }
        names.sort();
    } else {
        names.push(last);
    }
    let mut hasher = Sha256::new();
    for name in names {
        let path = dir.join(&name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => return Ok(None),
            Ok(_) => {
                hasher.update(name.as_bytes());
                hasher.update([0]);
                hasher.update(checksum_entry(root, &path)?.as_bytes());
                hasher.update([0]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                hasher.update(missing(&name).as_bytes());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

/// Per-file checksums (path relative to `root` → checksum of mode and content) of what `src`
/// selects, for explaining a miss down to the file. Directories are walked; at most `budget`
/// entries are listed in all (the budget is shared by a step's copies) — `None` when the
/// budget runs out, the selection cannot be listed, or it is not a plain path or wildcard.
/// Never part of a cache key: [`checksum_selector`] is.
pub fn file_checksums(
    root: &Path,
    src: &str,
    allow_wildcard: bool,
    budget: &mut usize,
) -> Option<std::collections::BTreeMap<String, String>> {
    let relative = relative(src)?;
    let (parent, last) = (
        relative.parent()?.to_path_buf(),
        relative.file_name()?.to_string_lossy().to_string(),
    );
    let dir = root.join(&parent);
    let names: Vec<String> = if allow_wildcard && has_wildcard(&last) {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|name| glob_match(&last, name))
            .collect();
        names.sort();
        names
    } else {
        vec![last]
    };
    let mut out = std::collections::BTreeMap::new();
    let mut pending: Vec<PathBuf> = names.iter().map(|n| parent.join(n)).collect();
    while let Some(path) = pending.pop() {
        *budget = budget.checked_sub(1)?;
        let full = root.join(&path);
        let metadata = std::fs::symlink_metadata(&full).ok()?;
        let key = path.to_string_lossy().to_string();
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&full).ok()? {
                pending.push(path.join(entry.ok()?.file_name()));
            }
        } else if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(&full).ok()?;
            out.insert(key, format!("link:{}", target.display()));
        } else {
            // Shortened: it only tells runs apart, it keys nothing.
            let mut sum = checksum_entry(root, &full).ok()?;
            sum.truncate(21);
            out.insert(key, sum);
        }
    }
    Some(out)
}

fn missing(what: &str) -> String {
    format!("missing:{what}")
}

/// Checksum of one entry: a directory's tree (without its own name), or a
/// file's mode and content.
fn checksum_entry(_root: &Path, path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.is_dir() {
        return Ok(format!(
            "dir:{:o}:{}",
            metadata.permissions().mode(),
            checksum_dir(path)?
        ));
    }
    let mut hasher = Sha256::new();
    hasher.update(metadata.permissions().mode().to_le_bytes());
    if metadata.is_file() {
        let mut file = std::fs::File::open(path)?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    Ok(format!("file:{}", hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_checksums_name_each_file_within_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("app/sub")).unwrap();
        std::fs::write(root.join("app/a.txt"), b"a").unwrap();
        std::fs::write(root.join("app/sub/b.txt"), b"b").unwrap();
        std::fs::write(root.join("other.txt"), b"o").unwrap();
        let mut budget = 100;
        let files = file_checksums(root, "app", false, &mut budget).unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            vec!["app/a.txt", "app/sub/b.txt"]
        );
        let before = files["app/a.txt"].clone();
        std::fs::write(root.join("app/a.txt"), b"changed").unwrap();
        let after = file_checksums(root, "app", false, &mut 100).unwrap();
        assert_ne!(after["app/a.txt"], before);
        assert_eq!(after["app/sub/b.txt"], files["app/sub/b.txt"]);
        let globbed = file_checksums(root, "*.txt", true, &mut 100).unwrap();
        assert_eq!(globbed.keys().collect::<Vec<_>>(), vec!["other.txt"]);
        // app, a.txt, sub, b.txt: four entries do not fit in three.
        assert!(file_checksums(root, "app", false, &mut 3).is_none());
    }

    #[test]
    fn globs() {
        for (pattern, name, expected) in [
            ("*.txt", "a.txt", true),
            ("*.txt", "a.txt.bak", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[ab]x", "bx", true),
            ("[!ab]x", "bx", false),
            ("[a-c]x", "cx", true),
            ("file", "file", true),
            ("*", "", true),
        ] {
            assert_eq!(glob_match(pattern, name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn selector_checksum_ignores_other_files_and_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("app.txt"), b"one").unwrap();
        std::fs::write(root.join("other.txt"), b"x").unwrap();
        std::fs::create_dir(root.join("src")).unwrap();
        std::fs::write(root.join("src/a.rs"), b"fn a(){}").unwrap();
        let app = checksum_selector(root, "/app.txt", true).unwrap().unwrap();
        let src = checksum_selector(root, "src", true).unwrap().unwrap();
        let glob = checksum_selector(root, "/*.rs", true).unwrap().unwrap();

        std::fs::write(root.join("other.txt"), b"changed").unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(root.join("app.txt"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(
            app,
            checksum_selector(root, "/app.txt", true).unwrap().unwrap()
        );
        assert_eq!(src, checksum_selector(root, "src", true).unwrap().unwrap());

        std::fs::write(root.join("src/a.rs"), b"fn b(){}").unwrap();
        assert_ne!(src, checksum_selector(root, "src", true).unwrap().unwrap());
        std::fs::write(root.join("b.rs"), b"new").unwrap();
        assert_ne!(
            glob,
            checksum_selector(root, "/*.rs", true).unwrap().unwrap()
        );
        std::fs::write(root.join("app.txt"), b"two").unwrap();
        assert_ne!(
            app,
            checksum_selector(root, "/app.txt", true).unwrap().unwrap()
        );
    }

    #[test]
    fn symlinks_and_escapes_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert_eq!(checksum_selector(root, "link", true).unwrap(), None);
        assert_eq!(checksum_selector(root, "link/passwd", true).unwrap(), None);
        assert_eq!(checksum_selector(root, "../x", true).unwrap(), None);
        let missing = checksum_selector(root, "nope", true).unwrap().unwrap();
        assert_ne!(
            missing,
            checksum_selector(root, "nope2", true).unwrap().unwrap()
        );
    }
}
