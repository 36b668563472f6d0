//! kiln's containerd worker: BuildKit's containerd worker, with snapshots, blobs and images kept
//! in a real containerd, in one namespace, through containerd's gRPC API.
//!
//! [`ContainerdWorker`] (opened with [`ContainerdWorkerConfig`]) keeps:
//! - **snapshots** in containerd's snapshotter (`overlayfs` or `native`) in the worker's
//!   namespace. Pulled layers are committed under their chain id (`sha256:…`), as containerd's
//!   own unpacker does, so an image unpacked by `kiln`/`ctr`/`nerdctl` in that namespace is
//!   reused as is; snapshots of `exec`/`file` are committed as `kiln-<hex>`. Everything the
//!   worker creates carries its lease (`kiln-worker-<worker id>`, no expiry), which keeps it from
//!   containerd's garbage collector; active snapshots are `kiln-active-*` keys and are the only
//!   thing the worker ever removes (crash leftovers at open, failed ops).
//! - **blobs** in containerd's content store (pulled layers, exported layers); layers are applied
//!   and computed with containerd's `Diff` service (`Apply`, `Diff`). [`Worker::content`] must
//!   be a local store (the exporter reads it), so `layers` also copies the blobs it returns into
//!   `<root>/containerd-<snapshotter>/content/` — a disk copy, to be replaced when exporters can
//!   read containerd's content directly.
//! - **images** in containerd's image service: the worker is an [`ImageStore`] (name, unpack,
//!   resolve local images).
//!
//! `exec` and `file` reuse the OCI worker's engine ([`kiln_worker_oci::Executor`],
//! [`kiln_worker_oci::run_file_op`]) over containerd snapshots mounted on the host.
//!
//! **Base image resolution** follows BuildKit's `default` resolve mode: the registry first, and
//! the image in the worker's namespace only when the registry lookup fails. So `FROM foo` where
//! `foo` exists only in containerd (built earlier by `kiln build -t foo`) works without any
//! registry answering for it, while an image that exists in both is refreshed from the registry.
//! Callers wanting `local` or `pull` modes use [`ImageStore::resolve_local`] or the registry
//! directly.
//!
//! [`ContainerdImageSource`] is the read-only side on its own: the OCI worker's opt-in fallback
//! for base images kept in a containerd namespace (`kilnd --oci-worker-containerd-images`).
//!
//! The worker's containerd calls from synchronous code use `block_in_place`: run it on tokio's
//! multi-thread runtime.

mod api;
mod db;
mod mounts;
mod source;
mod trees;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kiln_containerd::{Containerd, ImportedImage};
use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageIndex, ImageManifest, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::{RegistryHosts, ResolvedImage, Resolver};
use kiln_image::Digest;
use kiln_proto::pb;
use kiln_worker::{
    Error, ImageStore, Layer, ProgressSink, SnapshotId, SnapshotView, Worker, LABEL_PREFIX,
};
use kiln_worker_oci::Executor;

pub use crate::source::ContainerdImageSource;

use crate::api::{backend, local, random_hex, Api};
use crate::db::{LayerDb, LayerRecord};
use crate::trees::{block, CtrdTrees, ACTIVE_PREFIX};

/// How to open a [`ContainerdWorker`].
#[derive(Debug, Clone)]
pub struct ContainerdWorkerConfig {
    /// The daemon root (`kilnd --root`); the worker's local state lives in
    /// `<root>/containerd-<snapshotter>/`.
    pub root: PathBuf,
    /// containerd's socket (`/run/containerd/containerd.sock`, `unix://` prefix allowed).
    pub address: String,
    /// The containerd namespace (BuildKit's default is `buildkit`).
    pub namespace: String,
    /// The containerd snapshotter: `overlayfs` or `native`.
    pub snapshotter: String,
    /// The runc binary.
    pub runc_binary: PathBuf,
    /// Rootless containers: kilnd runs as the mapped root of rootless containerd's user
    /// namespace, so runc gets `--rootless true` and specs carry no cgroup settings.
    pub rootless: bool,
    /// Per-registry settings (plain HTTP, skip TLS verification).
    pub registry_hosts: RegistryHosts,
    /// Extra worker labels, merged over the built-in ones.
    pub labels: BTreeMap<String, String>,
    /// Supported platforms; `None` means the host's.
    pub platforms: Option<Vec<Platform>>,
}

