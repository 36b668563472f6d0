//! End-to-end tests of the `kiln` binary that need no daemon.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(cwd)
        .env_remove("BUILDKIT_HOST")
        .env_remove("BUILDKIT_PROGRESS")
        .env_remove("CONTAINERD_NAMESPACE")
        .env_remove("KILN_LOG")
        .env("KILN_NO_START_DAEMON", "1")
        .output()
        .expect("run kiln")
}

fn context_with_dockerfile() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM 127.0.0.1:5000/busybox:latest\n",
    )
    .unwrap();
    dir
}

/// Sockets under /run that discovery would find; the test only makes sense
/// when none exists (and, as root, /run is the runtime dir).
fn run_sockets_present(namespace: &str) -> Vec<String> {
    [
        format!("/run/buildkit-{namespace}/buildkitd.sock"),
        "/run/buildkit-default/buildkitd.sock".to_string(),
        "/run/buildkit/buildkitd.sock".to_string(),
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect()
}

#[test]
fn build_without_daemon_reports_every_candidate() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: discovery candidates are under $XDG_RUNTIME_DIR when not root");
        return;
    }
    let namespace = format!("kilntest-{:08x}", rand::random::<u32>());
    let present = run_sockets_present(&namespace);
    if !present.is_empty() {
        eprintln!("skipping: a build daemon socket exists on this machine: {present:?}");
        return;
    }
    let ctx = context_with_dockerfile();
    let out = kiln(
        &["build", "--namespace", &namespace, "-t", "kilntest", "."],
        ctx.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    let candidates = [
        format!("unix:///run/buildkit-{namespace}/buildkitd.sock"),
        "unix:///run/buildkit-default/buildkitd.sock".to_string(),
        "unix:///run/buildkit/buildkitd.sock".to_string(),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "stderr: {stderr}");
    // The hint line names kilnd and the candidates.
    assert!(lines[0].starts_with("error: `kilnd`"), "{stderr}");
    for c in &candidates {
        assert!(lines[0].contains(c.as_str()), "{stderr}");
    }
    assert!(
        lines[1].starts_with(&format!(
            "error: no buildkit host is available, tried 3 candidates: failed to ping to host {}: ",
            candidates[0]
        )),
        "{stderr}"
    );
    assert!(lines[2].starts_with(&format!("failed to ping to host {}: ", candidates[1])));
    assert!(lines[3].starts_with(&format!("failed to ping to host {}: ", candidates[2])));
}

#[test]
fn buildkit_host_flag_is_used_verbatim() {
    let ctx = context_with_dockerfile();
    let socket = ctx.path().join("nothing.sock");
    let host = format!("unix://{}", socket.display());
    let out = kiln(&["build", "--buildkit-host", &host, "."], ctx.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("listening on one of: {host}: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("/run/buildkit"), "no fallback: {stderr}");
}

#[test]
fn context_errors() {
    let ctx = context_with_dockerfile();
    let out = kiln(&["build"], ctx.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: context needs to be specified\n"
    );
    let out = kiln(&["image", "build", "git://example.invalid/x"], ctx.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: unsupported build context: \"git://example.invalid/x\"\n"
    );
}

#[test]
fn unsupported_and_invalid_flags_fail_before_anything_else() {
    let ctx = context_with_dockerfile();
    let out = kiln(
        &["builder", "build", "--platform", "linux/amd64,linux", "."],
        ctx.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: invalid platform \"linux\" (expected os/arch[/variant])\n"
    );
    let out = kiln(
        &["build", "--build-context", "a=./nowhere", "."],
        ctx.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nowhere is not a directory"), "{stderr}");
}

#[test]
fn missing_dockerfile_and_containerfile() {
    let ctx = tempfile::tempdir().unwrap();
    let out = kiln(
        &["build", "--buildkit-host", "unix:///nonexistent.sock", "."],
        ctx.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.starts_with("error: lstat "), "{stderr}");
    assert!(stderr.contains("Containerfile"), "{stderr}");
}
