//! Privileged steps need the entitlement on both sides: the daemon's
//! `--allow-insecure-entitlement` and the build's `--allow`.

use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

#[test]
fn insecure_step_needs_daemon_and_client_entitlements() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN --security=insecure echo ok > /ok\n"),
    )
    .unwrap();
    let namespace = format!("kiln-ent-{}", std::process::id());
    let build = |socket: &str, allow: bool| {
        let mut command = Command::new(cargo_bin("kiln"));
        command.args([
            "--namespace",
            &namespace,
            "build",
            "--progress=plain",
            "--buildkit-host",
            socket,
        ]);
        if allow {
            command.args(["--allow", "security.insecure"]);
        }
        let dest = work.path().join("image.tar");
        command
            .arg("-o")
            .arg(format!("type=docker,dest={}", dest.display()))
            .arg(&context);
        run(&mut command)
    };

    let plain = format!("unix://{}/plain.sock", work.path().display());
    let _daemon = Kilnd::start(&plain, &[]);
    let denied = build(&plain, true);
    assert_ne!(denied.code, 0);
    assert!(
        denied.stderr.contains("security.insecure is not allowed")
            && denied.stderr.contains("--allow-insecure-entitlement"),
        "{}",
        denied.stderr
    );

    let permissive = format!("unix://{}/permissive.sock", work.path().display());
    let _daemon = Kilnd::start(
        &permissive,
        &["--allow-insecure-entitlement", "security.insecure"],
    );
    let not_asked = build(&permissive, false);
    assert_ne!(not_asked.code, 0);
    assert!(
        not_asked
            .stderr
            .contains("kiln build --allow security.insecure"),
        "{}",
        not_asked.stderr
    );
    let allowed = build(&permissive, true);
    assert_eq!(allowed.code, 0, "{}", allowed.stderr);
}