/// The containerd worker; see the crate docs. All methods take `&self`.
pub struct ContainerdWorker {
    id: String,
    dir: PathBuf,
    labels: BTreeMap<String, String>,
    platforms: Vec<Platform>,
    content: ContentStore,
    trees: CtrdTrees,
    executor: Executor,
    resolver: Resolver,
    layer_db: tokio::sync::Mutex<LayerDb>,
}

impl std::fmt::Debug for ContainerdWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdWorker")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("namespace", &self.trees.api.namespace)
            .field("snapshotter", &self.trees.api.snapshotter)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ContainerdWorker {
    /// Connects to containerd, creates (or finds) the worker state and lease, and removes what a
    /// crash left: the worker's active snapshot keys, runc containers, bundles.
    pub async fn open(config: ContainerdWorkerConfig) -> Result<Self, Error> {
        if config.snapshotter.is_empty() || config.snapshotter.contains('/') {
            return Err(Error::Unsupported {
                what: format!("snapshotter name {:?}", config.snapshotter),
            });
        }
        let dir = config
            .root
            .join(format!("containerd-{}", config.snapshotter));
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let dir = dir.canonicalize().map_err(io_err("resolve", &dir))?;

        let content_dir = dir.join("content");
        let content = ContentStore::open(&content_dir).map_err(local(format!(
            "open content store {}",
            content_dir.display()
        )))?;
        let executor_dir = dir.join("executor");
        let bundles = executor_dir.join("bundles");
        if bundles.exists() {
            for mount in mounted_under(&bundles) {
                let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
            }
            fs::remove_dir_all(&bundles).map_err(io_err("remove", &bundles))?;
        }
        let runc_state = executor_dir.join("runc");
        let cache_mounts = dir.join("cachemounts");
        for d in [&bundles, &runc_state, &cache_mounts] {
            fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        kiln_worker_oci::cleanup_runc_state(&config.runc_binary, &runc_state);

        let id = load_or_create_id(&dir.join("workerid"))?;
        let containerd = Containerd::connect(&config.address)
            .await
            .map_err(backend(format!(
                "connect to containerd at {}",
                config.address
            )))?;
        let uuid = containerd
            .server_uuid()
            .await
            .map_err(backend("ask containerd for its uuid"))?;
        let api = Api {
            containerd,
            namespace: config.namespace.clone(),
            snapshotter: config.snapshotter.clone(),
            lease: format!("kiln-worker-{id}"),
        };
        api.ensure_lease().await?;
        for name in api.list().await? {
            if name.starts_with(ACTIVE_PREFIX) {
                tracing::info!(key = name, "removing leftover active snapshot");
                api.remove(&name).await?;
            }
        }

        let platforms = config
            .platforms
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| vec![Platform::host()]);
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let mut labels = BTreeMap::new();
        for (k, v) in [
            ("executor", "containerd"),
            ("snapshotter", config.snapshotter.as_str()),
            ("hostname", hostname.as_str()),
            ("network", "host"),
            ("selinux.enabled", "false"),
            ("containerd.namespace", config.namespace.as_str()),
            ("containerd.uuid", uuid.as_str()),
        ] {
            labels.insert(format!("{LABEL_PREFIX}{k}"), v.to_string());
        }
        labels.extend(config.labels);

        Ok(Self {
            id,
            labels,
            platforms,
            content,
            trees: CtrdTrees {
                api,
                handle: tokio::runtime::Handle::current(),
            },
            executor: Executor {
                rootless: config.rootless,
                ..Executor::new(config.runc_binary, runc_state, bundles, cache_mounts)
            },
            resolver: Resolver::new(config.registry_hosts).map_err(|e| Error::RegistryClient {
                source: Box::new(e.into()),
            })?,
            layer_db: tokio::sync::Mutex::new(LayerDb::open(&dir.join("layers.json"))?),
            dir,
        })
    }

    /// The worker's local directory (`<root>/containerd-<snapshotter>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The containerd namespace.
    pub fn namespace(&self) -> &str {
        &self.trees.api.namespace
    }

    /// The containerd lease holding everything the worker created.
    pub fn lease(&self) -> &str {
        &self.trees.api.lease
    }

    fn api(&self) -> &Api {
        &self.trees.api
    }

    /// A fresh empty directory for a mount point (removed by the caller's guard).
    fn mount_point(&self) -> Result<PathBuf, Error> {
        let p = self.executor.bundles.join(format!("view-{}", random_hex()));
        fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        Ok(p)
    }

    async fn check_inputs(&self, inputs: &[Option<SnapshotId>]) -> Result<(), Error> {
        for id in inputs.iter().flatten() {
            if self.api().stat(id).await?.is_none() {
                return Err(Error::SnapshotNotFound { id: id.clone() });
            }
        }
        Ok(())
    }

    /// The snapshot chain ending at `id`, bottom first.
    async fn chain(&self, id: &str) -> Result<Vec<(String, Option<String>)>, Error> {
        let mut chain = Vec::new();
        let mut cursor = id.to_string();
        loop {
            let info = self
                .api()
                .stat(&cursor)
                .await?
                .ok_or_else(|| Error::SnapshotNotFound { id: cursor.clone() })?;
            let parent = (!info.parent.is_empty()).then_some(info.parent);
            chain.push((cursor, parent.clone()));
            match parent {
                Some(p) => cursor = p,
                None => break,
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// Computes the layer of snapshot `id` over `parent` with containerd's differ.
    async fn diff_snapshot(&self, id: &str, parent: Option<&str>) -> Result<LayerRecord, Error> {
        let api = self.api();
        let upper_key = format!("{ACTIVE_PREFIX}diff-{}", random_hex());
        let lower_key = format!("{ACTIVE_PREFIX}diff-{}", random_hex());
        let result = async {
            let upper = api.view(&upper_key, id).await?;
            let lower = match parent {
                Some(p) => api.view(&lower_key, p).await?,
                None => Vec::new(),
            };
            let descriptor = api.diff(lower, upper).await?;
            let labels = api.blob_labels(&descriptor.digest).await?;
            let diff_id = labels
                .get("containerd.io/uncompressed")
                .ok_or_else(|| Error::Backend {
                    op: format!("export snapshot {id} as a layer"),
                    source: "containerd's diff has no containerd.io/uncompressed label".into(),
                })?
                .parse::<Digest>()
                .map_err(backend(format!("parse the diff id of snapshot {id}")))?;
            Ok::<_, Error>(LayerRecord {
                descriptor,
                diff_id,
            })
        }
        .await;
        for key in [&upper_key, &lower_key] {
            if let Err(e) = api.remove(key).await {
                tracing::warn!(key, error = %e, "failed to remove diff view");
            }
        }
        result
    }
}

/// Parses a JSON blob.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    digest: &Digest,
) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(backend(format!("parse {digest}")))
}

/// Mount points under `dir` (crash leftovers), deepest first.
fn mounted_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn load_or_create_id(path: &Path) -> Result<String, Error> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", path)(e)),
    }
    let bytes: [u8; 16] = rand::random();
    let id: String = bytes
        .iter()
        .map(|b| char::from(b"0123456789abcdefghijklmnopqrstuv"[(*b & 31) as usize]))
        .collect();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &id).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    Ok(id)
}

