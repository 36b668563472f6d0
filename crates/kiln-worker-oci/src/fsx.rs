//! Filesystem helpers: path resolution confined to a root, tree copies that keep metadata.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use kiln_worker::Error;
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};

/// Maps an `io::Error` to [`Error::Io`] with the operation and path.
pub(crate) fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

const MAX_SYMLINKS: usize = 255;

/// Resolves `path` (absolute or relative, interpreted from `/` of the tree) inside `root`, following
/// symlinks as if `root` were `/`: absolute link targets restart at `root`, `..` never climbs above
/// it. The final component is followed only when `follow_final` is set. Components that do not
/// exist are appended as written, so the result can be created.
pub(crate) fn resolve_in_root(root: &Path, path: &str, follow_final: bool) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = components_of(Path::new(path));
    pending.reverse();
    let mut current = PathBuf::new();
    let mut links = 0;
    while let Some(component) = pending.pop() {
        if component == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&component);
        let is_last = pending.is_empty();
        let full = root.join(&candidate);
        match fs::symlink_metadata(&full) {
            Ok(meta) if meta.file_type().is_symlink() && (!is_last || follow_final) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving {path}"
                    )));
                }
                let target = fs::read_link(&full)?;
                if target.is_absolute() {
                    current = PathBuf::new();
                }
                let mut more = components_of(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => current = candidate,
        }
    }
    Ok(root.join(current))
}

