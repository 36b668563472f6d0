//! End-to-end with the containerd worker: images built by `kiln build` live
//! in a containerd namespace, land there without a tarball, and can be the
//! `FROM` of the next build. With the OCI worker, the same `FROM` fails
//! clearly (the OCI worker cannot see containerd's images).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{cargo_bin, ctr, run, Kilnd, Namespace, Output, BUSYBOX};

/// Fails the test with the client's stderr and the daemon's log unless the
/// build succeeded.
fn assert_built(built: &Output, daemon: &Kilnd) {
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
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
    assert_built(&built, &daemon);
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
    assert_built(&built, &daemon);
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

#[test]
fn oci_worker_reads_base_images_from_a_containerd_namespace_when_opted_in() {
    let namespace = Namespace(format!("kilntest-optin-{}", std::process::id()));
    let ns = namespace.0.as_str();
    let other = Namespace(format!("kilntest-optin-other-{}", std::process::id()));
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let opt_in = format!("--oci-worker-containerd-images={ns}");
    let daemon = Kilnd::start(&socket, &["--oci-worker=true", &opt_in]);

    let first = work.path().join("first");
    write_context(
        &first,
        &format!("FROM {BUSYBOX}\nRUN echo hello > /hello\n"),
    );
    build(&socket, ns, "foo", &first).success();
    // Landed through a tarball: the OCI worker's store is not containerd.
    assert!(ctr(ns, &["images", "ls", "-q"])
        .stdout
        .lines()
        .any(|l| l == "docker.io/library/foo:latest"));

    let second = work.path().join("second");
    write_context(
        &second,
        "FROM docker.io/library/foo:latest\nRUN echo bar > /bar\n",
    );
    let built = build(&socket, ns, "bar", &second);
    assert_built(&built, &daemon);
    let output = ctr(
        ns,
        &[
            "run",
            "--rm",
            "docker.io/library/bar:latest",
            "kiln-optin-1",
            "sh",
            "-c",
            "cat /bar /hello",
        ],
    )
    .success();
    assert_eq!(output.stdout, "bar\nhello\n");
    // Read-only: the OCI worker left no lease in the namespace (the client's import
    // lease is gone too).
    let leases = ctr(ns, &["leases", "ls", "-q"]).success();
    assert_eq!(leases.stdout.trim(), "", "leases left in {ns}");

    // An image of another namespace stays invisible, and the error says where kiln looked.
    ctr(&other.0, &["images", "pull", "--plain-http", BUSYBOX]).success();
    let only_other = format!(
        "docker.io/library/kilntest-only-other-{}:latest",
        std::process::id()
    );
    ctr(&other.0, &["images", "tag", BUSYBOX, &only_other]).success();
    let third = work.path().join("third");
    write_context(&third, &format!("FROM {only_other}\nRUN true\n"));
    let failed = build(&socket, ns, "baz", &third);
    assert_ne!(
        failed.code, 0,
        "an image of another namespace must not be visible"
    );
    assert!(
        failed.stderr.contains(&only_other) && failed.stderr.contains(ns),
        "the error must name the image and the namespace searched:\n{}",
        failed.stderr
    );
}

/// Runs `kiln build` like a user: no `--buildkit-host`, no `--namespace`, only
/// `CONTAINERD_NAMESPACE`.
fn build_discovering(namespace: &str, tag: &str, context: &Path) -> Output {
    run(Command::new(cargo_bin("kiln"))
        .env_remove("BUILDKIT_HOST")
        .env_remove("XDG_RUNTIME_DIR")
        .env("CONTAINERD_NAMESPACE", namespace)
        .args(["build", "--progress=plain", "-t", tag])
        .arg(context))
}

#[test]
fn client_finds_the_daemon_of_its_namespace_and_images_stay_there() {
    let pid = std::process::id();
    let namespace = Namespace(format!("kilntest{pid}"));
    let ns = namespace.0.as_str();
    let other = Namespace(format!("kilntest{pid}other"));
    // The socket where nerdctl (and kiln) look for the namespace's daemon.
    let socket_dir = format!("/run/buildkit-{ns}");
    std::fs::create_dir_all(&socket_dir).unwrap();
    struct RemoveDir(String);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _socket_dir = RemoveDir(socket_dir.clone());
    let socket = format!("unix://{socket_dir}/buildkitd.sock");
    let daemon = Kilnd::start(
        &socket,
        &[
            "--oci-worker=false",
            "--containerd-worker=true",
            "--containerd-worker-namespace",
            ns,
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let tag = format!("kilntest-discovered-{pid}");
    let full = format!("docker.io/library/{tag}:latest");

    let first = work.path().join("first");
    write_context(
        &first,
        &format!("FROM {BUSYBOX}\nRUN echo hello > /hello\n"),
    );
    let built = build_discovering(ns, &tag, &first);
    assert_built(&built, &daemon);
    // Direct landing (no tarball) only happens when the worker is a containerd worker of
    // the client's namespace: the daemon found is this one.
    assert!(
        !built.stderr.contains("sending tarball"),
        "{}",
        built.stderr
    );
    assert!(ctr(ns, &["images", "ls", "-q"])
        .stdout
        .lines()
        .any(|l| l == full));
    assert!(
        !ctr("default", &["images", "ls", "-q"])
            .stdout
            .lines()
            .any(|l| l == full),
        "the image must land in {ns} only"
    );

    // FROM the image built in this namespace works.
    let second = work.path().join("second");
    write_context(&second, &format!("FROM {full}\nRUN cat /hello\n"));
    build_discovering(ns, &format!("{tag}-2"), &second).success();

    // An image that exists only in another namespace is not visible.
    ctr(&other.0, &["images", "pull", "--plain-http", BUSYBOX]).success();
    let only_other = format!("docker.io/library/kilntest-only-other-{pid}:latest");
    ctr(&other.0, &["images", "tag", BUSYBOX, &only_other]).success();
    let third = work.path().join("third");
    write_context(&third, &format!("FROM {only_other}\nRUN true\n"));
    let failed = build_discovering(ns, &format!("{tag}-3"), &third);
    assert_ne!(
        failed.code, 0,
        "an image of another namespace must not be visible"
    );
    assert!(failed.stderr.contains(&only_other), "{}", failed.stderr);
}

fn snapshot_keys(namespace: &str) -> Vec<String> {
    ctr(namespace, &["snapshots", "ls"])
        .success()
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn killing_kilnd_mid_build_leaves_nothing_held_in_containerd() {
    let pid = std::process::id();
    let namespace = Namespace(format!("kilntest-kill-{pid}"));
    let ns = namespace.0.as_str();
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let config = work.path().join("buildkitd.toml");
    std::fs::write(&config, "[registry.\"127.0.0.1:5000\"]\nhttp = true\n").unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let flags = [
        "--oci-worker=false",
        "--containerd-worker=true",
        "--containerd-worker-namespace",
        ns,
    ];
    let mut daemon = Kilnd::start_in(&root, &config, &socket, &flags);

    let slow = work.path().join("slow");
    write_context(&slow, &format!("FROM {BUSYBOX}\nRUN sleep 30\n"));
    let mut client = Command::new(cargo_bin("kiln"))
        .args([
            "--namespace",
            ns,
            "build",
            "--progress=plain",
            "--buildkit-host",
            &socket,
            "-t",
            "slow",
        ])
        .arg(&slow)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the RUN step's container, then note the active snapshots.
    let runc_state = root.join("containerd-overlayfs/executor/runc");
    let running = || {
        run(Command::new("runc")
            .arg("--root")
            .arg(&runc_state)
            .args(["list", "-q"]))
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while running() == 0 {
        assert!(
            Instant::now() < deadline,
            "the RUN step did not start:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let active: Vec<String> = snapshot_keys(ns)
        .into_iter()
        .filter(|k| k.starts_with("kiln-active-"))
        .collect();
    assert!(
        !active.is_empty(),
        "the RUN step runs on an active snapshot"
    );
    // Let runc start the step, then crash the daemon.
    std::thread::sleep(Duration::from_secs(2));
    daemon.kill();
    let status = client.wait().unwrap();
    assert!(
        !status.success(),
        "the build of a killed daemon cannot succeed"
    );

    let daemon = Kilnd::start_in(&root, &config, &socket, &flags);
    assert_eq!(running(), 0, "the killed build's container must be gone");
    let keys = snapshot_keys(ns);
    for key in &active {
        assert!(!keys.contains(key), "{key} survived the restart: {keys:?}");
    }
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("kiln-active-") || k.contains("extract")),
        "leftover active snapshots: {keys:?}"
    );
    let leases: Vec<String> = ctr(ns, &["leases", "ls", "-q"])
        .success()
        .stdout
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        leases.len(),
        1,
        "only the worker's own lease may remain: {leases:?}"
    );
    assert!(leases[0].starts_with("kiln-worker-"), "{leases:?}");

    // The restarted daemon builds.
    let quick = work.path().join("quick");
    write_context(&quick, &format!("FROM {BUSYBOX}\nRUN echo ok > /ok\n"));
    let built = build(&socket, ns, "after-crash", &quick);
    assert_built(&built, &daemon);
    let output = ctr(
        ns,
        &[
            "run",
            "--rm",
            "docker.io/library/after-crash:latest",
            "kiln-kill-1",
            "cat",
            "/ok",
        ],
    )
    .success();
    assert_eq!(output.stdout.trim(), "ok");
}

#[test]
fn containerd_worker_with_the_native_snapshotter() {
    let namespace = Namespace(format!("kiln-native-e2e-{}", std::process::id()));
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
            "--containerd-worker-snapshotter",
            "native",
        ],
    );
    let context = work.path().join("ctx");
    write_context(&context, &format!("FROM {BUSYBOX}\nRUN echo native > /n\n"));
    let built = run(Command::new(cargo_bin("kiln"))
        .args([
            "--namespace",
            ns,
            "--snapshotter",
            "native",
            "build",
            "--progress=plain",
        ])
        .args(["--buildkit-host", &socket, "-t", "kiln-native"])
        .arg(&context));
    assert_built(&built, &daemon);
    // Same snapshotter on both sides: landed directly, no tarball.
    assert!(
        !built.stderr.contains("sending tarball"),
        "{}",
        built.stderr
    );
    let output = ctr(
        ns,
        &[
            "run",
            "--snapshotter",
            "native",
            "--rm",
            "docker.io/library/kiln-native:latest",
            "kiln-native-1",
            "cat",
            "/n",
        ],
    )
    .success();
    assert_eq!(output.stdout.trim(), "native");
}