/// The OCI chain id of `parent` + `diff_id`.
fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
    }
}

/// Removes a directory used as a mount point when dropped (after the view inside it).
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[async_trait]
impl Worker for ContainerdWorker {
    fn id(&self) -> &str {
        &self.id
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }

    fn platforms(&self) -> Vec<Platform> {
        self.platforms.clone()
    }

    fn content(&self) -> &ContentStore {
        &self.content
    }

    async fn resolve_image(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage, Error> {
        // A reference pinned by digest names exact content: when the
        // namespace already holds it, the registry has nothing to add.
        if reference.digest().is_some() {
            if let Ok(Some(image)) = self.resolve_local(reference, platform).await {
                return Ok(image);
            }
        }
        // Otherwise BuildKit's `default` resolve mode: registry first, the
        // local image store as fallback (the Dockerfile frontend asks the
        // image store first itself, see kilnd's frontend).
        let remote = self.resolver.resolve(reference, platform).await;
        match remote {
            Ok(image) => Ok(image),
            Err(remote_error) => match self.resolve_local(reference, platform).await {
                Ok(Some(image)) => {
                    tracing::debug!(%reference, error = %remote_error, "registry failed, using the image in containerd");
                    Ok(image)
                }
                Ok(None) | Err(_) => Err(Error::Resolve {
                    reference: reference.to_string(),
                    source: Box::new(remote_error.into()),
                }),
            },
        }
    }

    async fn pull(
        &self,
        image: &ResolvedImage,
        progress: &dyn ProgressSink,
    ) -> Result<Option<SnapshotId>, Error> {
        let layers = &image.manifest.layers;
        let diff_ids = &image.config.rootfs.diff_ids;
        if layers.len() != diff_ids.len() {
            return Err(Error::InvalidOp {
                op: "pull",
                reason: format!(
                    "manifest of {} has {} layers but its config {} diff ids",
                    image.reference,
                    layers.len(),
                    diff_ids.len()
                ),
            });
        }
        let api = self.api();
        let mut parent: Option<Digest> = None;
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let chain = chain_id(parent.as_ref(), diff_id);
            let name = chain.to_string();
            let status_id = layer.digest.to_string();
            if api.stat(&name).await?.is_some() {
                api.lease_snapshot(&name).await?;
            } else {
                progress.status(&status_id, &status_id, 0, Some(layer.size), false);
                if !api.has_blob(&layer.digest).await? {
                    self.resolver
                        .fetch_blob(&image.reference, layer, &self.content)
                        .await
                        .map_err(|e| Error::Pull {
                            digest: layer.digest.clone(),
                            source: Box::new(e.into()),
                        })?;
                }
                api.copy_blob_in(layer, &self.content).await?;
                let key = format!("{ACTIVE_PREFIX}pull-{}", random_hex());
                let applied = async {
                    let mounts = api
                        .prepare(&key, parent.as_ref().map(|p| p.to_string()).as_deref())
                        .await?;
                    let actual = api.apply(layer, mounts).await?;
                    if actual != diff_id.to_string() {
                        return Err(Error::DiffIdMismatch {
                            digest: layer.digest.clone(),
                            expected: diff_id.clone(),
                            actual: actual.parse().unwrap_or_else(|_| Digest::of(b"")),
                        });
                    }
                    api.commit(&key, &name).await
                }
                .await;
                if let Err(e) = applied {
                    let _ = api.remove(&key).await;
                    return Err(e);
                }
                api.label_blob(
                    &layer.digest,
                    &[("containerd.io/uncompressed".into(), diff_id.to_string())],
                )
                .await?;
            }
            self.layer_db.lock().await.insert(
                &name,
                LayerRecord {
                    descriptor: layer.clone(),
                    diff_id: diff_id.clone(),
                },
            )?;
            progress.status(&status_id, &status_id, layer.size, Some(layer.size), true);
            parent = Some(chain);
        }
        Ok(parent.map(|p| p.to_string()))
    }

