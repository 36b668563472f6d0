//! End-to-end: `kiln build` → `kilnd` (OCI worker, runc) → containerd, on the
//! real components (`scripts/services start` and `scripts/fixtures` first).
//!
//! One test function: the steps share the daemon discovery sockets under
//! `/run`, so they must not run concurrently.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

const IMAGE: &str = "docker.io/library/foo:latest";
const DEFAULT_SOCKET: &str = "/run/buildkit-default/buildkitd.sock";

/// A runc that records each invocation, so the test can tell whether a
/// build started a container.
fn counting_runc(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let log = dir.join("runc-calls.log");
    let script = dir.join("runc-counting");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec runc \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, log)
}

fn container_runs(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "run"))
        .count()
}

/// The `#N` ids of the Dockerfile steps (`[k/m] …`) in plain progress, and
/// whether each was reported `CACHED`.
fn steps(plain: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for line in plain.lines() {
        let mut words = line.splitn(2, ' ');
        let (Some(id), Some(rest)) = (words.next(), words.next()) else {
            continue;
        };
        if id.starts_with('#') && rest.starts_with('[') && !rest.starts_with("[internal]") {
            let cached = plain.lines().any(|l| l == format!("{id} CACHED"));
            if !out.iter().any(|(seen, _): &(String, bool)| seen == id) {
                out.push((id.to_string(), cached));
            }
        }
    }
    out
}

fn ctr(args: &[&str]) -> kiln_testkit::Output {
    run(Command::new("ctr").args(args))
}

#[test]
fn build_lands_in_containerd_and_rebuild_is_cached() {
    for socket in [DEFAULT_SOCKET, "/run/buildkit/buildkitd.sock"] {
        assert!(
            !Path::new(socket).exists() || std::os::unix::net::UnixStream::connect(socket).is_err(),
            "a daemon is already answering on {socket}: this test needs the default sockets"
        );
    }
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN echo hello > /hello\n"),
    )
    .unwrap();
    let kiln = cargo_bin("kiln");
    let build = || {
        run(Command::new(&kiln)
            .args([
                "--namespace",
                "default",
                "build",
                "--progress=plain",
                "-t",
                "foo",
            ])
            .arg(&context)
            .env_remove("BUILDKIT_HOST")
            .env("KILN_NO_START_DAEMON", "1")
            .env_remove("CONTAINERD_NAMESPACE"))
    };

    // 4. No daemon anywhere: the discovery error names every candidate.
    let failed = build();
    assert_ne!(
        failed.code, 0,
        "build without a daemon must fail:\n{}",
        failed.stderr
    );
    assert!(
        failed
            .stderr
            .contains("no buildkit host is available, tried 2 candidates"),
        "{}",
        failed.stderr
    );
    for candidate in [
        "unix:///run/buildkit-default/buildkitd.sock",
        "unix:///run/buildkit/buildkitd.sock",
    ] {
        assert!(
            failed
                .stderr
                .contains(&format!("failed to ping to host {candidate}")),
            "missing candidate {candidate}:\n{}",
            failed.stderr
        );
    }

    // 1. kilnd on the namespace's default socket; kiln finds it by itself.
    let (runc, runc_log) = counting_runc(work.path());
    let _ = ctr(&["-n", "default", "images", "rm", IMAGE]);
    let daemon = Kilnd::start(
        &format!("unix://{DEFAULT_SOCKET}"),
        &["--oci-worker-binary", runc.to_str().unwrap()],
    );
    let first = build();
    assert_eq!(
        first.code,
        0,
        "first build failed\nstderr:\n{}\nkilnd log:\n{}",
        first.stderr,
        daemon.log_text()
    );
    assert!(
        first.stderr.contains(&format!("Loaded image: {IMAGE}")),
        "{}",
        first.stderr
    );
    let first_steps = steps(&first.stderr);
    assert_eq!(
        first_steps.len(),
        2,
        "expected FROM and RUN steps:\n{}",
        first.stderr
    );
    assert!(
        container_runs(&runc_log) >= 1,
        "the RUN step must have started a container"
    );

    // 2. containerd has the image, unpacked and runnable.
    let images = ctr(&["-n", "default", "images", "ls", "-q"]).success();
    assert!(
        images.stdout.lines().any(|l| l == IMAGE),
        "{}",
        images.stdout
    );
    let container = format!("kiln-e2e-{}", std::process::id());
    let output = ctr(&[
        "-n", "default", "run", "--rm", IMAGE, &container, "cat", "/hello",
    ])
    .success();
    assert_eq!(output.stdout.trim(), "hello");

    // 3. The same build again: every step cached, no container started.
    let runs_before = container_runs(&runc_log);
    let second = build();
    assert_eq!(second.code, 0, "second build failed:\n{}", second.stderr);
    let second_steps = steps(&second.stderr);
    assert_eq!(second_steps.len(), 2, "{}", second.stderr);
    for (id, cached) in &second_steps {
        assert!(
            cached,
            "step {id} was not reported CACHED:\n{}",
            second.stderr
        );
    }
    assert_eq!(
        container_runs(&runc_log),
        runs_before,
        "a cached rebuild started a container"
    );
    assert!(
        second.stderr.contains(&format!("Loaded image: {IMAGE}")),
        "{}",
        second.stderr
    );
    // Nothing changed, so the image is the same image: same manifest digest.
    assert_eq!(
        unpacked_digest(&first.stderr),
        unpacked_digest(&second.stderr),
        "a fully cached rebuild changed the image"
    );
}

/// The manifest digest of `unpacking <name> (<digest>)...`.
fn unpacked_digest(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("unpacking ")?
                .split_once(" (")?
                .1
                .strip_suffix(")...")
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no unpacking line in:\n{stderr}"))
}
