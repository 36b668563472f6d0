//! The `image` exporter's options seen from outside, through `kiln build -o type=image,…`
//! against the local registry: `push-by-digest` (no tag pushed, the digest reported in
//! `--metadata-file`), `name-canonical` (`name@digest` reported and pullable),
//! `oci-mediatypes=false|true` (Docker or OCI media types in the pushed manifest, per `skopeo
//! inspect --raw`), and `annotation.KEY` / `annotation-manifest.KEY` (in the manifest's annotations).

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, Output, BUSYBOX};

fn skopeo(args: &[&str]) -> Output {
    run(Command::new("skopeo").args(args))
}

fn build(address: &str, context: &Path, output: &str, metadata: &Path) -> serde_json::Value {
    let out = run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", address])
        .arg("--metadata-file")
        .arg(metadata)
        .arg("-o")
        .arg(output)
        .arg(context));
    assert_eq!(out.code, 0, "build -o {output} failed:\n{}", out.stderr);
    serde_json::from_slice(&std::fs::read(metadata).unwrap()).unwrap()
}

#[test]
fn image_exporter_options_seen_from_the_registry() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let nonce: u64 = rand::random();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN echo {nonce} > /nonce\n"),
    )
    .unwrap();
    let address = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&address, &[]);
    let metadata = work.path().join("metadata.json");

    // Tagged push with Docker media types, annotations and the canonical name.
    let repo = format!("127.0.0.1:5000/kiln-test/exporter-{nonce:x}");
    let tagged = build(
        &address,
        &context,
        &format!(
            "type=image,name={repo}:v1,push=true,oci-mediatypes=false,name-canonical=true,\
             annotation.org.example.a=one,annotation-manifest.org.example.b=two"
        ),
        &metadata,
    );
    let digest = tagged["containerimage.digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        tagged["image.name"],
        format!("{repo}:v1,{repo}@{digest}"),
        "{tagged}"
    );
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{repo}:v1"),
    ])
    .success();
    let manifest: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    for layer in manifest["layers"].as_array().unwrap() {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    }
    assert_eq!(manifest["annotations"]["org.example.a"], "one");
    assert_eq!(manifest["annotations"]["org.example.b"], "two");
    // The canonical name reaches the same manifest.
    let by_digest = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{repo}@{digest}"),
    ])
    .success();
    assert_eq!(by_digest.stdout, raw.stdout);

    // push-by-digest into another repository: the manifest is there by digest, no tag is.
    let untagged = format!("127.0.0.1:5000/kiln-test/by-digest-{nonce:x}");
    let pushed = build(
        &address,
        &context,
        &format!(
            "type=image,name={untagged}:ignored,push=true,push-by-digest=true,oci-mediatypes=true"
        ),
        &metadata,
    );
    let digest = pushed["containerimage.digest"].as_str().unwrap();
    assert!(digest.starts_with("sha256:"), "{pushed}");
    let inspect = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{untagged}@{digest}"),
    ])
    .success();
    let manifest: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(
        manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "oci-mediatypes=true gives OCI media types"
    );
    assert!(manifest.get("annotations").is_none(), "{manifest}");
    let tags = run(Command::new("curl").args([
        "-s",
        &format!("http://127.0.0.1:5000/v2/kiln-test/by-digest-{nonce:x}/tags/list"),
    ]))
    .success();
    let tags: serde_json::Value = serde_json::from_str(&tags.stdout).unwrap();
    assert!(
        tags["tags"].as_array().is_none_or(|t| t.is_empty()),
        "push-by-digest pushed a tag: {tags}\nkilnd:\n{}",
        daemon.log_text()
    );
}