    async fn snapshot_from_dir(&self, dir: &Path) -> Result<SnapshotId, Error> {
        let trees = self.trees.clone();
        let target = self.mount_point()?;
        let _dir_guard = DirGuard(target.clone());
        let source = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let active = kiln_worker_oci::Trees::activate(&trees, None, &target)?;
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg("--")
                .arg(source.join("."))
                .arg(active.path())
                .status()
                .map_err(io_err("copy", &source))?;
            if !status.success() {
                return Err(Error::Io {
                    op: "copy",
                    path: source,
                    source: io::Error::other(format!("cp exited with {status}")),
                });
            }
            active.commit()
        })
        .await
        .map_err(backend("run a blocking task"))?
    }

    async fn exec(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        self.exec_in_session(
            op,
            inputs,
            std::sync::Arc::new(kiln_worker::NoSession),
            progress,
        )
        .await
    }

    async fn exec_in_session(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        session: std::sync::Arc<dyn kiln_worker::ExecSession>,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        self.check_inputs(inputs).await?;
        self.executor
            .run_in_session(&self.trees, op, inputs, session, progress)
            .await
    }

    async fn file(
        &self,
        op: &pb::FileOp,
        inputs: &[Option<SnapshotId>],
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        self.check_inputs(inputs).await?;
        let trees = self.trees.clone();
        let scratch = self.executor.bundles.clone();
        let op = op.clone();
        let inputs = inputs.to_vec();
        tokio::task::spawn_blocking(move || {
            kiln_worker_oci::run_file_op(&trees, &scratch, &op, &inputs)
        })
        .await
        .map_err(backend("run a blocking task"))?
    }

    fn exists(&self, id: &SnapshotId) -> bool {
        matches!(block(&self.trees.handle, self.api().stat(id)), Ok(Some(_)))
    }

    async fn snapshot_path(&self, id: &SnapshotId) -> Result<SnapshotView, Error> {
        let target = self.mount_point()?;
        let dir_guard = DirGuard(target.clone());
        let trees = self.trees.clone();
        let id = id.clone();
        let view = tokio::task::spawn_blocking(move || trees.mount_view(&id, &target))
            .await
            .map_err(backend("run a blocking task"))??;
        let path = view.path().to_path_buf();
        // The view (unmount + removal) goes first, then the directory.
        Ok(SnapshotView::new(path, Some(Box::new((view, dir_guard)))))
    }

    async fn layers(&self, id: &SnapshotId) -> Result<Vec<Layer>, Error> {
        let chain = self.chain(id).await?;
        let mut out = Vec::with_capacity(chain.len());
        for (snapshot, parent) in chain {
            let known = self.layer_db.lock().await.get(&snapshot).cloned();
            let record = match known {
                Some(r) if self.content.has(&r.descriptor.digest) => r,
                Some(r) if self.api().has_blob(&r.descriptor.digest).await? => r,
                _ => {
                    let record = self.diff_snapshot(&snapshot, parent.as_deref()).await?;
                    tracing::debug!(snapshot, digest = %record.descriptor.digest, "exported snapshot as layer");
                    record
                }
            };
            self.api()
                .copy_blob_out(&record.descriptor.digest, &self.content)
                .await?;
            self.layer_db
                .lock()
                .await
                .insert(&snapshot, record.clone())?;
            out.push(Layer {
                descriptor: record.descriptor,
                diff_id: record.diff_id,
            });
        }
        Ok(out)
    }

    fn image_store(&self) -> Option<&dyn ImageStore> {
        Some(self)
    }
}

