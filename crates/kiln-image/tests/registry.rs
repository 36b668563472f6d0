//! Registry pulls: against the registry running on 127.0.0.1:5000 (plain http, reached through
//! the loopback https → http fallback) and against an in-process fake registry that demands
//! anonymous bearer tokens and serves a multi-platform index.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageConfig, ImageIndex, ImageManifest, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::{Error, HostConfig, RegistryHosts, Resolver};
use kiln_image::{layer, Digest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const BUSYBOX: &str = "127.0.0.1:5000/busybox:latest";

#[tokio::test]
async fn resolves_and_pulls_busybox_from_the_local_registry() {
    let resolver = Resolver::new(RegistryHosts::new()).unwrap();
    let reference = Reference::parse_normalized(BUSYBOX).unwrap();
    let image = resolver
        .resolve(&reference, &Platform::host())
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, Digest::of(&image.manifest_bytes));
    assert_eq!(
        image.manifest.config.digest,
        Digest::of(&image.config_bytes)
    );
    assert_eq!(image.config.os, "linux");
    assert!(!image.manifest.layers.is_empty());
    assert_eq!(
        image.config.rootfs.diff_ids.len(),
        image.manifest.layers.len()
    );

    // Pinned by digest gives the same manifest.
    let pinned = reference.with_digest(image.manifest_digest.clone());
    let again = resolver.resolve(&pinned, &Platform::host()).await.unwrap();
    assert_eq!(again.manifest_bytes, image.manifest_bytes);

    // Pull the layers and unpack them; diff ids must match the config.
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path().join("content")).unwrap();
    for (layer_desc, diff_id) in image
        .manifest
        .layers
        .iter()
        .zip(&image.config.rootfs.diff_ids)
    {
        resolver
            .fetch_blob(&reference, layer_desc, &store)
            .await
            .unwrap();
        assert!(store.has(&layer_desc.digest));
        assert_eq!(store.info(&layer_desc.digest).unwrap(), layer_desc.size);
        // Present: skipped without error.
        resolver
            .fetch_blob(&reference, layer_desc, &store)
            .await
            .unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        let applied = layer::apply(store.open_blob(&layer_desc.digest).unwrap(), &rootfs).unwrap();
        assert_eq!(&applied.diff_id, diff_id);
        assert!(rootfs.join("bin/busybox").is_file());
    }
}

#[tokio::test]
async fn missing_tag_and_wrong_blob_errors_name_reference_and_status() {
    let resolver = Resolver::new(RegistryHosts::new()).unwrap();
    let reference = Reference::parse_normalized("127.0.0.1:5000/busybox:no-such-tag").unwrap();
    let err = resolver
        .resolve(&reference, &Platform::host())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Status { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:5000/busybox:no-such-tag"),
        "{text}"
    );
    assert!(text.contains("404"), "{text}");

    // A descriptor whose digest the registry does not have.
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    let desc = Descriptor::new(media_types::OCI_LAYER_GZIP, Digest::of(b"nope"), 4);
    let reference = Reference::parse_normalized(BUSYBOX).unwrap();
    let err = resolver
        .fetch_blob(&reference, &desc, &store)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert!(!store.has(&desc.digest));
}

/// A fake registry: bearer token auth, one index with two platforms, blobs by digest.
struct Fake {
    port: u16,
    token_requests: Arc<AtomicUsize>,
    amd64_manifest: Digest,
    arm64_manifest: Digest,
    layer: Descriptor,
    bad_layer: Descriptor,
}

