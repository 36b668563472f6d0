//! Multi-platform builds end to end (issues 6 and 8): `kiln build --platform a,b` against a
//! sandboxed kilnd (OCI worker) solves one result per platform and exports an image index
//! (`image` pushed to the local registry, `oci` tarball, landing in containerd) or one
//! directory per platform (`local`, `tar`; `platform-split=false` merges). Checked from
//! outside with skopeo, umoci and ctr; the containerd worker names the index in its namespace.
//! There is no binfmt emulation here, so the Dockerfiles run their `RUN` steps on the build
//! platform only; a `RUN` for a foreign platform and a base image without the wanted platform
//! must fail clearly.
//!
//! Needs `cargo build -p kiln-cli -p kiln-daemon --bins` first, containerd, runc, skopeo, umoci
//! and the local registry holding the (amd64-only) busybox fixture.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, containerd_available, ctr, run, Kilnd, Namespace, Output, BUSYBOX};

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// `FROM --platform=$BUILDPLATFORM busybox` + `RUN` (runs natively for every target), then a
/// scratch image per target platform.
const DOCKERFILE: &str = "\
FROM --platform=$BUILDPLATFORM 127.0.0.1:5000/busybox:latest AS build
ARG TARGETPLATFORM
ARG BUILDPLATFORM
RUN echo \"built on $BUILDPLATFORM for $TARGETPLATFORM\" > /out.txt
FROM scratch
COPY --from=build /out.txt /out.txt
COPY hello.txt /hello.txt
";

fn context(dir: &Path, dockerfile: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();
}

fn kiln(namespace: &str, socket: &str, args: &[&str], ctx: &Path) -> Output {
    run(Command::new(cargo_bin("kiln"))
        .args(["--namespace", namespace, "build", "--buildkit-host", socket])
        .arg("--progress=plain")
        .args(args)
        .arg(ctx)
        .env_remove("BUILDKIT_HOST")
        .env_remove("BUILDKIT_PROGRESS")
        .env_remove("SOURCE_DATE_EPOCH"))
}

fn skopeo(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("skopeo").args(args)).success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

/// `os/arch` of every manifest of an index.
fn index_platforms(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn multi_platform_index_pushed_archived_landed_and_split() {
    if !containerd_available() {
        eprintln!("containerd is not running: skipped");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    context(&ctx, DOCKERFILE);
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let ns = Namespace(unique("kilntest-multiplat"));
    let both = ["--platform", "linux/amd64,linux/arm64"];
    let ok = |out: Output| {
        assert_eq!(out.code, 0, "{}\nkilnd:\n{}", out.stderr, daemon.log_text());
        out
    };

    // Pushed to the registry: an index listing both platforms, each config its own.
    let repo = format!("127.0.0.1:5000/kiln-test/{}", unique("multiplat"));
    let image = format!("{repo}:1");
    let pushed = ok(kiln(
        &ns.0,
        &socket,
        &[
            both[0],
            both[1],
            "-o",
            &format!("type=image,name={image},push=true"),
        ],
        &ctx,
    ));
    // Steps carry their platform; the build stage runs natively for both targets.
    assert!(
        pushed
            .stderr
            .contains("[linux/arm64 stage-1 2/2] COPY hello.txt /hello.txt"),
        "{}",
        pushed.stderr
    );
    let reference = format!("docker://{image}");
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &reference]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(index_platforms(&raw), ["linux/amd64", "linux/arm64"]);
    let arm = skopeo(&[
        "--override-arch",
        "arm64",
        "inspect",
        "--tls-verify=false",
        &reference,
    ]);
    assert_eq!(arm["Architecture"], "arm64");
    assert_eq!(arm["Os"], "linux");
    let amd = skopeo(&[
        "--override-arch",
        "amd64",
        "inspect",
        "--tls-verify=false",
        &reference,
    ]);
    assert_eq!(amd["Architecture"], "amd64");
    // Each platform its own files: the layer made by the RUN output differs.
    assert_ne!(arm["Layers"], amd["Layers"]);

    // The oci tarball: index.json names the index; skopeo picks each platform, and the arm64
    // image it copies out unpacks with umoci with the files built for arm64.
    let tarball = work.path().join("multi.tar");
    ok(kiln(
        &ns.0,
        &socket,
        &[
            both[0],
            both[1],
            "-o",
            &format!("type=oci,dest={}", tarball.display()),
        ],
        &ctx,
    ));
    let archive = format!("oci-archive:{}", tarball.display());
    let raw = skopeo(&["inspect", "--raw", &archive]);
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(index_platforms(&raw), ["linux/amd64", "linux/arm64"]);
    let arm = skopeo(&["--override-arch", "arm64", "inspect", &archive]);
    assert_eq!(arm["Architecture"], "arm64");
    let layout = work.path().join("layout");
    run(Command::new("skopeo").args([
        "--override-arch",
        "arm64",
        "copy",
        &archive,
        &format!("oci:{}:arm64", layout.display()),
    ]))
    .success();
    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:arm64", layout.display()))
        .arg(&bundle))
    .success();
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/out.txt")).unwrap(),
        "built on linux/amd64 for linux/arm64\n"
    );

    // A docker tarball holds one platform: refused, naming the alternative.
    let refused = kiln(
        &ns.0,
        &socket,
        &[
            both[0],
            both[1],
            "-o",
            &format!("type=docker,dest={}", work.path().join("d.tar").display()),
        ],
        &ctx,
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("docker exporter does not currently support exporting manifest lists"),
        "{}",
        refused.stderr
    );

    // local: one directory per platform (repeated --platform flags work too) ...
    let split = work.path().join("split");
    ok(kiln(
        &ns.0,
        &socket,
        &[
            "--platform",
            "linux/amd64",
            "--platform=linux/arm64",
            "-o",
            &format!("type=local,dest={}", split.display()),
        ],
        &ctx,
    ));
    for platform in ["linux/amd64", "linux/arm64"] {
        let dir = split.join(platform.replace('/', "_"));
        assert_eq!(
            std::fs::read_to_string(dir.join("out.txt")).unwrap(),
            format!("built on linux/amd64 for {platform}\n")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("hello.txt")).unwrap(),
            "hello\n"
        );
    }
    // ... or merged with platform-split=false.
    let merged = work.path().join("merged");
    ok(kiln(
        &ns.0,
        &socket,
        &[
            both[0],
            both[1],
            "-o",
            &format!("type=local,dest={},platform-split=false", merged.display()),
        ],
        &ctx,
    ));
    assert_eq!(
        std::fs::read_to_string(merged.join("hello.txt")).unwrap(),
        "hello\n"
    );
    assert!(merged.join("out.txt").is_file());
    assert!(!merged.join("linux_amd64").exists());
    // tar: the same directories in one tarball.
    let files = work.path().join("files.tar");
    ok(kiln(
        &ns.0,
        &socket,
        &[
            both[0],
            both[1],
            "-o",
            &format!("type=tar,dest={}", files.display()),
        ],
        &ctx,
    ));
    let listing = run(Command::new("tar").arg("tf").arg(&files)).success();
    for entry in ["linux_amd64/out.txt", "linux_arm64/hello.txt"] {
        assert!(
            listing.stdout.lines().any(|l| l == entry),
            "{}",
            listing.stdout
        );
    }

    // Landed in containerd (no --output): the image is the index, both platforms listed.
    let name = format!("{repo}:landed");
    let landed = ok(kiln(&ns.0, &socket, &[both[0], both[1], "-t", &name], &ctx));
    assert!(landed.stderr.contains("Loaded image"), "{}", landed.stderr);
    let images = ctr(&ns.0, &["images", "ls"]).success();
    let line = images
        .stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{name} not in\n{}", images.stdout));
    assert!(
        line.contains("application/vnd.oci.image.index.v1+json"),
        "{line}"
    );
    assert!(line.contains("linux/amd64,linux/arm64"), "{line}");
}

