//! overlayfs and bind mounts with guaranteed unmounting.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_worker::Error;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mount that is unmounted when dropped (lazily if it is busy).
#[derive(Debug)]
pub(crate) struct Mounted {
    target: PathBuf,
    active: bool,
}

impl Mounted {
    /// Unmounts now, reporting failure.
    pub(crate) fn unmount(mut self) -> Result<(), Error> {
        self.active = false;
        unmount(&self.target)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = unmount(&self.target) {
                tracing::warn!(target = %self.target.display(), error = %e, "failed to unmount");
            }
        }
    }
}

fn unmount(target: &Path) -> Result<(), Error> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            tracing::debug!(target = %target.display(), "mount busy, detaching");
            umount2(target, MntFlags::MNT_DETACH).map_err(|e| Error::Io {
                op: "unmount",
                path: target.to_path_buf(),
                source: io::Error::from(e),
            })
        }
        Err(e) => Err(Error::Io {
            op: "unmount",
            path: target.to_path_buf(),
            source: io::Error::from(e),
        }),
    }
}

/// The overlay mount options for `lowers` (top first) and an optional `(upper, work)` pair;
/// `userxattr` keeps overlayfs' attributes in `user.overlay.*` (needed in a user namespace).
pub(crate) fn overlay_options(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    userxattr: bool,
) -> Vec<u8> {
    let mut opts = b"lowerdir=".to_vec();
    for (i, lower) in lowers.iter().enumerate() {
        if i > 0 {
            opts.push(b':');
        }
        opts.extend_from_slice(&escape(lower.as_os_str()));
    }
    if let Some((upper, work)) = upper {
        opts.extend_from_slice(b",upperdir=");
        opts.extend_from_slice(&escape(upper.as_os_str()));
        opts.extend_from_slice(b",workdir=");
        opts.extend_from_slice(&escape(work.as_os_str()));
    }
    if userxattr {
        opts.extend_from_slice(b",userxattr");
    }
    if index_enabled() {
        // With index=on a lower can be used by only one mount at a time; snapshots are shared.
        opts.extend_from_slice(b",index=off");
    }
    opts
}

/// Overlay option values cannot hold `,` or `:` unescaped.
fn escape(path: &OsStr) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in path.as_bytes() {
        if b == b',' || b == b':' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

fn index_enabled() -> bool {
    std::fs::read_to_string("/sys/module/overlay/parameters/index")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false)
}

/// Mounts an overlay of `lowers` (top first, at least one) at `target`, writable through
/// `(upper, work)` when given. With one lower and no upper a read-only bind mount is used (overlay
/// needs two lowers without an upper). `userxattr` as in [`overlay_options`].
pub(crate) fn mount_overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    userxattr: bool,
) -> Result<Mounted, Error> {
    if upper.is_none() && lowers.len() == 1 {
        return bind(&lowers[0], target, true);
    }
    let opts = overlay_options(lowers, upper, userxattr);
    let page = 4096;
    if opts.len() >= page {
        return Err(Error::Unsupported {
            what: format!(
                "an overlay of {} layers (mount options of {} bytes exceed a page)",
                lowers.len(),
                opts.len()
            ),
        });
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_slice()),
    )
    .map_err(|e| Error::Io {
        op: "mount overlay on",
        path: target.to_path_buf(),
        source: io::Error::from(e),
    })?;
    Ok(Mounted {
        target: target.to_path_buf(),
        active: true,
    })
}

/// Bind-mounts `source` at `target`, read-only when asked.
pub(crate) fn bind(source: &Path, target: &Path, readonly: bool) -> Result<Mounted, Error> {
    let map = |e: nix::Error| Error::Io {
        op: "bind mount",
        path: source.to_path_buf(),
        source: io::Error::from(e),
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(map)?;
    let mounted = Mounted {
        target: target.to_path_buf(),
        active: true,
    };
    if readonly {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(map)?;
    }
    Ok(mounted)
}

/// Mounts a fresh tmpfs at `target` with `options` (`mode=0700,size=…`), never executable,
/// no devices, no setuid: memory only, so what is written there never reaches a disk.
pub(crate) fn tmpfs(target: &Path, options: &str) -> Result<Mounted, Error> {
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(options),
    )
    .map_err(|e| Error::Io {
        op: "mount tmpfs on",
        path: target.to_path_buf(),
        source: io::Error::from(e),
    })?;
    Ok(Mounted {
        target: target.to_path_buf(),
        active: true,
    })
}

/// Mount points at or under `dir` according to `/proc/self/mountinfo`, deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount under `dir` (crash leftovers).
pub(crate) fn unmount_all_under(dir: &Path) {
    for target in mounts_under(dir) {
        tracing::info!(target = %target.display(), "unmounting leftover mount");
        if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
            tracing::warn!(target = %target.display(), error = %e, "failed to unmount leftover");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_separators() {
        let opts = overlay_options(
            &[PathBuf::from("/a:b"), PathBuf::from("/c")],
            Some((Path::new("/u,p"), Path::new("/w"))),
            true,
        );
        let opts = String::from_utf8(opts).unwrap();
        assert!(opts.starts_with("lowerdir=/a\\:b:/c,upperdir=/u\\,p,workdir=/w,userxattr"));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
