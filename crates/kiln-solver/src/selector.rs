//! Content checksums of what a `COPY` reads.
//!
//! A copy from the build context depends only on the paths it copies, not on
//! the whole context: editing a file the step does not read (or touching a
//! file's mtime) must keep the step cached. For a FileOp whose secondary
//! input is a local source, the solver replaces that input's cache key with
//! checksums of the copy sources inside it.

use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::checksum_dir_with;

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
    checksum_selector_with(root, src, allow_wildcard, &mut None)
}

/// [`checksum_selector`], also recording each file it reads into `sums` (in the same walk), so
/// a miss can be explained down to the file.
pub fn checksum_selector_with(
    root: &Path,
    src: &str,
    allow_wildcard: bool,
    sums: &mut Option<&mut FileSums>,
) -> std::io::Result<Option<String>> {
    let Some(relative) = relative(src) else {
        return Ok(None);
    };
    let (parent, last) = match (relative.parent(), relative.file_name()) {
        (Some(parent), Some(last)) => (parent.to_path_buf(), last.to_string_lossy().to_string()),
        _ => return checksum_entry(root, sums).map(Some),
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
                hasher.update(checksum_entry(&path, sums)?.as_bytes());
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

/// Per-file checksums (path relative to the context root → mode and a shortened content hash,
/// or a symlink's target) gathered while selectors are hashed, for explaining a miss down to the
/// file. Never part of a cache key. At most `budget` entries: beyond it nothing is kept, and the
/// explanation names the changed directory instead.
#[derive(Debug)]
pub struct FileSums {
    root: PathBuf,
    files: std::collections::BTreeMap<String, String>,
    budget: usize,
    overflowed: bool,
}

impl FileSums {
    /// An empty record for paths under `root`, keeping at most `budget` entries.
    pub fn new(root: &Path, budget: usize) -> Self {
        Self {
            root: root.to_path_buf(),
            files: std::collections::BTreeMap::new(),
            budget,
            overflowed: false,
        }
    }

    /// Records `sum` for the entry at `path` (absolute, under the root).
    pub(crate) fn record(&mut self, path: &Path, sum: String) {
        if self.overflowed {
            return;
        }
        if self.files.len() >= self.budget {
            self.overflowed = true;
            self.files.clear();
            return;
        }
        let key = path.strip_prefix(&self.root).unwrap_or(path);
        self.files.insert(key.to_string_lossy().into_owned(), sum);
    }

    /// The recorded entries, `None` when the budget ran out.
    pub fn into_files(self) -> Option<std::collections::BTreeMap<String, String>> {
        (!self.overflowed).then_some(self.files)
    }
}

fn missing(what: &str) -> String {
    format!("missing:{what}")
}

/// Checksum of one entry: a directory's tree (without its own name), or a
/// file's mode and content; the files read are recorded into `sums`.
fn checksum_entry(path: &Path, sums: &mut Option<&mut FileSums>) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::symlink_metadata(path)?;
    let mode = metadata.permissions().mode();
    if metadata.is_dir() {
        return Ok(format!("dir:{mode:o}:{}", checksum_dir_with(path, sums)?));
    }
    let mut hasher = Sha256::new();
    hasher.update(mode.to_le_bytes());
    if metadata.is_file() {
        let mut file = std::fs::File::open(path)?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    let sum = hex::encode(hasher.finalize());
    if let Some(sums) = sums {
        sums.record(path, format!("{mode:o}:{}", &sum[..16]));
    }
    Ok(format!("file:{sum}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sums_name_each_file_within_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("app/sub")).unwrap();
        std::fs::write(root.join("app/a.txt"), b"a").unwrap();
        std::fs::write(root.join("app/sub/b.txt"), b"b").unwrap();
        std::fs::write(root.join("other.txt"), b"o").unwrap();
        let sums_of = |src: &str, wildcard: bool, budget: usize| {
            let mut sums = FileSums::new(root, budget);
            let plain = checksum_selector(root, src, wildcard).unwrap();
            let detailed =
                checksum_selector_with(root, src, wildcard, &mut Some(&mut sums)).unwrap();
            assert_eq!(plain, detailed, "recording does not change the key");
            sums.into_files()
        };
        let files = sums_of("app", false, 100).unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            vec!["app/a.txt", "app/sub/b.txt"]
        );
        std::fs::write(root.join("app/a.txt"), b"changed").unwrap();
        let after = sums_of("app", false, 100).unwrap();
        assert_ne!(after["app/a.txt"], files["app/a.txt"]);
        assert_eq!(after["app/sub/b.txt"], files["app/sub/b.txt"]);
        let globbed = sums_of("*.txt", true, 100).unwrap();
        assert_eq!(globbed.keys().collect::<Vec<_>>(), vec!["other.txt"]);
        // Two files do not fit in one.
        assert!(sums_of("app", false, 1).is_none());
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
