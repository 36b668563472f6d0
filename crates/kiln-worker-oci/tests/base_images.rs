//! The OCI worker's read-only fallback for base images ([`BaseImageSource`]): an image the
//! registry (127.0.0.1:5000) does not have is resolved from the source, its blobs copied into the
//! worker's content store, and pulled as usual. Needs root (overlay whiteouts, runc cleanup).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageConfig, ImageManifest, Platform, RootFs};
use kiln_image::reference::Reference;
use kiln_image::registry::{HostConfig, RegistryHosts, ResolvedImage};
use kiln_image::Digest;
use kiln_worker::{Error, ProgressSink, Worker, LABEL_PREFIX};
use kiln_worker_oci::{BaseImageSource, OciWorker, OciWorkerConfig, BASE_IMAGES_LABEL};

const NAME: &str = "127.0.0.1:5000/kiln-only-in-the-source:latest";

/// An in-memory image store holding one image; counts blob reads.
#[derive(Debug)]
struct MemorySource {
    image: ResolvedImage,
    blobs: HashMap<Digest, Vec<u8>>,
    reads: Mutex<Vec<Digest>>,
}

#[async_trait]
impl BaseImageSource for MemorySource {
    fn describe(&self) -> String {
        "memory source".into()
    }

    async fn resolve(
        &self,
        reference: &Reference,
        _platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error> {
        Ok((reference == &self.image.reference).then(|| self.image.clone()))
    }

    async fn fetch_blob(&self, descriptor: &Descriptor, store: &ContentStore) -> Result<(), Error> {
        self.reads.lock().unwrap().push(descriptor.digest.clone());
        if !store.has(&descriptor.digest) {
            store.write_blob(&self.blobs[&descriptor.digest]).unwrap();
        }
        Ok(())
    }
}

fn layer_tar() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let data = b"from the source\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "hello", &data[..])
        .unwrap();
    builder.into_inner().unwrap()
}

fn memory_source() -> MemorySource {
    let layer = layer_tar();
    let diff_id = Digest::of(&layer);
    let config = ImageConfig {
        architecture: Platform::host().architecture,
        os: "linux".into(),
        rootfs: RootFs {
            diff_ids: vec![diff_id.clone()],
            ..Default::default()
        },
        ..Default::default()
    };
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: Descriptor::new(
            media_types::OCI_CONFIG,
            Digest::of(&config_bytes),
            config_bytes.len() as u64,
        ),
        layers: vec![Descriptor::new(
            media_types::OCI_LAYER,
            diff_id.clone(),
            layer.len() as u64,
        )],
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    MemorySource {
        image: ResolvedImage {
            reference: Reference::parse_normalized(NAME).unwrap(),
            manifest_digest: Digest::of(&manifest_bytes),
            manifest,
            manifest_bytes,
            config,
            config_bytes,
        },
        blobs: HashMap::from([(diff_id, layer)]),
        reads: Mutex::new(Vec::new()),
    }
}

struct NoProgress;

impl ProgressSink for NoProgress {
    fn log(&self, _stream: i64, _data: &[u8]) {}
    fn status(&self, _id: &str, _name: &str, _current: u64, _total: Option<u64>, _done: bool) {}
}

fn open(root: &std::path::Path) -> OciWorker {
    OciWorker::open(OciWorkerConfig {
        root: root.to_path_buf(),
        runc_binary: PathBuf::from("/usr/sbin/runc"),
        registry_hosts: RegistryHosts::new().with(
            "127.0.0.1:5000",
            HostConfig {
                http: true,
                insecure: false,
            },
        ),
        labels: BTreeMap::new(),
        platforms: None,
    })
    .unwrap()
}

#[tokio::test]
async fn falls_back_to_the_source_when_the_registry_fails() {
    let dir = tempfile::tempdir().unwrap();
    let reference = Reference::parse_normalized(NAME).unwrap();
    let platform = Platform::host();

    let plain = open(&dir.path().join("plain"));
    assert!(matches!(
        plain.resolve_image(&reference, &platform).await,
        Err(Error::Resolve { .. })
    ));
    assert!(!plain
        .labels()
        .contains_key(&format!("{LABEL_PREFIX}{BASE_IMAGES_LABEL}")));

    let source = Arc::new(memory_source());
    let worker = open(&dir.path().join("with-source")).with_base_images(source.clone());
    assert_eq!(
        worker
            .labels()
            .get(&format!("{LABEL_PREFIX}{BASE_IMAGES_LABEL}"))
            .map(String::as_str),
        Some("memory source")
    );
    let image = worker.resolve_image(&reference, &platform).await.unwrap();
    assert_eq!(image.manifest_digest, source.image.manifest_digest);
    // Manifest, config and layer are in the worker's own store now.
    let layer = &image.manifest.layers[0];
    for digest in [
        &image.manifest_digest,
        &image.manifest.config.digest,
        &layer.digest,
    ] {
        assert!(worker.content().has(digest), "{digest} was not copied");
    }
    assert_eq!(*source.reads.lock().unwrap(), vec![layer.digest.clone()]);

    let snapshot = worker.pull(&image, &NoProgress).await.unwrap().unwrap();
    let upper = worker.snapshot_upper(&snapshot).unwrap();
    assert_eq!(
        std::fs::read_to_string(upper.join("hello")).unwrap(),
        "from the source\n"
    );

    // What neither the registry nor the source has still fails as a resolve error.
    let missing = Reference::parse_normalized("127.0.0.1:5000/kiln-nowhere:latest").unwrap();
    assert!(matches!(
        worker.resolve_image(&missing, &platform).await,
        Err(Error::Resolve { .. })
    ));
    // An image the registry has does not touch the source.
    let busybox = Reference::parse_normalized("127.0.0.1:5000/busybox:latest").unwrap();
    worker.resolve_image(&busybox, &platform).await.unwrap();
    assert_eq!(source.reads.lock().unwrap().len(), 1);
}
