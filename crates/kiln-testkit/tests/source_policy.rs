//! `kiln build --source-policy-file` end to end: a CONVERT rule replaces a base image (the
//! original would need Docker Hub), DENY rules refuse an image and the local context by name.

use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

#[test]
fn source_policies_convert_and_deny() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("hello.txt"), "hello\n").unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM nosuchimage\nCOPY hello.txt /\nRUN grep -q hello /hello.txt\n",
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let build = |policy: &str| {
        let file = work.path().join("policy.json");
        std::fs::write(&file, policy).unwrap();
        run(Command::new(cargo_bin("kiln"))
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("--source-policy-file")
            .arg(&file)
            .arg("-o")
            .arg(format!(
                "type=docker,dest={}",
                work.path().join("image.tar").display()
            ))
            .arg(&context))
    };
    let convert = format!(
        r#"{{"rules": [{{"action": "CONVERT",
            "selector": {{"identifier": "docker-image://docker.io/library/nosuchimage:latest"}},
            "updates": {{"identifier": "docker-image://{BUSYBOX}"}}}}]}}"#
    );
    let built = build(&convert);
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    assert!(
        built.stderr.contains(&format!("FROM {BUSYBOX}@sha256:")),
        "the converted image is what the build pins:\n{}",
        built.stderr
    );

    let deny_image = r#"{"rules": [
        {"action": "CONVERT", "selector": {"identifier": "docker-image://docker.io/library/nosuchimage:latest"},
         "updates": {"identifier": "docker-image://127.0.0.1:5000/busybox:latest"}},
        {"action": "DENY", "selector": {"identifier": "docker-image://127.0.0.1:5000/*"}}]}"#;
    let denied = build(deny_image);
    assert_ne!(denied.code, 0);
    assert!(
        denied
            .stderr
            .contains("source \"docker-image://127.0.0.1:5000/busybox:latest\" denied by policy"),
        "{}",
        denied.stderr
    );

    let deny_context = convert.replace(
        "]}",
        r#", {"action": "DENY", "selector": {"identifier": "local://context"}}]}"#,
    );
    let denied = build(&deny_context);
    assert_ne!(denied.code, 0);
    assert!(
        denied
            .stderr
            .contains("source \"local://context\" denied by policy"),
        "{}",
        denied.stderr
    );
    assert!(daemon_alive(&socket), "kilnd stays up");
}

fn daemon_alive(socket: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket.trim_start_matches("unix://")).is_ok()
}
