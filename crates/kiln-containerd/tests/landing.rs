//! Landing an image in the real containerd at /run/containerd/containerd.sock, checked with the
//! real `ctr`: import an OCI archive made by skopeo from 127.0.0.1:5000/busybox:latest, unpack it
//! into overlayfs, run it, import and unpack again (nothing new), tag, and name fallbacks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_containerd::{Containerd, Error, ImportOptions, Platform};

const SOCKET: &str = "/run/containerd/containerd.sock";
const SNAPSHOTTER: &str = "overlayfs";
const SOURCE: &str = "docker://127.0.0.1:5000/busybox:latest";

fn random() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A fresh containerd namespace whose images (and then the namespace) are removed on drop,
/// also when the test panics.
struct TestNamespace(String);

impl TestNamespace {
    fn new(prefix: &str) -> Self {
        TestNamespace(format!("kiln-test-{prefix}-{}", random()))
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let ns = &self.0;
        if let Ok(out) = Command::new("ctr")
            .args(["-n", ns, "images", "ls", "-q"])
            .output()
        {
            let names = String::from_utf8_lossy(&out.stdout).to_string();
            let names: Vec<&str> = names.lines().filter(|l| !l.is_empty()).collect();
            if !names.is_empty() {
                let _ = Command::new("ctr")
                    .args(["-n", ns, "images", "rm", "--sync"])
                    .args(&names)
                    .output();
            }
        }
        let _ = Command::new("ctr").args(["namespaces", "rm", ns]).output();
    }
}

fn ctr(args: &[&str]) -> String {
    let out = Command::new("ctr").args(args).output().expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `skopeo copy` of the busybox fixture into an OCI archive under `dir`.
fn skopeo_archive(dir: &Path) -> PathBuf {
    let archive = dir.join("b.tar");
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false", SOURCE])
        .arg(format!("oci-archive:{}:busybox", archive.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    archive
}

/// Entries of a tar as (path, bytes).
fn tar_entries(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut entries = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        entries.insert(name, data);
    }
    entries
}

fn write_tar(entries: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, &data[..]).unwrap();
    }
    builder.into_inner().unwrap()
}