#[test]
fn foreign_platform_steps_and_bases_fail_clearly() {
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let ns = unique("kilntest-multiplat-foreign");
    let out_dir = work.path().join("out");
    let output = format!("type=local,dest={}", out_dir.display());

    // A RUN of an arm64 stage on this amd64 worker (no binfmt): refused before it starts,
    // at its Dockerfile line, naming both platforms.
    let foreign = work.path().join("foreign");
    context(
        &foreign,
        "FROM scratch\nCOPY hello.txt /bin/sh\nRUN echo never\n",
    );
    let (host, other) = match std::env::consts::ARCH {
        "x86_64" => ("linux/amd64", "linux/arm64"),
        "aarch64" => ("linux/arm64", "linux/amd64"),
        arch => {
            eprintln!("no foreign platform chosen for {arch}: skipped");
            return;
        }
    };
    let refused = kiln(
        &ns,
        &socket,
        &["--platform", other, "-o", &output],
        &foreign,
    );
    assert_ne!(refused.code, 0, "{}", daemon.log_text());
    let expected =
        format!("exec format error: building for {other} on a {host} host needs binfmt emulation");
    assert!(refused.stderr.contains(&expected), "{}", refused.stderr);
    assert!(
        refused.stderr.contains(">>> RUN echo never"),
        "{}",
        refused.stderr
    );

    // The busybox fixture is amd64 only: building it for arm64 (beside amd64) fails at
    // its resolution, naming the platform and what the image has.
    if host == "linux/amd64" {
        let base = work.path().join("base");
        context(&base, &format!("FROM {BUSYBOX}\nRUN true\n"));
        let refused = kiln(
            &ns,
            &socket,
            &["--platform", "linux/amd64,linux/arm64", "-o", &output],
            &base,
        );
        assert_ne!(refused.code, 0);
        assert!(
            refused
                .stderr
                .contains("no match for platform linux/arm64 in manifest")
                && refused.stderr.contains("(available: linux/amd64)"),
            "{}",
            refused.stderr
        );
        assert!(
            !refused
                .stderr
                .contains("cannot use images stored in containerd"),
            "{}",
            refused.stderr
        );
    }
}

#[test]
fn containerd_worker_stores_the_index_with_every_platform() {
    if !containerd_available() {
        eprintln!("containerd is not running: skipped");
        return;
    }
    let ns = Namespace(unique("kilntest-multiplat-ctrd"));
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    context(&ctx, DOCKERFILE);
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(
        &socket,
        &[
            "--oci-worker=false",
            "--containerd-worker=true",
            "--containerd-worker-namespace",
            &ns.0,
        ],
    );
    let name = format!("127.0.0.1:5000/kiln-test/{}:ctrd", unique("multiplat"));
    let built = kiln(
        &ns.0,
        &socket,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=image,name={name},unpack=true"),
        ],
        &ctx,
    );
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    let images = ctr(&ns.0, &["images", "ls"]).success();
    let line = images
        .stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{name} not in\n{}", images.stdout));
    assert!(
        line.contains("application/vnd.docker.distribution.manifest.list.v2+json"),
        "{line}"
    );
    assert!(line.contains("linux/amd64,linux/arm64"), "{line}");
    // Every platform's content is present (nothing missing for either manifest).
    let check = ctr(&ns.0, &["images", "check", &format!("name=={name}")]).success();
    assert!(check.stdout.contains("complete"), "{}", check.stdout);
}
