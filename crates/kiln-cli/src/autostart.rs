//! Zero set-up: when discovery finds no build daemon, `kiln build` starts
//! `kilnd` with the OCI worker on the default socket for this user, detached
//! (its own session, stdin/stdout to /dev/null, stderr to `<root>/kilnd.log`,
//! pid in `<root>/kilnd.pid`), and waits until it answers `ListWorkers`.
//!
//! Only as root: a rootless daemon needs RootlessKit, so for other users the
//! error names the exact command to run instead. Tests move the daemon with
//! `KILN_DAEMON_ROOT` and `KILN_DAEMON_ADDRESS`. The daemon gets no
//! `--config`: it reads /etc/buildkit/buildkitd.toml if present, as usual.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::discovery::DiscoveryEnv;

/// How long to wait for the started daemon to answer `ListWorkers`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Rootful default socket.
pub const ROOTFUL_ADDRESS: &str = "unix:///run/buildkit/buildkitd.sock";
/// Rootful default state directory.
pub const ROOTFUL_ROOT: &str = "/var/lib/buildkit";

/// Where the daemon is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Listening address (`unix://...`).
    pub address: String,
    /// State directory (`--root`); holds `kilnd.log` and `kilnd.pid`.
    pub root: PathBuf,
}

impl Location {
    /// `<root>/kilnd.log`.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("kilnd.log")
    }

    /// `<root>/kilnd.pid`.
    pub fn pid_path(&self) -> PathBuf {
        self.root.join("kilnd.pid")
    }
}

/// Failures to start a daemon.
#[derive(Debug, thiserror::Error)]
pub enum AutostartError {
    /// Not root: a rootless kilnd needs RootlessKit, which kiln does not drive.
    #[error("no build daemon is running and kiln starts one only as root (rootless needs RootlessKit); start it with: {command}")]
    Rootless {
        /// The command to run.
        command: String,
    },
    /// `kilnd` is neither next to `kiln` nor in PATH.
    #[error("no build daemon is running and kilnd was found neither next to kiln ({beside}) nor in PATH")]
    BinaryNotFound {
        /// Where it was looked for next to kiln.
        beside: String,
    },
    /// Filesystem preparation (state dir, log, pid file) failed.
    #[error("failed to prepare {path} for kilnd")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Spawning failed.
    #[error("failed to start {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon exited before answering.
    #[error("kilnd exited ({status}) before answering on {address}; last lines of {log}:\n{tail}")]
    Exited {
        /// Exit status.
        status: String,
        /// The address.
        address: String,
        /// The log file.
        log: String,
        /// Its last lines.
        tail: String,
    },
    /// The daemon did not answer in time (it was killed).
    #[error("kilnd did not answer on {address} within {}s (stopped it); last lines of {log}:\n{tail}", START_TIMEOUT.as_secs())]
    Timeout {
        /// The address.
        address: String,
        /// The log file.
        log: String,
        /// Its last lines.
        tail: String,
    },
}

/// The location for this user: rootful default, overridden by
/// `KILN_DAEMON_ADDRESS` / `KILN_DAEMON_ROOT`; rootless is an error naming
/// the command to run.
pub fn location(
    env: &DiscoveryEnv,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Location, AutostartError> {
    let set = |key: &str| var(key).filter(|v| !v.is_empty());
    if env.is_rootless() {
        let runtime = env
            .runtime_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "$XDG_RUNTIME_DIR".to_string());
        let address = set("KILN_DAEMON_ADDRESS")
            .unwrap_or_else(|| format!("unix://{runtime}/buildkit/buildkitd.sock"));
        let root =
            set("KILN_DAEMON_ROOT").unwrap_or_else(|| "$HOME/.local/share/buildkit".to_string());
        return Err(AutostartError::Rootless {
            command: format!(
                "rootlesskit --net=slirp4netns --copy-up=/etc --disable-host-loopback kilnd {}",
                daemon_args(&address, Path::new(&root)).join(" ")
            ),
        });
    }
    Ok(Location {
        address: set("KILN_DAEMON_ADDRESS").unwrap_or_else(|| ROOTFUL_ADDRESS.to_string()),
        root: PathBuf::from(set("KILN_DAEMON_ROOT").unwrap_or_else(|| ROOTFUL_ROOT.to_string())),
    })
}

/// kilnd's arguments: the OCI worker only, on `address`, state in `root`.
pub fn daemon_args(address: &str, root: &Path) -> Vec<String> {
    vec![
        "--oci-worker=true".to_string(),
        "--containerd-worker=false".to_string(),
        format!("--root={}", root.display()),
        format!("--addr={address}"),
    ]
}

