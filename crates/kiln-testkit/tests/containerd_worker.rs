//! End-to-end with the containerd worker: images built by `kiln build` live
//! in a containerd namespace, land there without a tarball, and can be the
//! `FROM` of the next build. With the OCI worker, the same `FROM` fails
//! clearly (the OCI worker cannot see containerd's images).

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, Output, BUSYBOX};

fn ctr(namespace: &str, args: &[&str]) -> Output {
    run(Command::new("ctr").arg("-n").arg(namespace).args(args))
}

/// Removes the test namespace's images and the namespace itself.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let images = ctr(&self.0, &["images", "ls", "-q"]);
        for image in images.stdout.lines() {
            let _ = ctr(&self.0, &["images", "rm", "--sync", image]);
        }
        let _ = run(Command::new("ctr").args(["namespaces", "rm", &self.0]));
    }
}

fn write_context(dir: &Path, dockerfile: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

fn build(socket: &str, namespace: &str, tag: &str, context: &Path) -> Output {
    run(Command::new(cargo_bin("kiln"))
        .args([
            "--namespace",
            namespace,
            "build",
            "--progress=plain",
            "--buildkit-host",
            socket,
            "-t",
            tag,
        ])
        .arg(context))
}

#[test]
fn containerd_worker_lands_directly_and_builds_from_its_own_images() {
    let namespace = Namespace(format!("kiln-ctrd-e2e-{}", std::process::id()));
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

    let first = work.path().join("first");
    write_context(
        &first,
        &format!("FROM {BUSYBOX}\nRUN echo hello > /hello\n"),
    );
    let built = build(&socket, ns, "foo", &first);
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    // Direct landing: the exporter named the image in containerd; no tarball.
    assert!(
        built.stderr.contains("exporting to image"),
        "{}",
        built.stderr
    );
    assert!(
        !built.stderr.contains("sending tarball"),
        "{}",
        built.stderr
    );
    let images = ctr(ns, &["images", "ls", "-q"]).success();
    assert!(
        images
            .stdout
            .lines()
            .any(|l| l == "docker.io/library/foo:latest"),
        "{}",
        images.stdout
    );
    let output = ctr(
        ns,
        &[
            "run",
            "--rm",
            "docker.io/library/foo:latest",
            "kiln-ctrd-1",
            "cat",
            "/hello",
        ],
    )
    .success();
    assert_eq!(output.stdout.trim(), "hello");

    // The image built above is a base for the next build (the registry does
    // not have it; the worker's image store does).
    let second = work.path().join("second");
    write_context(
        &second,
        "FROM docker.io/library/foo:latest\nRUN cp /hello /copy\n",
    );
    let built = build(&socket, ns, "bar", &second);
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    let output = ctr(
        ns,
        &[
            "run",
            "--rm",
            "docker.io/library/bar:latest",
            "kiln-ctrd-2",
            "cat",
            "/copy",
        ],
    )
    .success();
    assert_eq!(output.stdout.trim(), "hello");
}

#[test]
fn oci_worker_cannot_see_containerd_images_and_says_so() {
    let namespace = Namespace(format!("kiln-oci-e2e-{}", std::process::id()));
    let ns = namespace.0.as_str();
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let _daemon = Kilnd::start(&socket, &[]);
    let first = work.path().join("first");
    write_context(&first, &format!("FROM {BUSYBOX}\nRUN echo hi > /hi\n"));
    build(&socket, ns, "kiln-oci-base", &first).success();
    assert!(ctr(ns, &["images", "ls", "-q"])
        .stdout
        .lines()
        .any(|l| l == "docker.io/library/kiln-oci-base:latest"));

    let second = work.path().join("second");
    write_context(
        &second,
        "FROM docker.io/library/kiln-oci-base:latest\nRUN true\n",
    );
    let failed = build(&socket, ns, "kiln-oci-derived", &second);
    assert_ne!(
        failed.code, 0,
        "FROM a containerd-only image must fail on the OCI worker"
    );
    assert!(
        failed
            .stderr
            .contains("docker.io/library/kiln-oci-base:latest"),
        "the error must name the image:\n{}",
        failed.stderr
    );
    assert!(
        failed.stderr.contains("OCI worker"),
        "the error must say why (the OCI worker cannot use containerd's images):\n{}",
        failed.stderr
    );
}
