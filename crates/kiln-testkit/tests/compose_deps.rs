//! `kiln compose build` with three services, two independent and one that `depends_on` another
//! and builds `FROM` its image: with the containerd worker the dependency's image lands in the
//! namespace first, so the dependent build finds it there; all three images land.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, ctr, run, Kilnd, Namespace, BUSYBOX};

fn write(dir: &Path, dockerfile: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

#[test]
fn dependent_services_wait_and_independent_ones_all_land() {
    let namespace = Namespace(format!("kiln-compose-deps-{}", std::process::id()));
    let ns = namespace.0.as_str();
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(
        &socket,
        &[
            "--oci-worker=false",
            "--containerd-worker=true",
            "--containerd-worker-namespace",
            ns,
        ],
    );
    let project = work.path().join("proj");
    let base = format!(
        "127.0.0.1:5000/kiln-compose-deps/base:{}",
        std::process::id()
    );
    write(
        &project.join("base"),
        &format!("FROM {BUSYBOX}\nRUN sleep 1 && echo base > /base\n"),
    );
    write(
        &project.join("other"),
        &format!("FROM {BUSYBOX}\nRUN echo other > /other\n"),
    );
    write(
        &project.join("app"),
        &format!("FROM {base}\nRUN test \"$(cat /base)\" = base && echo app > /app\n"),
    );
    // `app` is listed first: only depends_on makes it wait for `base`.
    std::fs::write(
        project.join("compose.yaml"),
        format!(
            "services:\n  app:\n    build: ./app\n    depends_on:\n      base:\n        condition: service_started\n  base:\n    image: {base}\n    build: ./base\n  other:\n    build: ./other\n"
        ),
    )
    .unwrap();
    let out = run(Command::new(cargo_bin("kiln"))
        .args([
            "--namespace",
            ns,
            "compose",
            "build",
            "--buildkit-host",
            &socket,
        ])
        .arg("--progress=plain")
        .current_dir(&project));
    assert_eq!(out.code, 0, "{}\nkilnd:\n{}", out.stderr, daemon.log_text());
    let images = ctr(ns, &["images", "ls", "-q"]).stdout;
    for name in [
        base.as_str(),
        "docker.io/library/proj-app:latest",
        "docker.io/library/proj-other:latest",
    ] {
        assert!(
            images.lines().any(|l| l == name),
            "{name} missing from {images}\n{}",
            out.stderr
        );
    }
    // The dependent image really holds its base's file and its own.
    let container = format!("t{}", std::process::id());
    let ran = ctr(
        ns,
        &[
            "run",
            "--rm",
            "docker.io/library/proj-app:latest",
            &container,
            "cat",
            "/base",
            "/app",
        ],
    );
    assert_eq!(
        ran.stdout.split_whitespace().collect::<Vec<_>>(),
        ["base", "app"]
    );

    // A failed dependency stops its dependent with a message naming it.
    write(
        &project.join("base"),
        &format!("FROM {BUSYBOX}\nRUN exit 7\n"),
    );
    let out = run(Command::new(cargo_bin("kiln"))
        .args([
            "--namespace",
            ns,
            "compose",
            "build",
            "--buildkit-host",
            &socket,
        ])
        .current_dir(&project));
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("service \"base\", which it depends on, failed to build"),
        "{}",
        out.stderr
    );
}
