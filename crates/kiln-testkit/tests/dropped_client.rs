//! A client that goes away mid-build cancels its build: the running step's
//! container is killed, kilnd stays up and the next build works.

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
    client.kill().unwrap();
    client.wait().unwrap();

    wait_for("the cancelled step's process to be killed", || {
        !sleeping(&marker)
    });
    assert!(daemon.is_running(), "kilnd died:\n{}", daemon.log_text());

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
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(daemon.root.to_str().unwrap()),
        "mounts left under the daemon root:\n{mounts}"
    );
}
