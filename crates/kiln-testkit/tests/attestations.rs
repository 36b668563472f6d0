//! SLSA provenance attestations end to end: `kiln build --provenance` / `--attest
//! type=provenance` against a sandboxed kilnd (OCI worker). The pushed image is an OCI index
//! holding the image manifest and an attestation manifest (`unknown/unknown`, BuildKit's
//! `vnd.docker.reference.*` annotations) whose one layer is an in-toto statement about the image
//! manifest; checked from outside with skopeo and the registry's blob API. `mode=min` leaves
//! build-arg values out, `mode=max` keeps them; an `oci` tarball with provenance is read by
//! skopeo; without attestations the output is a single manifest as before; SBOMs are refused.
//!
//! Needs `cargo build -p kiln-cli -p kiln-daemon --bins` first, runc, skopeo, curl and the
//! local registry holding the busybox fixture.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, containerd_available, ctr, run, Kilnd, Namespace, Output, BUSYBOX};
use serde_json::Value;

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

const DOCKERFILE: &str = "\
FROM 127.0.0.1:5000/busybox:latest
ARG GREETING
RUN echo \"$GREETING\" > /greeting.txt
COPY hello.txt /hello.txt
";

fn kiln(socket: &str, args: &[&str], ctx: &Path) -> Output {
    kiln_in("default", socket, args, ctx)
}

fn kiln_in(namespace: &str, socket: &str, args: &[&str], ctx: &Path) -> Output {
    run(Command::new(cargo_bin("kiln"))
        .args(["--namespace", namespace])
        .args(["build", "--buildkit-host", socket, "--progress=plain"])
        .args(args)
        .arg(ctx)
        .env_remove("BUILDKIT_HOST")
        .env_remove("BUILDKIT_PROGRESS")
        .env_remove("SOURCE_DATE_EPOCH"))
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn skopeo(args: &[&str]) -> Value {
    json(&run(Command::new("skopeo").args(args)).success().stdout)
}

/// A blob of `repo` (`127.0.0.1:5000/<path>`) through the registry's blob API.
fn blob(repo: &str, digest: &str) -> Value {
    let path = repo.strip_prefix("127.0.0.1:5000/").unwrap();
    let out = run(Command::new("curl").args([
        "-fsS",
        &format!("http://127.0.0.1:5000/v2/{path}/blobs/{digest}"),
    ]))
    .success();
    json(&out.stdout)
}

/// Checks the pushed index of `image` and returns its provenance statement.
fn pushed_statement(image: &str, busybox_digest: &str) -> Value {
    let repo = image.rsplit_once(':').unwrap().0;
    let index = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{index}");
    let image_manifest = &manifests[0];
    assert_eq!(image_manifest["platform"]["os"], "linux");
    assert_eq!(image_manifest["platform"]["architecture"], "amd64");
    let attestation = &manifests[1];
    assert_eq!(attestation["platform"]["os"], "unknown");
    assert_eq!(attestation["platform"]["architecture"], "unknown");
    assert_eq!(
        attestation["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    let image_digest = image_manifest["digest"].as_str().unwrap();
    assert_eq!(
        attestation["annotations"]["vnd.docker.reference.digest"],
        image_digest
    );
    // The image manifest itself is an ordinary image skopeo reads.
    let inspected = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{repo}@{image_digest}"),
    ]);
    assert_eq!(inspected["Architecture"], "amd64");

    let manifest = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!(
            "docker://{repo}@{}",
            attestation["digest"].as_str().unwrap()
        ),
    ]);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/vnd.in-toto+json");
    assert_eq!(
        layers[0]["annotations"]["in-toto.io/predicate-type"],
        "https://slsa.dev/provenance/v0.2"
    );
    let config = blob(repo, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["os"], "unknown");

    let statement = blob(repo, layers[0]["digest"].as_str().unwrap());
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v0.1");
    assert_eq!(
        statement["predicateType"],
        "https://slsa.dev/provenance/v0.2"
    );
    let subject = &statement["subject"][0];
    assert_eq!(
        format!("sha256:{}", subject["digest"]["sha256"].as_str().unwrap()),
        image_digest
    );
    assert!(
        subject["name"]
            .as_str()
            .unwrap()
            .ends_with("?platform=linux%2Famd64"),
        "{subject}"
    );
    let predicate = &statement["predicate"];
    assert_eq!(
        predicate["buildType"],
        "https://mobyproject.org/buildkit@v1"
    );
    assert_eq!(
        predicate["invocation"]["configSource"]["entryPoint"],
        "Dockerfile"
    );
    assert_eq!(
        predicate["invocation"]["parameters"]["frontend"],
        "dockerfile.v0"
    );
    let materials = predicate["materials"].as_array().unwrap();
    assert!(
        materials.iter().any(|m| m["uri"]
            == "pkg:docker/127.0.0.1:5000/busybox@latest?platform=linux%2Famd64"
            && format!("sha256:{}", m["digest"]["sha256"].as_str().unwrap()) == busybox_digest),
        "busybox {busybox_digest} not among {materials:?}"
    );
    assert_eq!(predicate["metadata"]["reproducible"], false);
    assert!(predicate["metadata"]["buildStartedOn"].is_string());
    assert!(predicate["metadata"]["buildFinishedOn"].is_string());
    statement
}

