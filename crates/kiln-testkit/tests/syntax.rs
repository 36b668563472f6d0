//! `# syntax=`: the Dockerfile frontend images build with kilnd's builtin
//! frontend; any other frontend image is refused clearly.

use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

#[test]
fn syntax_directive_is_honoured_or_refused() {
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let build = |syntax: &str| {
        let context = work.path().join(syntax.replace(['/', ':', '.'], "_"));
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(
            context.join("Dockerfile"),
            format!("# syntax={syntax}\nFROM {BUSYBOX}\nRUN true\n"),
        )
        .unwrap();
        let dest = work.path().join("out.tar");
        run(Command::new(cargo_bin("kiln"))
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=docker,dest={}", dest.display()))
            .arg(&context))
    };
    let built = build("docker/dockerfile:1");
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    let refused = build("example.com/my/frontend:1");
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("external frontend images are not supported yet"),
        "{}",
        refused.stderr
    );
}