#[tokio::test]
async fn import_unpack_run_and_reimport_busybox() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = skopeo_archive(tmp.path());
    let blob_count = tar_entries(&archive)
        .keys()
        .filter(|k| k.starts_with("blobs/sha256/"))
        .count();
    assert!(blob_count >= 3, "manifest, config and a layer expected");

    let ns = TestNamespace::new("land");
    let containerd = Containerd::connect(SOCKET).await.unwrap();

    // The UUID matches what ctr reports.
    let uuid = containerd.server_uuid().await.unwrap();
    assert!(!uuid.is_empty());
    assert!(
        ctr(&["version"]).contains(&uuid),
        "ctr version lacks {uuid}"
    );

    let name = format!("127.0.0.1:5000/kiln-test/busybox:{}", random());
    let options = ImportOptions::new(Some(name.clone()), Platform::host(), SNAPSHOTTER);
    let file = std::fs::File::open(&archive).unwrap();
    let report = containerd
        .import_archive_with_report(&ns.0, file, &options)
        .await
        .unwrap();
    assert_eq!(report.images.len(), 1);
    assert_eq!(report.images[0].name, name);
    // With containerd's shared content policy a blob another namespace holds (another test
    // running now) is linked, not sent: it counts as present.
    assert_eq!(report.blobs_written + report.blobs_present, blob_count);
    let image = report.images[0].clone();
    assert!(image.target.digest.starts_with("sha256:"));

    // The manifest carries the gc labels to its config and layer.
    let manifest_info = containerd
        .content_info(&ns.0, &image.target.digest)
        .await
        .unwrap()
        .expect("manifest in content store");
    assert!(manifest_info
        .labels
        .contains_key("containerd.io/gc.ref.content.config"));
    assert!(manifest_info
        .labels
        .contains_key("containerd.io/gc.ref.content.l.0"));

    let stats = containerd
        .unpack(&ns.0, &image, SNAPSHOTTER, &Platform::host())
        .await
        .unwrap();
    assert!(stats.layers_unpacked >= 1);
    assert_eq!(stats.layers_present, 0);
    let top = stats.top_chain_id.clone().expect("busybox has layers");
    assert!(containerd
        .snapshot_info(&ns.0, SNAPSHOTTER, &top)
        .await
        .unwrap()
        .is_some());

    // The real ctr sees the image and runs it.
    let listed = ctr(&["-n", &ns.0, "images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == name), "ctr images ls: {listed}");
    let container = format!("t{}", random());
    let output = ctr(&[
        "-n", &ns.0, "run", "--rm", &name, &container, "/bin/sh", "-c", "echo ok",
    ]);
    assert_eq!(output.trim(), "ok");

    // Importing and unpacking again lands nothing new.
    let file = std::fs::File::open(&archive).unwrap();
    let again = containerd
        .import_archive_with_report(&ns.0, file, &options)
        .await
        .unwrap();
    assert_eq!(again.blobs_written, 0);
    assert_eq!(again.blobs_present, blob_count);
    assert_eq!(again.images, vec![image.clone()]);
    let stats_again = containerd
        .unpack(&ns.0, &image, SNAPSHOTTER, &Platform::host())
        .await
        .unwrap();
    assert_eq!(stats_again.layers_unpacked, 0);
    assert_eq!(stats_again.layers_present, stats.layers_unpacked);
    assert_eq!(stats_again.top_chain_id, stats.top_chain_id);

    // Another namespace: content is namespaced in containerd's metadata (1.6 takes the bytes
    // again even where its shared store has them), and so are snapshots.
    let other = TestNamespace::new("other");
    let file = std::fs::File::open(&archive).unwrap();
    let shared = containerd
        .import_archive_with_report(&other.0, file, &options)
        .await
        .unwrap();
    assert_eq!(shared.blobs_written + shared.blobs_present, blob_count);
    let other_stats = containerd
        .unpack(&other.0, &shared.images[0], SNAPSHOTTER, &Platform::host())
        .await
        .unwrap();
    assert_eq!(other_stats.layers_unpacked, stats.layers_unpacked);
    let container = format!("t{}", random());
    let output = ctr(&["-n", &other.0, "run", "--rm", &name, &container, "true"]);
    assert!(output.is_empty(), "{output}");

    // The config blob points the gc at the snapshot; layers know their diff id.
    let check = ctr(&["-n", &ns.0, "images", "check"]);
    let line = check
        .lines()
        .find(|l| l.starts_with(&name))
        .expect("image in check");
    assert!(line.contains("complete"), "ctr images check: {check}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &containerd
            .read_blob(&ns.0, &image.target.digest)
            .await
            .unwrap(),
    )
    .unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    let config_info = containerd
        .content_info(&ns.0, config)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        config_info
            .labels
            .get("containerd.io/gc.ref.snapshot.overlayfs"),
        Some(&top)
    );
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let layer_info = containerd
        .content_info(&ns.0, layer)
        .await
        .unwrap()
        .unwrap();
    assert!(layer_info
        .labels
        .get("containerd.io/uncompressed")
        .is_some_and(|d| d.starts_with("sha256:")));

    // The import and unpack leases are gone.
    let leases = ctr(&["-n", &ns.0, "leases", "ls", "-q"]);
    assert!(leases.trim().is_empty(), "leftover leases: {leases}");

    // Tagging: a new name, then replacing an existing one.
    let second = format!("127.0.0.1:5000/kiln-test/second:{}", random());
    containerd.tag(&ns.0, &name, &second).await.unwrap();
    containerd.tag(&ns.0, &name, &second).await.unwrap();
    let names = containerd.image_names(&ns.0).await.unwrap();
    assert!(
        names.contains(&name) && names.contains(&second),
        "{names:?}"
    );
    let tagged = containerd.get_image(&ns.0, &second).await.unwrap().unwrap();
    assert_eq!(tagged.target.unwrap().digest, image.target.digest);
    let missing = containerd
        .tag(&ns.0, "127.0.0.1:5000/kiln-test/absent:1", &second)
        .await
        .unwrap_err();
    assert!(matches!(missing, Error::ImageNotFound { .. }), "{missing}");

    // A single-platform image refuses another platform (its config says linux/<host arch>).
    let error = containerd
        .unpack(
            &ns.0,
            &image,
            SNAPSHOTTER,
            &Platform::new("linux", "riscv64", None),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NoMatchingPlatform { .. }), "{error}");

    for n in [&name, &second] {
        containerd.delete_image(&ns.0, n).await.unwrap();
    }
    assert!(containerd.image_names(&ns.0).await.unwrap().is_empty());
}