async fn start_fake() -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut docs: HashMap<String, (String, Vec<u8>)> = HashMap::new();
    let mut manifest_for = |arch: &str| {
        let config = ImageConfig {
            architecture: arch.to_owned(),
            os: "linux".to_owned(),
            ..Default::default()
        };
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_desc = Descriptor::new(
            media_types::OCI_CONFIG,
            Digest::of(&config_bytes),
            config_bytes.len() as u64,
        );
        docs.insert(
            format!("/v2/multi/img/blobs/{}", config_desc.digest),
            ("application/octet-stream".into(), config_bytes),
        );
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.into()),
            config: config_desc,
            layers: vec![],
            annotations: None,
        };
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let digest = Digest::of(&bytes);
        docs.insert(
            format!("/v2/multi/img/manifests/{digest}"),
            (media_types::OCI_MANIFEST.into(), bytes.clone()),
        );
        let mut desc = Descriptor::new(
            media_types::OCI_MANIFEST,
            digest.clone(),
            bytes.len() as u64,
        );
        desc.platform = Some(Platform::new("linux", arch, None));
        (digest, desc)
    };
    let (amd64_manifest, amd64) = manifest_for("amd64");
    let (arm64_manifest, arm64) = manifest_for("arm64");
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(media_types::OCI_INDEX.into()),
        manifests: vec![amd64, arm64],
        annotations: None,
    };
    // Served with a generic content type: the body's mediaType must win.
    docs.insert(
        "/v2/multi/img/manifests/latest".into(),
        (
            "application/json".into(),
            serde_json::to_vec(&index).unwrap(),
        ),
    );
    let layer_bytes = b"layer bytes".to_vec();
    let layer = Descriptor::new(
        media_types::OCI_LAYER_GZIP,
        Digest::of(&layer_bytes),
        layer_bytes.len() as u64,
    );
    docs.insert(
        format!("/v2/multi/img/blobs/{}", layer.digest),
        ("application/octet-stream".into(), layer_bytes),
    );
    // A blob whose bytes do not match its digest.
    let bad_layer = Descriptor::new(media_types::OCI_LAYER_GZIP, Digest::of(b"other bytes"), 11);
    docs.insert(
        format!("/v2/multi/img/blobs/{}", bad_layer.digest),
        ("application/octet-stream".into(), b"tampered!!!".to_vec()),
    );

    let token_requests = Arc::new(AtomicUsize::new(0));
    let counter = token_requests.clone();
    let docs = Arc::new(docs);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let docs = docs.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                let authorized = head
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case("authorization: bearer fake-token"));
                let (status, extra, content_type, body) = if target.starts_with("/token?") {
                    counter.fetch_add(1, Ordering::SeqCst);
                    assert!(
                        target.contains("scope=repository%3Amulti%2Fimg%3Apull"),
                        "{target}"
                    );
                    assert!(target.contains("service=fake"), "{target}");
                    (
                        "200 OK",
                        String::new(),
                        "application/json".to_owned(),
                        br#"{"token":"fake-token"}"#.to_vec(),
                    )
                } else if !authorized {
                    let challenge = format!(
                        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:multi/img:pull\"\r\n"
                    );
                    (
                        "401 Unauthorized",
                        challenge,
                        "application/json".to_owned(),
                        b"{}".to_vec(),
                    )
                } else if let Some((ct, body)) = docs.get(&target) {
                    ("200 OK", String::new(), ct.clone(), body.clone())
                } else {
                    (
                        "404 Not Found",
                        String::new(),
                        "application/json".to_owned(),
                        b"{}".to_vec(),
                    )
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Fake {
        port,
        token_requests,
        amd64_manifest,
        arm64_manifest,
        layer,
        bad_layer,
    }
}

fn fake_resolver(port: u16) -> Resolver {
    let hosts = RegistryHosts::new().with(
        format!("127.0.0.1:{port}"),
        HostConfig {
            http: true,
            insecure: false,
        },
    );
    Resolver::new(hosts).unwrap()
}

#[tokio::test]
async fn bearer_token_auth_and_platform_selection_in_an_index() {
    let fake = start_fake().await;
    let resolver = fake_resolver(fake.port);
    let reference =
        Reference::parse_normalized(&format!("127.0.0.1:{}/multi/img", fake.port)).unwrap();

    let arm = resolver
        .resolve(&reference, &Platform::new("linux", "arm64", Some("v8")))
        .await
        .unwrap();
    assert_eq!(arm.manifest_digest, fake.arm64_manifest);
    assert_eq!(arm.config.architecture, "arm64");
    let amd = resolver
        .resolve(&reference, &Platform::new("linux", "x86_64", None))
        .await
        .unwrap();
    assert_eq!(amd.manifest_digest, fake.amd64_manifest);
    assert_eq!(amd.config.architecture, "amd64");
    // The token is cached per host and scope.
    assert_eq!(fake.token_requests.load(Ordering::SeqCst), 1);

    let err = resolver
        .resolve(&reference, &Platform::new("linux", "s390x", None))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{text}");
    assert!(text.contains("linux/s390x"), "{text}");
    assert!(text.contains("linux/arm64"), "{text}");

    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    resolver
        .fetch_blob(&reference, &fake.layer, &store)
        .await
        .unwrap();
    assert_eq!(store.read(&fake.layer.digest).unwrap(), b"layer bytes");
    let err = resolver
        .fetch_blob(&reference, &fake.bad_layer, &store)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(!store.has(&fake.bad_layer.digest));
    assert_eq!(
        std::fs::read_dir(tmp.path().join("ingest"))
            .unwrap()
            .count(),
        0
    );

    // A digest-pinned reference whose manifest does not hash to the pin is refused.
    let wrong = reference.with_digest(Digest::of(b"x"));
    assert!(resolver.resolve(&wrong, &Platform::host()).await.is_err());
}