#[test]
fn provenance_attestations_pushed_and_archived() {
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello\n").unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let ok = |out: Output| {
        assert_eq!(out.code, 0, "{}\nkilnd:\n{}", out.stderr, daemon.log_text());
        out
    };
    let busybox = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{BUSYBOX}"),
    ]);
    let busybox_digest = busybox["Digest"].as_str().unwrap().to_string();
    let repo = format!("127.0.0.1:5000/kiln-test/{}", unique("attest"));

    // mode=max: the build-arg's value is part of the provenance.
    let max = format!("{repo}:max");
    ok(kiln(
        &socket,
        &[
            "--provenance",
            "mode=max",
            "--build-arg",
            "GREETING=hello-attest",
            "-o",
            &format!("type=image,name={max},push=true"),
        ],
        &ctx,
    ));
    let statement = pushed_statement(&max, &busybox_digest);
    let parameters = &statement["predicate"]["invocation"]["parameters"];
    assert_eq!(parameters["args"]["build-arg:GREETING"], "hello-attest");
    assert_eq!(
        statement["predicate"]["metadata"]["completeness"]["parameters"],
        true
    );
    assert!(parameters["locals"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({ "name": "context" })));

    // mode=min (also the default): no build-arg value.
    let min = format!("{repo}:min");
    ok(kiln(
        &socket,
        &[
            "--attest",
            "type=provenance,mode=min",
            "--build-arg",
            "GREETING=hello-attest",
            "-o",
            &format!("type=image,name={min},push=true"),
        ],
        &ctx,
    ));
    let statement = pushed_statement(&min, &busybox_digest);
    let text = statement.to_string();
    assert!(!text.contains("hello-attest"), "{text}");
    assert!(!text.contains("build-arg:GREETING"), "{text}");
    assert_eq!(
        statement["predicate"]["metadata"]["completeness"]["parameters"],
        false
    );

    // Without attestations: one manifest, as before.
    let plain = format!("{repo}:plain");
    ok(kiln(
        &socket,
        &[
            "--build-arg",
            "GREETING=hello-attest",
            "-o",
            &format!("type=image,name={plain},push=true"),
        ],
        &ctx,
    ));
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{plain}"),
    ]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    // An oci tarball with provenance: an index skopeo reads, the image picked by platform.
    let tarball = work.path().join("attested.tar");
    ok(kiln(
        &socket,
        &[
            "--provenance=true",
            "-o",
            &format!("type=oci,dest={}", tarball.display()),
        ],
        &ctx,
    ));
    let archive = format!("oci-archive:{}", tarball.display());
    let raw = skopeo(&["inspect", "--raw", &archive]);
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert_eq!(raw["manifests"].as_array().unwrap().len(), 2, "{raw}");
    assert_eq!(
        raw["manifests"][1]["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    let inspected = skopeo(&["inspect", &archive]);
    assert_eq!(inspected["Architecture"], "amd64");

    // Several platforms: every image manifest first, then one attestation manifest for each,
    // in the same order, each about its platform's manifest.
    let scratch = work.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(
        scratch.join("Dockerfile"),
        "FROM scratch\nCOPY hello.txt /\n",
    )
    .unwrap();
    std::fs::write(scratch.join("hello.txt"), "hello\n").unwrap();
    let multi = work.path().join("multi.tar");
    ok(kiln(
        &socket,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--provenance=mode=max",
            "-o",
            &format!("type=oci,dest={}", multi.display()),
        ],
        &scratch,
    ));
    let raw = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}", multi.display()),
    ]);
    let manifests = raw["manifests"].as_array().unwrap();
    let platforms: Vec<String> = manifests
        .iter()
        .map(|m| {
            format!("{}/{}", m["platform"]["os"], m["platform"]["architecture"]).replace('"', "")
        })
        .collect();
    assert_eq!(
        platforms,
        [
            "linux/amd64",
            "linux/arm64",
            "unknown/unknown",
            "unknown/unknown"
        ]
    );
    for (image, attestation) in manifests[..2].iter().zip(&manifests[2..]) {
        assert_eq!(
            attestation["annotations"]["vnd.docker.reference.digest"],
            image["digest"]
        );
    }

    // A docker tarball cannot carry them: refused, not dropped.
    let refused = kiln(
        &socket,
        &[
            "--provenance=true",
            "-o",
            &format!("type=docker,dest={}", work.path().join("d.tar").display()),
        ],
        &ctx,
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("docker exporter cannot hold attestations"),
        "{}",
        refused.stderr
    );

    // Landed in containerd (the default output): the index keeps the attestation manifest of
    // the landed platform alive (a gc reference from the index).
    if containerd_available() {
        let ns = Namespace(unique("kilntest-attest"));
        let name = format!("{repo}:landed");
        ok(kiln_in(
            &ns.0,
            &socket,
            &["--provenance=true", "-t", &name],
            &ctx,
        ));
        let images = ctr(&ns.0, &["images", "ls"]).success().stdout;
        assert!(images.contains("linux/amd64,unknown/unknown"), "{images}");
        let content = ctr(&ns.0, &["content", "ls"]).success().stdout;
        assert!(
            content
                .lines()
                .any(|l| l.contains("containerd.io/gc.ref.content.m.1=sha256:")),
            "no gc reference to the attestation manifest:\n{content}"
        );
    }

    // SBOMs need a scanner image kiln does not run.
    let refused = kiln(&socket, &["--sbom=true"], &ctx);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("docker/buildkit-syft-scanner"),
        "{}",
        refused.stderr
    );
}