/// `kilnd` next to the running `kiln`, else the first in PATH.
pub fn find_kilnd() -> Result<PathBuf, AutostartError> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("kilnd")));
    if let Some(path) = beside.as_ref().filter(|p| is_executable(p)) {
        return Ok(path.clone());
    }
    let in_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("kilnd"))
            .find(|p| is_executable(p))
    });
    in_path.ok_or_else(|| AutostartError::BinaryNotFound {
        beside: beside
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unknown".to_string()),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The last `lines` lines of the file (empty if unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts `binary` at `location` detached and waits until it answers
/// `ListWorkers` (at most [`START_TIMEOUT`]). Returns the daemon's pid.
pub async fn start(binary: &Path, location: &Location) -> Result<u32, AutostartError> {
    let prepare = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AutostartError::Prepare { path, source }
    };
    std::fs::create_dir_all(&location.root).map_err(prepare(&location.root))?;
    let log_path = location.log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(prepare(&log_path))?;
    let mut command = Command::new(binary);
    command
        .args(daemon_args(&location.address, &location.root))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|source| AutostartError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    let pid = child.id();
    tracing::debug!(pid, address = location.address, "started kilnd");
    let pid_path = location.pid_path();
    std::fs::write(&pid_path, format!("{pid}\n")).map_err(prepare(&pid_path))?;

    let log_name = log_path.display().to_string();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(AutostartError::Exited {
                status: status.to_string(),
                address: location.address.clone(),
                log: log_name,
                tail: tail(&log_path, 20),
            });
        }
        if kiln_client::ping_address(&location.address, Duration::from_secs(1))
            .await
            .is_ok()
        {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(AutostartError::Timeout {
                address: location.address.clone(),
                log: log_name,
                tail: tail(&log_path, 20),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one line printed on stderr once the daemon answers.
pub fn started_message(location: &Location) -> String {
    format!(
        "kiln: no build daemon was running; started kilnd (OCI worker) on {}, log: {}",
        location.address,
        location.log_path().display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_vars(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn rootful_default_and_overrides() {
        let env = DiscoveryEnv::default();
        let loc = location(&env, &no_vars).unwrap();
        assert_eq!(loc.address, "unix:///run/buildkit/buildkitd.sock");
        assert_eq!(loc.root, Path::new("/var/lib/buildkit"));
        assert_eq!(loc.log_path(), Path::new("/var/lib/buildkit/kilnd.log"));
        let vars = |k: &str| match k {
            "KILN_DAEMON_ADDRESS" => Some("unix:///tmp/x/k.sock".to_string()),
            "KILN_DAEMON_ROOT" => Some("/tmp/x".to_string()),
            _ => None,
        };
        let loc = location(&env, &vars).unwrap();
        assert_eq!(loc.address, "unix:///tmp/x/k.sock");
        assert_eq!(loc.pid_path(), Path::new("/tmp/x/kilnd.pid"));
        assert_eq!(
            started_message(&loc),
            "kiln: no build daemon was running; started kilnd (OCI worker) on unix:///tmp/x/k.sock, log: /tmp/x/kilnd.log"
        );
    }

    #[test]
    fn rootless_prints_the_command() {
        let env = DiscoveryEnv {
            euid: 1000,
            xdg_runtime_dir: Some("/run/user/1000".into()),
            ..DiscoveryEnv::default()
        };
        let err = location(&env, &no_vars).unwrap_err().to_string();
        assert!(err.contains("only as root"), "{err}");
        assert!(
            err.ends_with(
                "start it with: rootlesskit --net=slirp4netns --copy-up=/etc --disable-host-loopback kilnd \
                 --oci-worker=true --containerd-worker=false --root=$HOME/.local/share/buildkit \
                 --addr=unix:///run/user/1000/buildkit/buildkitd.sock"
            ),
            "{err}"
        );
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&path, 2), "b\nc");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }

    #[tokio::test]
    async fn exit_before_answering_reports_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-kilnd");
        std::fs::write(&script, "#!/bin/sh\necho \"bad flag $1\" >&2\nexit 3\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let loc = Location {
            address: format!("unix://{}/k.sock", dir.path().display()),
            root: dir.path().join("root"),
        };
        let err = start(&script, &loc).await.unwrap_err().to_string();
        assert!(err.contains("exited (exit status: 3)"), "{err}");
        assert!(err.ends_with("bad flag --oci-worker=true"), "{err}");
        assert!(loc.pid_path().exists());
    }
}
