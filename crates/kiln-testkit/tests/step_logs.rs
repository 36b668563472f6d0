//! A step's log output is capped as buildkitd caps it (2 MiB by default): the client sees the
//! first 2 MiB and BuildKit's `[output clipped, log limit 2MiB reached]` line, and the build
//! still succeeds.

use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

#[test]
fn a_loud_step_is_clipped_at_the_log_limit() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    // 3 MB of `a` in 100-byte lines.
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\nRUN i=0; line=$(head -c 99 /dev/zero | tr '\\0' a); \
             while [ $i -lt 30000 ]; do echo $line; i=$((i+1)); done\n"
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let built = run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", &socket])
        .arg("-o")
        .arg(format!(
            "type=tar,dest={}",
            work.path().join("fs.tar").display()
        ))
        .arg(&context));
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        &built.stderr[built.stderr.len().saturating_sub(2000)..],
        daemon.log_text()
    );
    assert!(
        built
            .stderr
            .contains("[output clipped, log limit 2MiB reached]"),
        "no clip line"
    );
    let shown = built.stderr.matches('a').count();
    assert!(
        (2 << 20) - 200_000 < shown && shown < (2 << 20) + 100_000,
        "{shown} bytes of output shown"
    );
}
