//! `kiln build --network=none --add-host` reach every `RUN`: the step sees
//! only a loopback interface and the extra `/etc/hosts` entry (the build
//! fails otherwise).

use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

#[test]
fn network_none_and_extra_hosts_reach_run_steps() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\nRUN grep -q '^10.1.2.3[[:space:]]*db$' /etc/hosts && test \"$(ls /sys/class/net)\" = lo\n"
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let dest = work.path().join("image.tar");
    let built = run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", &socket])
        .args(["--network=none", "--add-host", "db:10.1.2.3"])
        .arg("-o")
        .arg(format!("type=docker,dest={}", dest.display()))
        .arg(&context));
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    assert!(std::fs::metadata(&dest).unwrap().len() > 0);
}