#[async_trait]
impl ImageStore for ContainerdWorker {
    async fn resolve_local(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error> {
        self.api().resolve_image(reference, platform).await
    }

    async fn create_image(
        &self,
        name: &str,
        manifest: &Descriptor,
        content: &ContentStore,
    ) -> Result<(), Error> {
        let api = self.api();
        // Children first, so a parent blob's gc labels never point at missing content.
        let mut stack = vec![(manifest.clone(), false)];
        while let Some((descriptor, children_done)) = stack.pop() {
            let is_index = media_types::is_index(&descriptor.media_type);
            let is_manifest = media_types::is_manifest(&descriptor.media_type);
            if !(is_index || is_manifest) || children_done {
                api.copy_blob_in(&descriptor, content).await?;
                let bytes = if is_index || is_manifest {
                    content
                        .read(&descriptor.digest)
                        .map_err(local(format!("read {}", descriptor.digest)))?
                } else {
                    continue;
                };
                let mut labels = Vec::new();
                if is_index {
                    let index: ImageIndex = parse_json(&bytes, &descriptor.digest)?;
                    for (i, m) in index.manifests.iter().enumerate() {
                        labels.push((
                            format!("containerd.io/gc.ref.content.m.{i}"),
                            m.digest.to_string(),
                        ));
                    }
                } else {
                    let m: ImageManifest = parse_json(&bytes, &descriptor.digest)?;
                    labels.push((
                        "containerd.io/gc.ref.content.config".into(),
                        m.config.digest.to_string(),
                    ));
                    for (i, l) in m.layers.iter().enumerate() {
                        labels.push((
                            format!("containerd.io/gc.ref.content.l.{i}"),
                            l.digest.to_string(),
                        ));
                    }
                }
                api.label_blob(&descriptor.digest, &labels).await?;
                continue;
            }
            let bytes = content
                .read(&descriptor.digest)
                .map_err(local(format!("read {}", descriptor.digest)))?;
            stack.push((descriptor.clone(), true));
            if is_index {
                let index: ImageIndex = parse_json(&bytes, &descriptor.digest)?;
                stack.extend(index.manifests.into_iter().map(|m| (m, false)));
            } else {
                let m: ImageManifest = parse_json(&bytes, &descriptor.digest)?;
                stack.push((m.config, false));
                stack.extend(m.layers.into_iter().map(|l| (l, false)));
            }
        }
        api.containerd
            .put_image(
                self.namespace(),
                name,
                &kiln_containerd::Descriptor::from_containerd(&api::to_containerd(manifest)),
            )
            .await
            .map_err(backend(format!("create image {name}")))
    }

    async fn unpack(&self, name: &str, platform: &Platform) -> Result<(), Error> {
        let api = self.api();
        let image = api
            .containerd
            .get_image(self.namespace(), name)
            .await
            .map_err(backend(format!("look up image {name}")))?
            .ok_or_else(|| Error::Backend {
                op: format!("unpack image {name}"),
                source: "no such image".into(),
            })?;
        let target = image.target.as_ref().ok_or_else(|| Error::Backend {
            op: format!("unpack image {name}"),
            source: "image has no target".into(),
        })?;
        let imported = ImportedImage {
            name: name.to_string(),
            target: kiln_containerd::Descriptor::from_containerd(target),
        };
        let platform = kiln_containerd::Platform::new(
            &platform.os,
            &platform.architecture,
            platform.variant.as_deref(),
        );
        let stats = api
            .containerd
            .unpack(self.namespace(), &imported, &api.snapshotter, &platform)
            .await
            .map_err(backend(format!("unpack image {name}")))?;
        tracing::debug!(
            name,
            unpacked = stats.layers_unpacked,
            present = stats.layers_present,
            "unpacked image"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(chain_id(None, &a), a);
        assert_eq!(
            chain_id(Some(&a), &b),
            Digest::of(format!("{a} {b}").as_bytes())
        );
    }

    #[test]
    fn worker_id_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workerid");
        let first = load_or_create_id(&path).unwrap();
        assert_eq!(first.len(), 16);
        assert_eq!(load_or_create_id(&path).unwrap(), first);
    }
}
