//! Pushes to the registry running on 127.0.0.1:5000 (plain http through the loopback fallback):
//! blobs skipped when present, base layers mounted from the repository they were pulled from,
//! the manifest readable by `skopeo` under the digest kiln computed.

use std::process::Command;

use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageConfig, ImageManifest, Platform, RootFs};
use kiln_image::reference::Reference;
use kiln_image::registry::{BlobPush, PushOptions, RegistryHosts, Resolver};
use kiln_image::Digest;

const BUSYBOX: &str = "127.0.0.1:5000/busybox:latest";

fn unique_repo(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "127.0.0.1:5000/kiln-test/{prefix}-{}-{nanos}",
        std::process::id()
    )
}

fn skopeo_digest(image: &str) -> String {
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--no-tags",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
        ])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Pulls busybox into `store` and writes an image on top of it with one new (fake) layer.
async fn image_on_busybox(resolver: &Resolver, store: &ContentStore, salt: &str) -> Descriptor {
    let base_ref = Reference::parse_normalized(BUSYBOX).unwrap();
    let base = resolver
        .resolve(&base_ref, &Platform::host())
        .await
        .unwrap();
    for layer in &base.manifest.layers {
        resolver.fetch_blob(&base_ref, layer, store).await.unwrap();
    }
    let layer_bytes = format!("not really a tar {salt}").into_bytes();
    let layer_digest = store.write_blob(&layer_bytes).unwrap();
    let mut config: ImageConfig = base.config.clone();
    let mut diff_ids = config.rootfs.diff_ids.clone();
    diff_ids.push(layer_digest.clone());
    config.rootfs = RootFs {
        kind: "layers".into(),
        diff_ids,
    };
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = store.write_blob(&config_bytes).unwrap();
    let mut layers = base.manifest.layers.clone();
    layers.push(Descriptor::new(
        media_types::OCI_LAYER,
        layer_digest,
        layer_bytes.len() as u64,
    ));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: Descriptor::new(
            media_types::OCI_CONFIG,
            config_digest,
            config_bytes.len() as u64,
        ),
        layers,
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = store.write_blob(&bytes).unwrap();
    Descriptor::new(media_types::OCI_MANIFEST, digest, bytes.len() as u64)
}

#[tokio::test]
async fn push_mounts_base_layers_uploads_new_ones_and_skips_everything_the_second_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    let resolver = Resolver::new(RegistryHosts::new()).unwrap();
    let manifest = image_on_busybox(&resolver, &store, "push-test").await;
    let base_layers = {
        let m: ImageManifest =
            serde_json::from_slice(&store.read(&manifest.digest).unwrap()).unwrap();
        m.layers.len() - 1
    };

    let repo = unique_repo("push");
    let target = Reference::parse_normalized(&format!("{repo}:v1")).unwrap();
    let report = resolver
        .push_image(&target, &manifest, &store)
        .await
        .unwrap();
    assert_eq!(report.digest, manifest.digest);
    // busybox's layers came from 127.0.0.1:5000/busybox: mounted, not uploaded.
    assert_eq!(report.count(BlobPush::Mounted), base_layers, "{report:?}");
    // The new layer and the config.
    assert_eq!(report.count(BlobPush::Uploaded), 2, "{report:?}");
    assert_eq!(
        skopeo_digest(&format!("{repo}:v1")),
        manifest.digest.to_string()
    );

    // Second push of the same image under another tag: no blob moves.
    let again = Reference::parse_normalized(&format!("{repo}:v2")).unwrap();
    let report = resolver
        .push_image(&again, &manifest, &store)
        .await
        .unwrap();
    assert_eq!(report.count(BlobPush::Uploaded), 0, "{report:?}");
    assert_eq!(report.count(BlobPush::Mounted), 0, "{report:?}");
    assert_eq!(report.count(BlobPush::Existing), base_layers + 2);
    assert_eq!(
        skopeo_digest(&format!("{repo}:v2")),
        manifest.digest.to_string()
    );

    // The store now knows the pushed repository as a source too: a push to a third repository
    // mounts everything.
    let other = unique_repo("push-mount");
    let third = Reference::parse_normalized(&format!("{other}:v1")).unwrap();
    let report = resolver
        .push_image(&third, &manifest, &store)
        .await
        .unwrap();
    assert_eq!(report.count(BlobPush::Uploaded), 0, "{report:?}");
    assert_eq!(
        report.count(BlobPush::Mounted),
        base_layers + 2,
        "{report:?}"
    );
}

#[tokio::test]
async fn push_by_digest_has_no_tag_and_checks_the_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    let resolver = Resolver::new(RegistryHosts::new()).unwrap();
    let manifest = image_on_busybox(&resolver, &store, "by-digest").await;
    let repo = unique_repo("digest");
    let by_digest = Reference::parse_normalized(&format!("{repo}@{}", manifest.digest)).unwrap();
    assert_eq!(by_digest.tag(), None);
    resolver
        .push_image(&by_digest, &manifest, &store)
        .await
        .unwrap();
    assert_eq!(
        skopeo_digest(&format!("{repo}@{}", manifest.digest)),
        manifest.digest.to_string()
    );

    let wrong = Reference::parse_normalized(&format!("{repo}@{}", Digest::of(b"x"))).unwrap();
    let err = resolver
        .push_image(&wrong, &manifest, &store)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
}

#[tokio::test]
async fn chunked_push_of_a_blob_larger_than_a_chunk_arrives_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    // 1 MiB chunks: the 3.5 MiB layer goes in four PATCHes and a closing PUT.
    let resolver = Resolver::with_push_options(
        RegistryHosts::new(),
        PushOptions {
            chunk_size: 1 << 20,
            ..PushOptions::default()
        },
    )
    .unwrap();
    let mut x: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let layer: Vec<u8> = (0..(7 << 19))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let layer_digest = store.write_blob(&layer).unwrap();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = store.write_blob(config).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: Descriptor::new(media_types::OCI_CONFIG, config_digest, config.len() as u64),
        layers: vec![Descriptor::new(
            media_types::OCI_LAYER,
            layer_digest.clone(),
            layer.len() as u64,
        )],
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_desc = Descriptor::new(
        media_types::OCI_MANIFEST,
        store.write_blob(&bytes).unwrap(),
        bytes.len() as u64,
    );

    let repo = unique_repo("chunked");
    let target = Reference::parse_normalized(&format!("{repo}:v1")).unwrap();
    let report = resolver
        .push_image(&target, &manifest_desc, &store)
        .await
        .unwrap();
    assert_eq!(report.count(BlobPush::Uploaded), 2, "{report:?}");
    assert_eq!(
        skopeo_digest(&format!("{repo}:v1")),
        manifest_desc.digest.to_string()
    );
    // The registry serves the layer back with the same bytes (fetch_blob checks the digest).
    let fetched = tempfile::tempdir().unwrap();
    let fetched = ContentStore::open(fetched.path()).unwrap();
    resolver
        .fetch_blob(&target, &manifest.layers[0], &fetched)
        .await
        .unwrap();
    assert_eq!(fetched.read(&layer_digest).unwrap(), layer);
}
