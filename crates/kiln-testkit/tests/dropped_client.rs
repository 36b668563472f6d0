//! A client that goes away mid-build cancels its build: the running step's
//! container is killed (no `runc` left for it, no mount left under the daemon's root, no
//! half-written cache record), kilnd stays up and the next build works.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

/// Whether a process whose command line is exactly `sleep <marker>` runs.
fn sleeping(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|c| {
                c.split(|b| *b == 0)
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    == [b"sleep".as_slice(), marker.as_bytes()]
            })
            .unwrap_or(false)
    })
}

/// Whether a `runc` process working for the daemon rooted at `root` runs (its command line
/// names a path under that root).
fn runc_for(root: &std::path::Path) -> bool {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            return false;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        args.first().is_some_and(|a| a.ends_with("runc")) && args.iter().any(|a| a.contains(&root))
    })
}

/// The mounts under `root`.
fn mounts_under(root: &std::path::Path) -> Vec<String> {
    let root = root.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&root))
        .map(String::from)
        .collect()
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killed_client_cancels_its_build_and_the_daemon_stays_up() {
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let mut daemon = Kilnd::start(&socket, &[]);
    // A duration no other test uses, so the process is recognisably ours.
    let marker = format!("{}", 3000 + std::process::id() % 1000);
    let slow = work.path().join("slow");
    std::fs::create_dir(&slow).unwrap();
    std::fs::write(
        slow.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN sleep {marker}\n"),
    )
    .unwrap();
    let dest = work.path().join("out.tar");
    let mut client = Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", &socket])
        .arg("-o")
        .arg(format!("type=docker,dest={}", dest.display()))
        .arg(&slow)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the RUN step to start", || sleeping(&marker));
    assert!(
        runc_for(&daemon.root),
        "no runc process seen for the running step"
    );
    client.kill().unwrap();
    client.wait().unwrap();

    wait_for("the cancelled step's process to be killed", || {
        !sleeping(&marker)
    });
    wait_for("the step's runc to exit", || !runc_for(&daemon.root));
    wait_for("the step's mounts to go", || {
        mounts_under(&daemon.root).is_empty()
    });
    assert!(daemon.is_running(), "kilnd died:\n{}", daemon.log_text());
    // No record of the cancelled step, whole or half-written: only the base image's.
    let records: Vec<String> = std::fs::read_dir(daemon.root.join("cache"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        records.iter().all(|r| !r.ends_with(".tmp")),
        "half-written records: {records:?}"
    );
    assert!(
        records.len() <= 1,
        "records of the cancelled step: {records:?}"
    );

    let quick = work.path().join("quick");
    std::fs::create_dir(&quick).unwrap();
    std::fs::write(
        quick.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN echo ok > /ok\n"),
    )
    .unwrap();
    let built = run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", &socket])
        .arg("-o")
        .arg(format!("type=docker,dest={}", dest.display()))
        .arg(&quick));
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    assert_eq!(mounts_under(&daemon.root), Vec::<String>::new());
}
