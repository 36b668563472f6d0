//! Zero set-up: `kiln build` with no daemon anywhere starts kilnd itself
//! (moved to a temporary socket and root with `KILN_DAEMON_ADDRESS` /
//! `KILN_DAEMON_ROOT`), says so in one line, and builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Stops the daemon named by `<root>/kilnd.pid` when dropped.
struct StopDaemon(PathBuf);

impl Drop for StopDaemon {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        let pid = Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while kill(pid, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if kill(pid, None).is_ok() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

#[test]
fn build_starts_kilnd_when_none_runs() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: kiln starts a daemon only as root");
        return;
    }
    let namespace = format!("kiltest{}", std::process::id());
    let present: Vec<String> = [
        format!("/run/buildkit-{namespace}/buildkitd.sock"),
        "/run/buildkit-default/buildkitd.sock".to_string(),
        "/run/buildkit/buildkitd.sock".to_string(),
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    if !present.is_empty() {
        eprintln!("skipping: a build daemon socket exists on this machine: {present:?}");
        return;
    }
    let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    let kilnd = kiln.with_file_name("kilnd");
    assert!(
        kilnd.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first",
        kilnd.display()
    );

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let address = format!("unix://{}/k.sock", tmp.path().display());
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM 127.0.0.1:5000/busybox:latest\nRUN echo started > /hello\n",
    )
    .unwrap();
    let tar = tmp.path().join("x.tar");
    let _stop = StopDaemon(root.join("kilnd.pid"));

    let out = Command::new(&kiln)
        .args(["build", "--namespace", &namespace, "--progress=plain", "-o"])
        .arg(format!("type=docker,dest={}", tar.display()))
        .arg(&ctx)
        .env_remove("BUILDKIT_HOST")
        .env_remove("KILN_NO_START_DAEMON")
        .env_remove("CONTAINERD_NAMESPACE")
        .env("KILN_DAEMON_ROOT", &root)
        .env("KILN_DAEMON_ADDRESS", &address)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");

    let expected = format!(
        "kiln: no build daemon was running; started kilnd (OCI worker) on {address}, log: {}",
        root.join("kilnd.log").display()
    );
    let mentions: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("no build daemon was running"))
        .collect();
    assert_eq!(mentions, vec![expected.as_str()], "stderr: {stderr}");

    let size = std::fs::metadata(&tar).unwrap().len();
    assert!(size > 0, "{} is empty", tar.display());

    // The daemon is detached and still serving after kiln exited.
    let pid: i32 = std::fs::read_to_string(root.join("kilnd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        kill(Pid::from_raw(pid), None).is_ok(),
        "kilnd {pid} is gone"
    );
    let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).unwrap();
    assert_eq!(sid.as_raw(), pid, "kilnd leads its own session");
    assert!(root.join("kilnd.log").exists());

    // With the switch off, the same situation is the discovery error.
    let out = Command::new(&kiln)
        .args(["build", "--namespace", &namespace, "--no-start-daemon"])
        .arg(&ctx)
        .env_remove("BUILDKIT_HOST")
        .env("KILN_DAEMON_ROOT", tmp.path().join("other"))
        .env(
            "KILN_DAEMON_ADDRESS",
            format!("unix://{}/o.sock", tmp.path().display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("no buildkit host is available"), "{stderr}");
    assert!(!tmp.path().join("other").exists());
}
