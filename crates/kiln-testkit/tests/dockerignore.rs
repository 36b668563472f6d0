//! `<Dockerfile>.dockerignore` end to end: a Dockerfile's own ignore file (next to it, named
//! after it) is used instead of the context's `.dockerignore`, also when the Dockerfile lives
//! outside the context; without one the context's `.dockerignore` applies.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn dockerfile_specific_ignore_file_wins_over_the_context_one() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    let dockerfile = format!("FROM {BUSYBOX}\nCOPY . /ctx/\n");
    write(&context.join("Dockerfile"), &dockerfile);
    write(&context.join("build.Dockerfile"), &dockerfile);
    write(&context.join("build.Dockerfile.dockerignore"), "a.txt\n");
    write(&context.join(".dockerignore"), "b.txt\n");
    write(&context.join("a.txt"), "a\n");
    write(&context.join("b.txt"), "b\n");
    // A Dockerfile outside the context, with its own ignore file beside it.
    let elsewhere = work.path().join("elsewhere");
    write(&elsewhere.join("other.Dockerfile"), &dockerfile);
    write(
        &elsewhere.join("other.Dockerfile.dockerignore"),
        "a.txt\nb.txt\n",
    );

    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let build = |name: &str, file: Option<&Path>| {
        let out = work.path().join(name);
        let mut command = Command::new(cargo_bin("kiln"));
        command
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=local,dest={}", out.display()));
        if let Some(file) = file {
            command.arg("-f").arg(file);
        }
        let built = run(command.arg(&context));
        assert_eq!(
            built.code,
            0,
            "{}\nkilnd:\n{}",
            built.stderr,
            daemon.log_text()
        );
        let present = |f: &str| out.join("ctx").join(f).exists();
        (present("a.txt"), present("b.txt"))
    };

    // The context's .dockerignore: b.txt left out.
    assert_eq!(build("plain", None), (true, false));
    // build.Dockerfile.dockerignore replaces it: a.txt left out, b.txt sent.
    assert_eq!(
        build("own", Some(&context.join("build.Dockerfile"))),
        (false, true)
    );
    // Outside the context: the ignore file next to the Dockerfile.
    assert_eq!(
        build("outside", Some(&elsewhere.join("other.Dockerfile"))),
        (false, false)
    );
}
