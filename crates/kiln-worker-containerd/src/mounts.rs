//! Mounting what containerd's snapshotter returns (`bind` or `overlay` mounts) on the host.

use std::io;
use std::path::{Path, PathBuf};

use containerd_client::types::Mount;
use kiln_worker::Error;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mount that is unmounted when dropped (detached if busy).
#[derive(Debug)]
pub(crate) struct Mounted {
    target: PathBuf,
    active: bool,
}

impl Mounted {
    /// Unmounts now, reporting failure.
    pub fn unmount(mut self) -> Result<(), Error> {
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
    let result = match umount2(target, MntFlags::empty()) {
        Err(nix::errno::Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH),
        other => other,
    };
    result.map_err(|e| Error::Io {
        op: "unmount",
        path: target.to_path_buf(),
        source: io::Error::from(e),
    })
}

/// Flags and data of a containerd mount's options (`ro`, `rbind`, … become flags; the rest is
/// the filesystem's data string).
pub(crate) fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "private" | "rprivate" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// Mounts the single mount of a snapshot at `target` (snapshotters return exactly one for
/// `overlayfs` and `native`).
pub(crate) fn mount_all(mounts: &[Mount], target: &Path) -> Result<Mounted, Error> {
    let [m] = mounts else {
        return Err(Error::Unsupported {
            what: format!("a snapshot presented as {} mounts", mounts.len()),
        });
    };
    let (flags, data) = split_options(&m.options);
    let map = |e: nix::Error| Error::Io {
        op: "mount snapshot on",
        path: target.to_path_buf(),
        source: io::Error::from(e),
    };
    if flags.contains(MsFlags::MS_BIND) {
        mount(
            Some(Path::new(&m.source)),
            target,
            None::<&str>,
            flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
            None::<&str>,
        )
        .map_err(map)?;
        let mounted = Mounted {
            target: target.to_path_buf(),
            active: true,
        };
        if flags.contains(MsFlags::MS_RDONLY) {
            mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(map)?;
        }
        return Ok(mounted);
    }
    mount(
        Some(m.source.as_str()),
        target,
        Some(m.r#type.as_str()),
        flags,
        Some(data.as_str()),
    )
    .map_err(map)?;
    Ok(Mounted {
        target: target.to_path_buf(),
        active: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = split_options(&[
            "index=off".into(),
            "ro".into(),
            "lowerdir=/a:/b".into(),
            "rbind".into(),
        ]);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(data, "index=off,lowerdir=/a:/b");
    }
}