#[tokio::test]
async fn names_come_from_annotation_or_digest_ref() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = skopeo_archive(tmp.path());
    let mut entries = tar_entries(&archive);
    let mut index: serde_json::Value = serde_json::from_slice(&entries["index.json"]).unwrap();
    let annotated = format!("127.0.0.1:5000/kiln-test/annotated:{}", random());
    let first = index["manifests"][0].clone();
    let digest = first["digest"].as_str().unwrap().to_string();
    // Two entries: one named by BuildKit's annotation, one without any name.
    let mut named = first.clone();
    named["annotations"] = serde_json::json!({ "io.containerd.image.name": annotated });
    let mut unnamed = first;
    unnamed["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "latest" });
    index["manifests"] = serde_json::json!([named, unnamed]);
    entries.insert("index.json".into(), serde_json::to_vec(&index).unwrap());
    // A docker manifest.json beside it, as BuildKit's docker exporter writes, is ignored.
    entries.insert("manifest.json".into(), b"[]".to_vec());
    let data = write_tar(&entries);

    let ns = TestNamespace::new("names");
    let containerd = Containerd::connect(SOCKET).await.unwrap();
    let options = ImportOptions::new(None, Platform::host(), SNAPSHOTTER);
    let images = containerd
        .import_archive(&ns.0, std::io::Cursor::new(data), &options)
        .await
        .unwrap();
    let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
    let digest_ref = format!("{SNAPSHOTTER}@{digest}");
    assert_eq!(names, vec![annotated.as_str(), digest_ref.as_str()]);
    let listed = containerd.image_names(&ns.0).await.unwrap();
    assert!(listed.contains(&annotated) && listed.contains(&digest_ref));
}

