//! The containerd worker against the real containerd (/run/containerd/containerd.sock), runc
//! and the registry at 127.0.0.1:5000, each test in its own namespace removed at the end.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

use kiln_image::oci::{media_types, Descriptor, ImageManifest, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_image::Digest;
use kiln_proto::pb;
use kiln_worker::{NoProgress, Worker, LABEL_PREFIX};
use kiln_worker_containerd::{ContainerdWorker, ContainerdWorkerConfig};

const SOCKET: &str = "/run/containerd/containerd.sock";
const BUSYBOX: &str = "127.0.0.1:5000/busybox:latest";

fn ctr(namespace: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ctr")
        .arg("-n")
        .arg(namespace)
        .args(args)
        .output()
        .expect("run ctr");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn quiet_list(namespace: &str, what: &[&str]) -> Vec<String> {
    let mut args = what.to_vec();
    args.push("-q");
    ctr(namespace, &args)
        .1
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Removes everything in the namespace, then the namespace, also when the test panics.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let ns = self.0.as_str();
        for image in quiet_list(ns, &["images", "ls"]) {
            ctr(ns, &["images", "rm", "--sync", &image]);
        }
        for lease in quiet_list(ns, &["leases", "ls"]) {
            ctr(ns, &["leases", "rm", "--sync", &lease]);
        }
        // Children before parents: repeat until nothing is left.
        for _ in 0..20 {
            let names: Vec<String> = ctr(ns, &["snapshots", "ls"])
                .1
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect();
            if names.is_empty() {
                break;
            }
            for name in names {
                ctr(ns, &["snapshots", "rm", &name]);
            }
        }
        for blob in quiet_list(ns, &["content", "ls"]) {
            ctr(ns, &["content", "rm", &blob]);
        }
        let _ = Command::new("ctr").args(["namespaces", "rm", ns]).output();
    }
}

fn config(root: &std::path::Path, namespace: &str) -> ContainerdWorkerConfig {
    ContainerdWorkerConfig {
        root: root.to_path_buf(),
        address: SOCKET.into(),
        namespace: namespace.into(),
        snapshotter: "overlayfs".into(),
        runc_binary: "runc".into(),
        rootless: false,
        registry_hosts: RegistryHosts::new().with(
            "127.0.0.1:5000",
            HostConfig {
                http: true,
                insecure: false,
            },
        ),
        labels: BTreeMap::from([("custom".to_string(), "yes".to_string())]),
        platforms: None,
    }
}

fn exec_op(script: &str) -> pb::ExecOp {
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts: vec![pb::Mount {
            input: 0,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

fn server_uuid() -> String {
    let out = Command::new("ctr")
        .arg("version")
        .output()
        .expect("ctr version");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("UUID:").map(|u| u.trim().to_string()))
        .expect("ctr version shows the server uuid")
}

/// Files of a gzip layer.
fn layer_files(blob: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        files.insert(path, data);
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_exec_export_name_unpack_and_run() {
    let ns = Namespace(unique("kiln-ctrdw-test"));
    let root = tempfile::tempdir().unwrap();
    let worker = ContainerdWorker::open(config(root.path(), &ns.0))
        .await
        .unwrap();

    // Labels.
    let labels = worker.labels();
    let label = |k: &str| labels.get(&format!("{LABEL_PREFIX}{k}")).cloned();
    assert_eq!(label("executor").as_deref(), Some("containerd"));
    assert_eq!(label("snapshotter").as_deref(), Some("overlayfs"));
    assert_eq!(
        label("containerd.namespace").as_deref(),
        Some(ns.0.as_str())
    );
    assert_eq!(label("containerd.uuid"), Some(server_uuid()));
    assert_eq!(labels.get("custom").map(String::as_str), Some("yes"));
    assert!(root.path().join("containerd-overlayfs/workerid").is_file());

    // Pull: snapshots named by chain id, visible to ctr.
    let platform = Platform::host();
    let busybox = Reference::parse_normalized(BUSYBOX).unwrap();
    let image = worker.resolve_image(&busybox, &platform).await.unwrap();
    let base = worker.pull(&image, &NoProgress).await.unwrap().unwrap();
    let mut chain: Option<Digest> = None;
    for diff_id in &image.config.rootfs.diff_ids {
        chain = Some(match chain {
            None => diff_id.clone(),
            Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
        });
    }
    assert_eq!(base, chain.unwrap().to_string());
    let (ok, listing) = ctr(&ns.0, &["snapshots", "ls"]);
    assert!(ok, "{listing}");
    assert!(listing.contains(&base), "{listing}");
    assert!(worker.exists(&base));

    // Exec.
    let out = worker
        .exec(
            &exec_op("echo hi > /hi"),
            &[Some(base.clone())],
            &NoProgress,
        )
        .await
        .unwrap();
    let top = out[0].clone().unwrap();
    assert_ne!(top, base);
    let view = worker.snapshot_path(&top).await.unwrap();
    assert_eq!(std::fs::read(view.path().join("hi")).unwrap(), b"hi\n");
    drop(view);

    // Layers: blobs in the local store, hashes right, the top one holds /hi only.
    let layers = worker.layers(&top).await.unwrap();
    assert_eq!(layers.len(), image.manifest.layers.len() + 1);
    for (layer, pulled) in layers.iter().zip(&image.manifest.layers) {
        assert_eq!(layer.descriptor.digest, pulled.digest);
    }
    for layer in &layers {
        let blob = worker.content().read(&layer.descriptor.digest).unwrap();
        assert_eq!(Digest::of(&blob), layer.descriptor.digest);
        assert_eq!(blob.len() as u64, layer.descriptor.size);
    }
    let last = layers.last().unwrap();
    let blob = worker.content().read(&last.descriptor.digest).unwrap();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(blob.as_slice())
        .read_to_end(&mut raw)
        .unwrap();
    assert_eq!(Digest::of(&raw), last.diff_id);
    let files = layer_files(&blob);
    assert_eq!(files.get("hi").map(Vec::as_slice), Some(&b"hi\n"[..]));
    // Compressed once: asking again gives the same blob.
    assert_eq!(worker.layers(&top).await.unwrap(), layers);

    // Image: config + manifest into the local store, then named and unpacked in containerd.
    let mut image_config = image.config.clone();
    image_config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config_bytes = serde_json::to_vec(&image_config).unwrap();
    let config_digest = worker.content().write_blob(&config_bytes).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: Descriptor::new(
            media_types::OCI_CONFIG,
            config_digest,
            config_bytes.len() as u64,
        ),
        layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = worker.content().write_blob(&manifest_bytes).unwrap();
    let manifest_descriptor = Descriptor::new(
        media_types::OCI_MANIFEST,
        manifest_digest,
        manifest_bytes.len() as u64,
    );
    let name = format!("docker.io/library/{}:latest", unique("kiln-ctrdw-built"));
    let store = worker
        .image_store()
        .expect("containerd worker has an image store");
    store
        .create_image(&name, &manifest_descriptor, worker.content())
        .await
        .unwrap();
    store.unpack(&name, &platform).await.unwrap();
    let (ok, text) = ctr(&ns.0, &["run", "--rm", &name, &unique("t"), "cat", "/hi"]);
    assert!(ok, "{text}");
    assert_eq!(text.trim(), "hi");
    // The image resolves locally to the manifest just named.
    let local = store
        .resolve_local(&Reference::parse_normalized(&name).unwrap(), &platform)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(local.manifest_digest, manifest_descriptor.digest);

    // Only our own lease was made; nothing else in the namespace was removed.
    assert_eq!(
        quiet_list(&ns.0, &["leases", "ls"]),
        vec![worker.lease().to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_only_in_containerd_resolves_locally_and_builds() {
    let ns = Namespace(unique("kiln-ctrdw-test"));
    let root = tempfile::tempdir().unwrap();

    // An image the registry does not have, imported into the namespace only.
    let archive = root.path().join("busybox.tar");
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{BUSYBOX}"))
        .arg(format!("oci-archive:{}", archive.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = format!("127.0.0.1:5000/{}:latest", unique("kiln-only-local"));
    let containerd = kiln_containerd::Containerd::connect(SOCKET).await.unwrap();
    let imported = containerd
        .import_archive(
            &ns.0,
            std::fs::File::open(&archive).unwrap(),
            &kiln_containerd::ImportOptions::new(
                Some(name.clone()),
                kiln_containerd::Platform::host(),
                "overlayfs",
            ),
        )
        .await
        .unwrap();
    assert_eq!(imported[0].name, name);

    let worker = ContainerdWorker::open(config(root.path(), &ns.0))
        .await
        .unwrap();
    let platform = Platform::host();
    let reference = Reference::parse_normalized(&name).unwrap();
    let image = worker.resolve_image(&reference, &platform).await.unwrap();
    assert_eq!(image.reference, reference);
    assert!(!image.manifest.layers.is_empty());

    let base = worker.pull(&image, &NoProgress).await.unwrap().unwrap();
    let out = worker
        .exec(
            &exec_op("test -x /bin/busybox && echo built > /built"),
            &[Some(base)],
            &NoProgress,
        )
        .await
        .unwrap();
    let view = worker
        .snapshot_path(out[0].as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(view.path().join("built")).unwrap(),
        b"built\n"
    );

    // A name neither the registry nor containerd has fails with the resolve error.
    let missing =
        Reference::parse_normalized(&format!("127.0.0.1:5000/{}:latest", unique("kiln-nowhere")))
            .unwrap();
    let err = worker.resolve_image(&missing, &platform).await.unwrap_err();
    assert!(matches!(err, kiln_worker::Error::Resolve { .. }), "{err:?}");
}
