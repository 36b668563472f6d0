//! Docker archive export, checked with skopeo (a tool we did not write).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::Command;

use kiln_image::archive::{self, write_docker_archive};
use kiln_image::content::ContentStore;
use kiln_image::oci::{
    media_types, Descriptor, History, ImageConfig, ImageManifest, RootFs, RuntimeConfig,
};
use kiln_image::reference::Reference;
use kiln_image::{layer, Digest};

/// A one-layer image built in `store`; returns its manifest descriptor and layer digest.
fn build_image(store: &ContentStore, work: &std::path::Path) -> (Descriptor, Digest) {
    let upper = work.join("upper");
    std::fs::create_dir_all(upper.join("app")).unwrap();
    std::fs::write(upper.join("app/hello.txt"), "hello from kiln\n").unwrap();
    let mut writer = store.writer().unwrap();
    let blob = layer::diff_upper(&upper, &mut writer).unwrap();
    writer.flush().unwrap();
    let (digest, size) = writer.commit(Some(&blob.digest)).unwrap();
    assert_eq!(size, blob.size);

    let config = ImageConfig {
        created: Some("2024-01-01T00:00:00Z".into()),
        architecture: "amd64".into(),
        os: "linux".into(),
        config: Some(RuntimeConfig {
            cmd: Some(vec!["/bin/sh".into()]),
            labels: Some(BTreeMap::from([("kiln.test".to_owned(), "yes".to_owned())])),
            ..Default::default()
        }),
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: vec![blob.diff_id.clone()],
        },
        history: vec![History {
            created_by: Some("COPY hello.txt /app/".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = store.write_blob(&config_bytes).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: Descriptor::new(
            media_types::OCI_CONFIG,
            config_digest,
            config_bytes.len() as u64,
        ),
        layers: vec![Descriptor::new(
            media_types::OCI_LAYER_GZIP,
            digest.clone(),
            size,
        )],
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = store.write_blob(&manifest_bytes).unwrap();
    (
        Descriptor::new(
            media_types::OCI_MANIFEST,
            manifest_digest,
            manifest_bytes.len() as u64,
        ),
        digest,
    )
}

fn skopeo_inspect(target: &str) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["inspect", target])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tar_files(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

#[test]
fn docker_archive_is_readable_by_skopeo_as_docker_and_oci() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path().join("content")).unwrap();
    let (manifest, layer_digest) = build_image(&store, tmp.path());
    let names = [
        Reference::parse_normalized("kiln-archive-test").unwrap(),
        Reference::parse_normalized("127.0.0.1:5000/kiln/archive:v1").unwrap(),
    ];
    let path = tmp.path().join("image.tar");
    let mut bytes = Vec::new();
    write_docker_archive(&mut bytes, &store, &manifest, &names).unwrap();
    std::fs::write(&path, &bytes).unwrap();

    // Same inputs, same bytes.
    let mut again = Vec::new();
    write_docker_archive(&mut again, &store, &manifest, &names).unwrap();
    assert_eq!(again, bytes);

    let files = tar_files(&bytes);
    assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
    assert!(files.contains_key(&format!("blobs/sha256/{}", manifest.digest.hex())));
    assert!(files.contains_key(&format!("blobs/sha256/{}", layer_digest.hex())));
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    let first = &index["manifests"][0];
    assert_eq!(first["digest"], manifest.digest.to_string());
    assert_eq!(
        first["annotations"][archive::ANNOTATION_IMAGE_NAME],
        "docker.io/library/kiln-archive-test:latest"
    );
    assert_eq!(first["annotations"][archive::ANNOTATION_REF_NAME], "latest");
    let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(
        docker[0]["RepoTags"],
        serde_json::json!(["kiln-archive-test:latest", "127.0.0.1:5000/kiln/archive:v1"])
    );
    assert_eq!(
        docker[0]["Layers"][0],
        format!("blobs/sha256/{}", layer_digest.hex())
    );

    let docker_view = skopeo_inspect(&format!("docker-archive:{}", path.display()));
    assert_eq!(docker_view["Architecture"], "amd64");
    assert_eq!(docker_view["Labels"]["kiln.test"], "yes");
    // docker-archive presents layers by their uncompressed digest (the diff id).
    let config: ImageConfig = serde_json::from_slice(
        &store
            .read(
                &serde_json::from_slice::<ImageManifest>(&store.read(&manifest.digest).unwrap())
                    .unwrap()
                    .config
                    .digest,
            )
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        docker_view["Layers"],
        serde_json::json!([config.rootfs.diff_ids[0].to_string()])
    );
    assert!(docker_view["RepoTags"].as_array().is_some());

    let oci_view = skopeo_inspect(&format!("oci-archive:{}:v1", path.display()));
    assert_eq!(oci_view["Digest"], manifest.digest.to_string());
    assert_eq!(
        oci_view["Layers"],
        serde_json::json!([layer_digest.to_string()])
    );
    assert_eq!(oci_view["Os"], "linux");
}

#[test]
fn archive_without_names_and_error_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path().join("content")).unwrap();
    let (manifest, layer_digest) = build_image(&store, tmp.path());

    let path = tmp.path().join("unnamed.tar");
    let mut bytes = Vec::new();
    write_docker_archive(&mut bytes, &store, &manifest, &[]).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let files = tar_files(&bytes);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert!(index["manifests"][0].get("annotations").is_none());
    let oci_view = skopeo_inspect(&format!("oci-archive:{}", path.display()));
    assert_eq!(oci_view["Digest"], manifest.digest.to_string());

    // A missing layer blob names its digest.
    store.delete(&layer_digest).unwrap();
    let err = write_docker_archive(Vec::new(), &store, &manifest, &[]).unwrap_err();
    assert!(err.to_string().contains(&layer_digest.to_string()), "{err}");

    // An index cannot go into a docker archive.
    let index = Descriptor::new(
        media_types::OCI_INDEX,
        manifest.digest.clone(),
        manifest.size,
    );
    let err = write_docker_archive(Vec::new(), &store, &index, &[]).unwrap_err();
    assert!(matches!(err, archive::Error::ManifestList { .. }), "{err}");
}

