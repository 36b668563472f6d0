//! Test support for kiln's integration and end-to-end tests.
//!
//! - [`Kilnd`] starts the real `kilnd` binary in a temporary root on a given
//!   address and stops it (SIGTERM, then SIGKILL) when dropped.
//! - [`cargo_bin`] finds a workspace binary next to the running test.
//! - [`run`] runs a command and captures its output as [`Output`].
//! - [`BUSYBOX`] names the base-image fixture `scripts/fixtures` pushes to
//!   the local registry.
//! - [`Registry`] starts a private `docker-registry` (optionally with TLS or
//!   auth) on a free loopback port; [`make_ca`] makes test certificates with
//!   the `openssl` CLI; [`free_port`] finds a port.
//!
//! Tests that need the outside services (containerd, the registry) expect
//! them started by `scripts/services start` (as `.ci/run` does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The base image fixture (fully qualified: a short name would normalize to
/// a public registry).
pub const BUSYBOX: &str = "127.0.0.1:5000/busybox:latest";

/// Path of a workspace binary built into the same target dir as the test.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// `ctr -n <namespace> <args…>`.
pub fn ctr(namespace: &str, args: &[&str]) -> Output {
    run(Command::new("ctr").arg("-n").arg(namespace).args(args))
}

/// A containerd namespace owned by one test: its leases, images and the namespace itself are
/// removed when the guard drops (also when the test fails).
pub struct Namespace(pub String);

impl Drop for Namespace {
    fn drop(&mut self) {
        for lease in ctr(&self.0, &["leases", "ls", "-q"]).stdout.lines() {
            let _ = ctr(&self.0, &["leases", "rm", "--sync", lease.trim()]);
        }
        for image in ctr(&self.0, &["images", "ls", "-q"]).stdout.lines() {
            let _ = ctr(&self.0, &["images", "rm", "--sync", image.trim()]);
        }
        let _ = run(Command::new("ctr").args(["namespaces", "rm", &self.0]));
    }
}

/// Captured output of a finished command.
#[derive(Debug)]
pub struct Output {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Panics with the whole output unless the command succeeded.
    pub fn success(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `command` to completion, capturing stdout and stderr.
pub fn run(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {command:?}: {e}"));
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Whether a containerd answers on the default socket.
pub fn containerd_available() -> bool {
    Path::new("/run/containerd/containerd.sock").exists()
}

/// A running `kilnd` in its own root.
#[derive(Debug)]
pub struct Kilnd {
    child: Option<Child>,
    /// The state directory (`--root`).
    pub root: PathBuf,
    /// The listen address (`unix:///…`).
    pub address: String,
    /// The daemon's log file (stderr).
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Kilnd {
    /// Starts kilnd on `address` with a fresh temporary root and the local
    /// registry marked plain-http; `extra` flags are appended. Waits until
    /// the socket accepts connections.
    pub fn start(address: &str, extra: &[&str]) -> Self {
        Self::start_with_env(address, extra, &[])
    }

    /// [`Kilnd::start`] with `env` added to the daemon's environment.
    pub fn start_with_env(address: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("kilnd-root-")
            .tempdir_in(std::env::temp_dir())
            .expect("temporary root");
        let root = tmp.path().join("root");
        let config = tmp.path().join("buildkitd.toml");
        std::fs::write(&config, "[registry.\"127.0.0.1:5000\"]\nhttp = true\n")
            .expect("write config");
        let mut daemon = Self::spawn(&root, &config, address, extra, env);
        daemon._tmp = Some(tmp);
        daemon
    }

    /// Starts kilnd with the given root and config.
    pub fn start_in(root: &Path, config: &Path, address: &str, extra: &[&str]) -> Self {
        Self::spawn(root, config, address, extra, &[])
    }

    fn spawn(
        root: &Path,
        config: &Path,
        address: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = root.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("kilnd log file");
        let mut command = Command::new(cargo_bin("kilnd"));
        command
            .arg("--root")
            .arg(root)
            .arg("--config")
            .arg(config)
            .arg("--addr")
            .arg(address)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        let child = command.spawn().expect("spawn kilnd");
        let mut daemon = Self {
            child: Some(child),
            root: root.to_path_buf(),
            address: address.to_string(),
            log,
            _tmp: None,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let socket = self.address.strip_prefix("unix://").map(PathBuf::from);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("kilnd exited early ({status}):\n{}", self.log_text());
                }
            }
            let ready = match &socket {
                Some(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
                None => true,
            };
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "kilnd did not listen in 30s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the daemon with SIGKILL (no cleanup at all, as in a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `openssl` with `args` in `dir`, panicking with its output on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    run(Command::new("openssl").current_dir(dir).args(args)).success();
}

/// A CA (`<name>-ca.pem`) and, signed by it, a certificate `<name>-<leaf>`
/// for each leaf: `(leaf, subjectAltName or None for a client cert)`.
pub fn make_ca(dir: &Path, name: &str, leaves: &[(&str, Option<&str>)]) {
    let ca_key = format!("{name}-ca-key.pem");
    let ca = format!("{name}-ca.pem");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
        ],
    );
    for (leaf, san) in leaves {
        let key = format!("{name}-{leaf}-key.pem");
        let csr = format!("{name}-{leaf}.csr");
        let cert = format!("{name}-{leaf}.pem");
        let ext = format!("{name}-{leaf}.ext");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={leaf}"),
            ],
        );
        let extensions = match san {
            Some(san) => format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".to_string(),
        };
        std::fs::write(dir.join(&ext), extensions).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` process the test started, killed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub host: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts docker-registry with its storage and config under `dir` on a free loopback port;
    /// `http_extra` is YAML under `http:` (indented two spaces, e.g. a `tls:` block), `extra`
    /// top-level YAML (e.g. an `auth:` section). Returns once the port accepts connections.
    pub fn start(dir: &Path, http_extra: &str, extra: &str) -> Self {
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n{http_extra}\
             {extra}",
            root = dir.join("data").display(),
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn docker-registry");
        let registry = Registry { child, host };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&registry.host).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }
}

/// Runs `argv` with `listener` as fd 3 and `LISTEN_PID`/`LISTEN_FDS` set
/// (via `sh -c 'exec …'`, which keeps the pid), as systemd's socket unit would.
pub fn spawn_socket_activated(
    listener: &impl std::os::fd::AsRawFd,
    argv: &[String],
    log: &Path,
) -> Child {
    let fd = listener.as_raw_fd();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"")
        .arg("sh")
        .args(argv)
        .stdin(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()));
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}
