//! fsutil `Stat` helpers: Go `os.FileMode` bits from `st_mode`, the
//! `ComparePath` order and path validation.

use std::cmp::Ordering;
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use kiln_proto::filemode;

/// Go `os.FileMode` of a file from its (`lstat`) metadata.
pub fn go_mode(metadata: &Metadata) -> u32 {
    let st_mode = metadata.permissions().mode();
    let file_type = metadata.file_type();
    let mut mode = st_mode & filemode::PERM;
    if st_mode & libc_bits::S_ISUID != 0 {
        mode |= filemode::SETUID;
    }
    if st_mode & libc_bits::S_ISGID != 0 {
        mode |= filemode::SETGID;
    }
    if st_mode & libc_bits::S_ISVTX != 0 {
        mode |= filemode::STICKY;
    }
    if file_type.is_dir() {
        mode |= filemode::DIR;
    } else if file_type.is_symlink() {
        mode |= filemode::SYMLINK;
    } else if file_type.is_block_device() {
        mode |= filemode::DEVICE;
    } else if file_type.is_char_device() {
        mode |= filemode::DEVICE | filemode::CHAR_DEVICE;
    } else if file_type.is_fifo() {
        mode |= filemode::NAMED_PIPE;
    } else if file_type.is_socket() {
        mode |= filemode::SOCKET;
    }
    mode
}

/// `st_mode` permission bits (incl. setuid/setgid/sticky) from a Go mode.
pub fn unix_perm(go_mode: u32) -> u32 {
    let mut perm = go_mode & filemode::PERM;
    if go_mode & filemode::SETUID != 0 {
        perm |= libc_bits::S_ISUID;
    }
    if go_mode & filemode::SETGID != 0 {
        perm |= libc_bits::S_ISGID;
    }
    if go_mode & filemode::STICKY != 0 {
        perm |= libc_bits::S_ISVTX;
    }
    perm
}

/// Kind of entry a Go mode describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file (no type bits).
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Block device.
    BlockDevice,
    /// Character device.
    CharDevice,
    /// Socket (never sent).
    Socket,
}

/// The entry kind of a Go mode.
pub fn kind(go_mode: u32) -> Kind {
    if go_mode & filemode::DIR != 0 {
        Kind::Dir
    } else if go_mode & filemode::SYMLINK != 0 {
        Kind::Symlink
    } else if go_mode & filemode::DEVICE != 0 {
        if go_mode & filemode::CHAR_DEVICE != 0 {
            Kind::CharDevice
        } else {
            Kind::BlockDevice
        }
    } else if go_mode & filemode::NAMED_PIPE != 0 {
        Kind::Fifo
    } else if go_mode & filemode::SOCKET != 0 {
        Kind::Socket
    } else {
        Kind::File
    }
}

/// Modification time in Unix nanoseconds, as fsutil sends it.
pub fn mtime_nanos(metadata: &Metadata) -> i64 {
    metadata
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(metadata.mtime_nsec())
}

/// fsutil's `ComparePath`: component-wise, so `/` sorts below every other
/// byte (`a/b` < `a.b`). Depth-first pre-order with sorted siblings yields
/// exactly this order.
pub fn compare_path(a: &str, b: &str) -> Ordering {
    let key = |c: u8| if c == b'/' { 0u8 } else { c };
    a.bytes().map(key).cmp(b.bytes().map(key))
}

/// Why a path from the wire is unacceptable, or `None` if it is clean and
/// relative.
pub fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("empty path");
    }
    if path.starts_with('/') {
        return Some("absolute path");
    }
    if path.contains('\0') {
        return Some("path contains NUL");
    }
    for part in path.split('/') {
        match part {
            "" => return Some("path is not clean"),
            "." => return Some("path is not clean"),
            ".." => return Some("path escapes the destination"),
            _ => {}
        }
    }
    None
}

/// Parent of a relative path (`""` for top-level entries).
pub fn parent(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

// Mode bits spelled out to avoid a libc dependency for three constants.
mod libc_bits {
    pub const S_ISUID: u32 = 0o4000;
    pub const S_ISGID: u32 = 0o2000;
    pub const S_ISVTX: u32 = 0o1000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_path_table() {
        let cases = [
            ("a", "b", Ordering::Less),
            ("a/b", "a.b", Ordering::Less),
            ("a/b", "a-b", Ordering::Less),
            ("a", "a/b", Ordering::Less),
            ("a/z", "ab", Ordering::Less),
            ("b", "a/z", Ordering::Greater),
            ("x/y", "x/y", Ordering::Equal),
            ("A", "a", Ordering::Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_path(a, b), want, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sorted_by_compare_path_is_preorder() {
        let mut paths = vec!["a.b", "a/b", "a", "a/b/c", "a-b", "a/c", "b"];
        paths.sort_by(|a, b| compare_path(a, b));
        assert_eq!(paths, ["a", "a/b", "a/b/c", "a/c", "a-b", "a.b", "b"]);
    }

    #[test]
    fn path_problem_table() {
        let cases = [
            ("a/b", None),
            ("a", None),
            ("", Some("empty path")),
            ("/a", Some("absolute path")),
            ("a//b", Some("path is not clean")),
            ("a/./b", Some("path is not clean")),
            ("a/", Some("path is not clean")),
            ("../a", Some("path escapes the destination")),
            ("a/../b", Some("path escapes the destination")),
        ];
        for (path, want) in cases {
            assert_eq!(path_problem(path), want, "{path:?}");
        }
    }

    #[test]
    fn go_mode_bits_round_trip_permissions() {
        assert_eq!(unix_perm(filemode::SETUID | 0o755), 0o4755);
        assert_eq!(unix_perm(filemode::DIR | filemode::STICKY | 0o777), 0o1777);
        assert_eq!(kind(filemode::DIR | 0o755), Kind::Dir);
        assert_eq!(
            kind(filemode::DEVICE | filemode::CHAR_DEVICE),
            Kind::CharDevice
        );
        assert_eq!(kind(0o644), Kind::File);
        let dir = tempfile::tempdir().unwrap();
        let meta = std::fs::symlink_metadata(dir.path()).unwrap();
        assert_eq!(go_mode(&meta) & filemode::DIR, filemode::DIR);
    }
}