#[test]
fn oci_archive_has_buildkit_annotations_no_docker_manifest_and_unpacks_with_umoci() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path().join("content")).unwrap();
    let (manifest, _) = build_image(&store, tmp.path());
    let name = Reference::parse_normalized("127.0.0.1:5000/kiln/oci-test:v1").unwrap();
    let options = archive::ArchiveOptions {
        docker_manifest: false,
        created: Some("2024-01-01T00:00:00Z".into()),
    };
    let mut bytes = Vec::new();
    archive::write_archive(&mut bytes, &store, &manifest, &[name], &options).unwrap();
    let files = tar_files(&bytes);
    assert!(!files.contains_key("manifest.json"));
    assert!(files.contains_key("oci-layout"));
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let desc = &index["manifests"][0];
    assert_eq!(desc["digest"], manifest.digest.to_string());
    assert_eq!(desc["mediaType"], media_types::OCI_MANIFEST);
    let annotations = &desc["annotations"];
    assert_eq!(
        annotations[archive::ANNOTATION_CREATED],
        "2024-01-01T00:00:00Z"
    );
    assert_eq!(
        annotations[archive::ANNOTATION_IMAGE_NAME],
        "127.0.0.1:5000/kiln/oci-test:v1"
    );
    assert_eq!(annotations[archive::ANNOTATION_REF_NAME], "v1");

    let tar_path = tmp.path().join("image.tar");
    std::fs::write(&tar_path, &bytes).unwrap();
    let inspected = skopeo_inspect(&format!("oci-archive:{}", tar_path.display()));
    assert_eq!(inspected["Digest"], manifest.digest.to_string());

    // umoci reads the layout extracted from the tar.
    let layout = tmp.path().join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    tar::Archive::new(&bytes[..]).unpack(&layout).unwrap();
    let bundle = tmp.path().join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/app/hello.txt")).unwrap(),
        "hello from kiln\n"
    );
}
