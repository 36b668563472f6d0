//! The root lock and the listeners (`unix://`, `tcp://`, `fd://`), as
//! buildkitd makes them (reference §2.5, §4.1), and systemd's readiness
//! notification.

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
    /// A unix socket handed over by systemd (`fd://`): its file belongs to
    /// systemd, so it is not removed at shutdown.
    InheritedUnix(tokio::net::UnixListener),
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket systemd passed to this process (`LISTEN_PID` must
/// be ours and `LISTEN_FDS` at least 1): the first one, as buildkitd's bare
/// `fd://`. The variables are not unset, so a second `fd://` would reuse the
/// descriptor; [`Config`](crate::config::Config) refuses duplicates first.
fn inherited_listener(address: &str) -> anyhow::Result<Listener> {
    if address != "fd://" {
        bail!(
            "address {address}: only a bare fd:// (the first socket systemd passes) is supported"
        );
    }
    let pid = std::env::var("LISTEN_PID").unwrap_or_default();
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        bail!("fd://: no socket was passed to this process (LISTEN_PID is {pid:?}, not {}); start kilnd from a systemd socket unit", std::process::id());
    }
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    if count.parse::<u32>().unwrap_or(0) < 1 {
        bail!("fd://: no socket was passed to this process (LISTEN_FDS is {count:?})");
    }
    let fd = LISTEN_FDS_START;
    // SAFETY: fcntl/getsockname on a descriptor systemd handed to this
    // process; a wrong descriptor fails with EBADF/ENOTSOCK, checked below.
    let (flags, family) = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let rc = libc::getsockname(fd, std::ptr::addr_of_mut!(storage).cast(), &mut len);
        (
            flags,
            if rc == 0 {
                Some(storage.ss_family as i32)
            } else {
                None
            },
        )
    };
    if flags < 0 {
        bail!(
            "fd://: descriptor {fd} is not open: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the descriptor is open and ours from here on (systemd passed it
    // for us to own); it is wrapped exactly once.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
    }
    match family {
        Some(libc::AF_UNIX) => {
            // SAFETY: see above, a unix socket owned from here on.
            let std_listener = unsafe {
                <std::os::unix::net::UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd)
            };
            std_listener.set_nonblocking(true)?;
            Ok(Listener::InheritedUnix(tokio::net::UnixListener::from_std(
                std_listener,
            )?))
        }
        Some(libc::AF_INET) | Some(libc::AF_INET6) => {
            // SAFETY: see above, a TCP socket owned from here on.
            let std_listener =
                unsafe { <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            std_listener.set_nonblocking(true)?;
            Ok(Listener::Tcp(tokio::net::TcpListener::from_std(
                std_listener,
            )?))
        }
        Some(other) => {
            bail!("fd://: descriptor {fd} is a socket of family {other}, not unix or tcp")
        }
        None => bail!(
            "fd://: descriptor {fd} is not a socket: {}",
            std::io::Error::last_os_error()
        ),
    }
}

/// Binds `address` (`unix:///path`, `tcp://host:port` or `fd://`). `tls`
/// only changes the warnings: plaintext tcp is warned about, TLS on a unix
/// socket is ignored with a warning (as buildkitd).
pub fn bind(address: &str, group: Option<u32>, tls: bool) -> anyhow::Result<Listener> {
    if address.starts_with("fd://") {
        return inherited_listener(address);
    }
    if let Some(path) = address.strip_prefix("unix://") {
        if tls {
            tracing::warn!(address, "TLS is ignored on unix sockets");
        }
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
        if !tls {
            tracing::warn!(
                address,
                "listening on tcp without TLS: anyone who can reach it can run builds"
            );
        }
        let std_listener = std::net::TcpListener::bind(host)
            .with_context(|| format!("failed to listen on {address}"))?;
        std_listener.set_nonblocking(true)?;
        return Ok(Listener::Tcp(tokio::net::TcpListener::from_std(
            std_listener,
        )?));
    }
    let scheme = address.split("://").next().unwrap_or(address);
    bail!("address {address}: scheme {scheme}:// is not supported (use unix://, tcp:// or fd://)")
}

/// Tells systemd the daemon is ready (`Type=notify`): sends `READY=1` to the
/// datagram socket named by `NOTIFY_SOCKET` (a path, or `@name` in the
/// abstract namespace). Nothing to do without the variable.
pub fn notify_ready() -> anyhow::Result<()> {
    notify("READY=1")
}

/// Tells systemd the daemon is stopping (`STOPPING=1`).
pub fn notify_stopping() -> anyhow::Result<()> {
    notify("STOPPING=1")
}

fn notify(state: &str) -> anyhow::Result<()> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sender = std::os::unix::net::UnixDatagram::unbound()
        .context("failed to create the notify socket")?;
    let bytes = socket.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)
            .context("invalid abstract NOTIFY_SOCKET")?;
        sender.send_to_addr(state.as_bytes(), &addr)
    } else {
        sender.send_to(state.as_bytes(), Path::new(&socket))
    };
    result.with_context(|| format!("failed to notify systemd at {}", socket.to_string_lossy()))?;
    Ok(())
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
        let listener = bind(&format!("unix://{}", path.display()), None, false).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(listener, Listener::Unix(..)));
        assert!(bind("npipe:////./pipe/x", None, false).is_err());
        let err = bind("fd://", None, false).unwrap_err().to_string();
        assert!(err.contains("no socket was passed"), "{err}");
        assert!(bind("fd://4", None, false).is_err());
    }
}