#[tokio::test]
async fn empty_archives_and_missing_sockets_fail_clearly() {
    let containerd = Containerd::connect(SOCKET).await.unwrap();
    let ns = TestNamespace::new("empty");
    let options = ImportOptions::new(None, Platform::host(), SNAPSHOTTER);

    let error = containerd
        .import_archive(&ns.0, std::io::empty(), &options)
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "no image was built");

    let mut entries = BTreeMap::new();
    entries.insert(
        "index.json".to_string(),
        br#"{"schemaVersion":2,"manifests":[]}"#.to_vec(),
    );
    entries.insert(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    let error = containerd
        .import_archive(&ns.0, std::io::Cursor::new(write_tar(&entries)), &options)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NoImage), "{error}");

    entries.remove("index.json");
    let error = containerd
        .import_archive(&ns.0, std::io::Cursor::new(write_tar(&entries)), &options)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::MissingIndex), "{error}");

    let error = Containerd::connect("/run/kiln-test-absent/containerd.sock")
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("/run/kiln-test-absent/containerd.sock"),
        "{error}"
    );
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// A multi-platform image whose host manifest stacks a 3 MiB uncompressed layer on busybox, in
/// an index that also names a manifest for another platform that the archive does not hold.
#[tokio::test]
async fn index_with_two_layers_reuses_the_base_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = skopeo_archive(tmp.path());
    let ns = TestNamespace::new("stack");
    let containerd = Containerd::connect(SOCKET).await.unwrap();
    let platform = Platform::host();

    // Busybox alone first: its layer's snapshot is then present for the stacked image.
    let base_name = format!("127.0.0.1:5000/kiln-test/base:{}", random());
    let options = ImportOptions::new(Some(base_name.clone()), platform.clone(), SNAPSHOTTER);
    let base = containerd
        .import_archive(&ns.0, std::fs::File::open(&archive).unwrap(), &options)
        .await
        .unwrap();
    let base_stats = containerd
        .unpack(&ns.0, &base[0], SNAPSHOTTER, &platform)
        .await
        .unwrap();
    assert_eq!(base_stats.layers_present, 0);

    let mut entries = tar_entries(&archive);
    let index: serde_json::Value = serde_json::from_slice(&entries["index.json"]).unwrap();
    let base_manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    let base_manifest: serde_json::Value =
        serde_json::from_slice(&entries[&blob_path(base_manifest_digest)]).unwrap();
    let base_config: serde_json::Value = serde_json::from_slice(
        &entries[&blob_path(base_manifest["config"]["digest"].as_str().unwrap())],
    )
    .unwrap();

    // An uncompressed layer holding /data/blob: 3 MiB, so Content.Write takes several messages.
    let payload: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut layer = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_cksum();
    layer.append_data(&mut dir, "data/", &[][..]).unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_size(payload.len() as u64);
    file.set_mode(0o644);
    file.set_cksum();
    layer
        .append_data(&mut file, "data/blob", &payload[..])
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_digest = sha256(&layer);

    let mut config = base_config.clone();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!(layer_digest));
    config["history"] = serde_json::json!([]);
    let config = serde_json::to_vec(&config).unwrap();
    let mut manifest = base_manifest.clone();
    manifest["config"]["digest"] = serde_json::json!(sha256(&config));
    manifest["config"]["size"] = serde_json::json!(config.len());
    manifest["layers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }));
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let other_arch = if platform.architecture == "s390x" {
        "amd64"
    } else {
        "s390x"
    };
    let image_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{}", "e".repeat(64)),
                "size": 100,
                "platform": {"os": "linux", "architecture": other_arch},
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(&manifest),
                "size": manifest.len(),
                "platform": {"os": platform.os, "architecture": platform.architecture},
            },
        ],
    }))
    .unwrap();
    let name = format!("127.0.0.1:5000/kiln-test/stacked:{}", random());
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": sha256(&image_index),
            "size": image_index.len(),
            "annotations": {"io.containerd.image.name": name},
        }],
    });
    entries.insert("index.json".into(), serde_json::to_vec(&top).unwrap());
    for blob in [&layer, &config, &manifest, &image_index] {
        entries.insert(blob_path(&sha256(blob)), blob.clone());
    }

    let options = ImportOptions::new(None, platform.clone(), SNAPSHOTTER);
    let report = containerd
        .import_archive_with_report(&ns.0, std::io::Cursor::new(write_tar(&entries)), &options)
        .await
        .unwrap();
    assert_eq!(report.images.len(), 1);
    assert_eq!(report.images[0].name, name);
    assert_eq!(report.blobs_written, 4, "layer, config, manifest, index");
    let index_info = containerd
        .content_info(&ns.0, &report.images[0].target.digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        index_info.labels.get("containerd.io/gc.ref.content.m.0"),
        Some(&sha256(&manifest)),
        "only the host manifest is referenced: {:?}",
        index_info.labels
    );
    assert!(!index_info
        .labels
        .contains_key("containerd.io/gc.ref.content.m.1"));
    let layer_info = containerd
        .content_info(&ns.0, &layer_digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(layer_info.size, layer.len() as i64);

    let stats = containerd
        .unpack(&ns.0, &report.images[0], SNAPSHOTTER, &platform)
        .await
        .unwrap();
    assert_eq!(stats.manifest.digest, sha256(&manifest));
    assert_eq!(stats.layers_present, base_stats.layers_unpacked);
    assert_eq!(stats.layers_unpacked, 1);

    let container = format!("t{}", random());
    let output = ctr(&[
        "-n",
        &ns.0,
        "run",
        "--rm",
        &name,
        &container,
        "/bin/sh",
        "-c",
        "wc -c < /data/blob; echo ok",
    ]);
    let lines: Vec<&str> = output.split_whitespace().collect();
    assert_eq!(lines, vec![(3u32 << 20).to_string().as_str(), "ok"]);

    // Asking for a platform the index lacks fails clearly.
    let other = Platform::new("linux", "riscv64", None);
    let error = containerd
        .unpack(&ns.0, &report.images[0], SNAPSHOTTER, &other)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no manifest for platform linux/riscv64"),
        "{error}"
    );
}
