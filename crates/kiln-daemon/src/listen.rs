//! The root lock and the listeners (`unix://`, `tcp://`), as buildkitd
//! makes them (reference §2.5, §4.1).

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// An exclusive `flock` on `<root>/buildkitd.lock`, held for the daemon's
/// life: two daemons on one root would corrupt each other's state.
#[derive(Debug)]
pub struct RootLock {
    _file: fs::File,
    path: PathBuf,
}

impl RootLock {
    /// Creates `root` (0700) and takes the lock, failing at once if another
    /// process holds it.
    pub fn acquire(root: &Path) -> anyhow::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("failed to create root {}", root.display()))?;
        let path = root.join("buildkitd.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            bail!(
                "could not lock {}, another instance running?: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket (path kept to remove it at shutdown).
    Unix(tokio::net::UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(tokio::net::TcpListener),
}

/// Binds `address` (`unix:///path` or `tcp://host:port`).
pub fn bind(address: &str, group: Option<u32>) -> anyhow::Result<Listener> {
    if let Some(path) = address.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o770)
                .create(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("failed to remove stale socket {}", path.display()))
            }
        }
        let listener = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("failed to listen on {address}"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o660))
            .with_context(|| format!("failed to chmod {}", path.display()))?;
        if let Some(gid) = group {
            nix::unistd::chown(&path, None, Some(nix::unistd::Gid::from_raw(gid)))
                .with_context(|| format!("failed to chown {} to gid {gid}", path.display()))?;
        }
        return Ok(Listener::Unix(listener, path));
    }
    if let Some(host) = address.strip_prefix("tcp://") {
        tracing::warn!(
            address,
            "listening on tcp without TLS: anyone who can reach it can run builds"
        );
        let std_listener = std::net::TcpListener::bind(host)
            .with_context(|| format!("failed to listen on {address}"))?;
        std_listener.set_nonblocking(true)?;
        return Ok(Listener::Tcp(tokio::net::TcpListener::from_std(
            std_listener,
        )?));
    }
    let scheme = address.split("://").next().unwrap_or(address);
    bail!("address {address}: scheme {scheme}:// is not supported (use unix:// or tcp://)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_same_root_fails() {
        let dir = tempfile::tempdir().unwrap();
        let first = RootLock::acquire(dir.path()).unwrap();
        let err = RootLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another instance running?"), "{err}");
        assert!(first.path().ends_with("buildkitd.lock"));
        drop(first);
        RootLock::acquire(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn unix_socket_replaces_stale_file_with_mode_0660() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kilnd.sock");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"stale").unwrap();
        let listener = bind(&format!("unix://{}", path.display()), None).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(listener, Listener::Unix(..)));
        assert!(bind("npipe:////./pipe/x", None).is_err());
    }
}