/// The normal and `..` components of `path` (root and `.` dropped).
fn components_of(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// Sets access and modification time of `path` (not following a final symlink).
pub(crate) fn set_mtime(path: &Path, secs: i64, nanos: i64) -> io::Result<()> {
    let ts = TimeSpec::new(secs, nanos);
    utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Changes the owner of `path` (not following a final symlink).
pub(crate) fn lchown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    nix::unistd::fchownat(
        None,
        path,
        uid.map(Uid::from_raw),
        gid.map(Gid::from_raw),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

/// How [`copy_tree`] treats metadata.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CopyOptions {
    /// Owner for every copied entry instead of the source's.
    pub uid: Option<u32>,
    /// Group for every copied entry instead of the source's.
    pub gid: Option<u32>,
    /// Permission bits for every copied entry instead of the source's.
    pub mode: Option<u32>,
    /// Modification time (seconds, nanoseconds) for every copied entry instead of the source's.
    pub mtime: Option<(i64, i64)>,
}

/// The copies made so far of regular files with more than one name, by the source's (device,
/// inode): a later name of the same file becomes a hard link to the first copy instead of a
/// second, independent file (as BuildKit's copy and overlayfs' lower layers keep them).
#[derive(Debug, Default)]
pub(crate) struct HardLinks {
    copied: HashMap<(u64, u64), PathBuf>,
}

impl HardLinks {
    /// Links `dst` to the earlier copy of the file `meta` describes, if there is one; `false`
    /// when `dst` must be copied (first name, or the earlier copy is gone).
    fn link_earlier(&self, meta: &fs::Metadata, dst: &Path) -> bool {
        if meta.nlink() < 2 {
            return false;
        }
        match self.copied.get(&(meta.dev(), meta.ino())) {
            Some(first) => fs::hard_link(first, dst).is_ok(),
            None => false,
        }
    }

    fn remember(&mut self, meta: &fs::Metadata, dst: &Path) {
        if meta.nlink() > 1 {
            self.copied
                .entry((meta.dev(), meta.ino()))
                .or_insert_with(|| dst.to_path_buf());
        }
    }
}

/// Copies `src` (file, dir, symlink, device, fifo; never following a symlink at `src`) to `dst`,
/// keeping mode, owner, mtime and xattrs unless overridden, and hard links inside `src` as hard
/// links. An existing non-directory at `dst` is replaced; an existing directory is merged into.
pub(crate) fn copy_tree(src: &Path, dst: &Path, opts: &CopyOptions) -> io::Result<()> {
    copy_tree_linking(src, dst, opts, &mut HardLinks::default())
}

/// [`copy_tree`] with the hard-link memory shared across several calls (the entries of one
/// layer copied one by one).
pub(crate) fn copy_tree_linking(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    links: &mut HardLinks,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    let mut keep_existing = false;
    if ft.is_dir() {
        match fs::symlink_metadata(dst) {
            // An existing directory is merged into and keeps its own metadata.
            Ok(existing) if existing.is_dir() => keep_existing = true,
            Ok(_) => {
                fs::remove_file(dst)?;
                fs::create_dir(dst)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(dst)?,
            Err(e) => return Err(e),
        }
        let mut names: Vec<OsString> = fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            copy_tree_linking(&src.join(&name), &dst.join(&name), opts, links)?;
        }
    } else {
        match fs::symlink_metadata(dst) {
            Ok(existing) if existing.is_dir() => fs::remove_dir_all(dst)?,
            Ok(_) => fs::remove_file(dst)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
        } else if ft.is_file() {
            if links.link_earlier(&meta, dst) {
                // Same inode as the earlier copy: its metadata is already set.
                return Ok(());
            }
            fs::copy(src, dst)?;
        } else {
            let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
            mknod(
                dst,
                kind,
                Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(io::Error::from)?;
        }
    }
    if keep_existing {
        return Ok(());
    }
    copy_metadata(src, dst, &meta, opts)?;
    if ft.is_file() {
        links.remember(&meta, dst);
    }
    Ok(())
}

/// Gives `dst` the xattrs, owner, mode and mtime of `src` (whose metadata is `meta`), unless
/// overridden by `opts`; the tail of [`copy_tree`] for one entry.
pub(crate) fn copy_metadata(
    src: &Path,
    dst: &Path,
    meta: &fs::Metadata,
    opts: &CopyOptions,
) -> io::Result<()> {
    let ft = meta.file_type();
    copy_xattrs(src, dst);
    lchown(
        dst,
        Some(opts.uid.unwrap_or(meta.uid())),
        Some(opts.gid.unwrap_or(meta.gid())),
    )?;
    if !ft.is_symlink() {
        // After chown: chown clears setuid/setgid bits.
        let mode = opts.mode.unwrap_or(meta.mode() & 0o7777);
        fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    }
    let (secs, nanos) = opts.mtime.unwrap_or((meta.mtime(), meta.mtime_nsec()));
    set_mtime(dst, secs, nanos)
}

/// Copies extended attributes except overlayfs' own (`trusted.overlay.*`, and `user.overlay.*`
/// of `userxattr` mounts); failures are logged, not fatal (the target filesystem may not
/// support a namespace).
fn copy_xattrs(src: &Path, dst: &Path) {
    let Ok(names) = xattr::list(src) else { return };
    for name in names {
        let bytes = name.as_bytes();
        if bytes.starts_with(b"trusted.overlay.") || bytes.starts_with(b"user.overlay.") {
            continue;
        }
        if let Ok(Some(value)) = xattr::get(src, &name) {
            if let Err(e) = xattr::set(dst, &name, &value) {
                tracing::debug!(path = %dst.display(), ?name, error = %e, "xattr not copied");
            }
        }
    }
}

/// Creates `dir` and its missing parents with `mode` and owner, returning the ones created
/// (outermost first).
pub(crate) fn mkdir_all(
    dir: &Path,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(p) = cursor {
        match fs::symlink_metadata(p) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", p.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(p.to_path_buf()),
            Err(e) => return Err(e),
        }
        cursor = p.parent();
    }
    missing.reverse();
    for p in &missing {
        fs::create_dir(p)?;
        fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
        if uid.is_some() || gid.is_some() {
            lchown(p, uid, gid)?;
        }
    }
    Ok(missing)
}

/// Whether `name` contains glob metacharacters.
pub(crate) fn has_glob(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// Shell-style matching of one path component: `*`, `?`, `[...]` (with `!`/`^` negation and
/// ranges) and `\` escapes, as Go's `filepath.Match`.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // Returns (matched, consumed) for a class starting after '['.
        let mut i = 0;
        let negate = matches!(p.first(), Some('!') | Some('^'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        while i < p.len() {
            if p[i] == ']' && !first {
                return Some((matched != negate, i + 1));
            }
            first = false;
            let mut lo = p[i];
            if lo == '\\' && i + 1 < p.len() {
                i += 1;
                lo = p[i];
            }
            let mut hi = lo;
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                hi = p[i + 2];
                if hi == '\\' && i + 3 < p.len() {
                    hi = p[i + 3];
                    i += 1;
                }
                i += 2;
            }
            if lo <= c && c <= hi {
                matched = true;
            }
            i += 1;
        }
        None
    }
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| go(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => match n.first() {
                Some(&c) => match class(&p[1..], c) {
                    Some((true, used)) => go(&p[1 + used..], &n[1..]),
                    _ => false,
                },
                None => false,
            },
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && go(&p[2..], &n[1..]),
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolve_stays_inside_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        symlink("/etc", r.join("abs")).unwrap();
        symlink("../../../../..", r.join("a/up")).unwrap();
        symlink("b", r.join("a/rel")).unwrap();
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/abs/passwd", true).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(r, "a/up/x", true).unwrap(), r.join("x"));
        assert_eq!(resolve_in_root(r, "/../../x", true).unwrap(), r.join("x"));
        assert_eq!(
            resolve_in_root(r, "a/rel/f", true).unwrap(),
            r.join("a/b/f")
        );
        assert_eq!(resolve_in_root(r, "a/rel", false).unwrap(), r.join("a/rel"));
        assert_eq!(resolve_in_root(r, "a/rel", true).unwrap(), r.join("a/b"));
        assert_eq!(resolve_in_root(r, "/", true).unwrap(), r.to_path_buf());
        assert!(resolve_in_root(r, "loop/x", true).is_err());
    }

    #[test]
    fn glob_matches_like_go() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("f?o", "foo"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[!a-c]x", "bx"));
        assert!(glob_match("\\*", "*"));
        assert!(!glob_match("\\*", "a"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn copy_tree_keeps_metadata_and_overrides() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = src.path().join("d");
        fs::create_dir(&s).unwrap();
        fs::write(s.join("f"), b"data").unwrap();
        fs::set_permissions(s.join("f"), fs::Permissions::from_mode(0o751)).unwrap();
        set_mtime(&s.join("f"), 1_000_000, 0).unwrap();
        symlink("f", s.join("l")).unwrap();
        let d = dst.path().join("d");
        copy_tree(&s, &d, &CopyOptions::default()).unwrap();
        let meta = fs::metadata(d.join("f")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o751);
        assert_eq!(meta.mtime(), 1_000_000);
        assert_eq!(fs::read_link(d.join("l")).unwrap(), Path::new("f"));

        let d2 = dst.path().join("d2");
        copy_tree(
            &s,
            &d2,
            &CopyOptions {
                uid: Some(1234),
                gid: Some(5678),
                mode: Some(0o640),
                mtime: Some((42, 0)),
            },
        )
        .unwrap();
        let meta = fs::metadata(d2.join("f")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1234, 5678, 0o640)
        );
        assert_eq!(meta.mtime(), 42);
    }

    #[test]
    fn mkdir_all_reports_created_dirs() {
        let root = tempfile::tempdir().unwrap();
        let created = mkdir_all(&root.path().join("a/b/c"), 0o700, None, None).unwrap();
        assert_eq!(created.len(), 3);
        assert_eq!(
            fs::metadata(root.path().join("a/b")).unwrap().mode() & 0o777,
            0o700
        );
        assert!(mkdir_all(&root.path().join("a/b"), 0o755, None, None)
            .unwrap()
            .is_empty());
    }
}
