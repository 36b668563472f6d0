//! kiln's OCI worker: BuildKit's `runc-overlayfs` worker rebuilt on the host's kernel and runc.
//!
//! [`OciWorker`] keeps everything under `<root>/runc-overlayfs/` (`<root>/runc-native/` with the
//! [`Snapshotter::Native`] fallback, where snapshots record whiteouts as OCI `.wh.` files and
//! trees are copies; see [`OciWorkerOptions`] for rootless containers):
//! - `content/` — a [`ContentStore`] of pulled and exported blobs;
//! - `snapshots/<id>/{fs,meta.json}` — immutable snapshots; `fs` is an overlayfs upper dir (the
//!   snapshot's own changes, with overlay whiteouts) and `meta.json` names the parent, the diff id
//!   and, once known, the compressed layer blob;
//! - `executor/` — runc state, per-op bundles and temporary mount points;
//! - `cachemounts/` — directories behind `RUN --mount=type=cache`;
//! - `workerid` — the persisted random worker id.
//!
//! Pulled layers are unpacked once per chain id and keep their original blob for export. `exec`
//! runs runc on an overlay of the input chain and commits the upper as the new snapshot; `file`
//! does the same for file actions; `layers` turns each snapshot of a chain into a gzip layer once.
//!
//! **Base images** come from registries. Beyond BuildKit, a read-only [`BaseImageSource`] can be
//! attached with [`OciWorker::with_base_images`] (kilnd: `[worker.oci] containerd-images`): when
//! the registry lookup fails, the image is looked up there and its blobs are copied into the
//! worker's own content store, then pulled as usual.

mod cachemount;
mod copyfilter;
mod exec;
mod fileop;
mod fsx;
mod mount;
mod native;
mod sessionmounts;
mod snapshot;
mod spec;
mod trees;
pub mod userns;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::{RegistryHosts, ResolvedImage, Resolver};
use kiln_image::Digest;
use kiln_proto::pb;
use kiln_worker::{
    Error, Layer, Lease, ProgressSink, RecordType, SnapshotId, SnapshotUsage, SnapshotView, Worker,
    LABEL_PREFIX,
};

pub use crate::exec::Executor;
pub use crate::snapshot::Snapshotter;
pub use crate::trees::{ActiveTree, Trees};

use kiln_image::layer::OverlayXattrs;

use crate::fsx::io_err;
use crate::snapshot::{random_id, SnapshotMeta, SnapshotStore};

/// How to open an [`OciWorker`].
#[derive(Debug, Clone)]
pub struct OciWorkerConfig {
    /// The daemon root (`kilnd --root`); the worker lives in `<root>/runc-overlayfs/`
    /// (`<root>/runc-native/` with the native snapshotter).
    pub root: PathBuf,
    /// The runc binary.
    pub runc_binary: PathBuf,
    /// Per-registry settings (plain HTTP, skip TLS verification).
    pub registry_hosts: RegistryHosts,
    /// Extra worker labels, merged over the built-in ones.
    pub labels: BTreeMap<String, String>,
    /// Supported platforms; `None` means the host's.
    pub platforms: Option<Vec<Platform>>,
}

/// How the worker runs containers and assembles trees, beyond [`OciWorkerConfig`].
#[derive(Debug, Clone, Default)]
pub struct OciWorkerOptions {
    /// Rootless containers: kilnd is the mapped root of a user namespace (RootlessKit). runc
    /// runs with `--rootless true` and a spec without cgroup settings; overlay mounts use
    /// `userxattr` and snapshots keep overlay attributes in `user.overlay.*`.
    pub rootless: bool,
    /// The snapshotter; `None` = auto: overlayfs when an overlay can be mounted (and records
    /// whiteouts) under the worker directory, else `native`.
    pub snapshotter: Option<Snapshotter>,
}

/// A read-only store of named images the OCI worker falls back to when a registry cannot
/// resolve a base image (kiln's extension; e.g. a containerd namespace).
#[async_trait]
pub trait BaseImageSource: Send + Sync + std::fmt::Debug {
    /// What the source is, for logs and errors (`containerd namespace "default"`).
    fn describe(&self) -> String;

    /// The image `reference` for `platform` when the source holds it, `None` otherwise.
    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error>;

    /// Copies the blob `descriptor` from the source into `store` (nothing when `store` has it).
    async fn fetch_blob(&self, descriptor: &Descriptor, store: &ContentStore) -> Result<(), Error>;
}

/// The OCI worker. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct OciWorker {
    id: String,
    dir: PathBuf,
    labels: BTreeMap<String, String>,
    platforms: Vec<Platform>,
    content: ContentStore,
    snapshots: SnapshotStore,
    executor: exec::Executor,
    resolver: Resolver,
    /// Where base images come from when the registry fails (read-only).
    base_images: Option<Arc<dyn BaseImageSource>>,
    /// Serialises `meta.json` updates of `layers`, so concurrent exports compress once.
    export_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for OciWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciWorker")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The label (after [`LABEL_PREFIX`]) naming the worker's [`BaseImageSource`], when it has one.
pub const BASE_IMAGES_LABEL: &str = "kiln.base-images";

/// The worker's directory under the daemon root (overlayfs snapshotter).
pub const WORKER_DIR: &str = "runc-overlayfs";
/// The worker's directory under the daemon root with the native snapshotter.
pub const NATIVE_WORKER_DIR: &str = "runc-native";

impl OciWorker {
    /// Opens (creating) the worker state, removing what a crash may have left: mounts under the
    /// worker directory, uncommitted snapshots, bundles and runc state.
    pub fn open(config: OciWorkerConfig) -> Result<Self, Error> {
        Self::open_with(config, OciWorkerOptions::default())
    }

    /// [`OciWorker::open`] with rootless and snapshotter choices. The snapshotter in use is
    /// logged and reported as the worker label `org.mobyproject.buildkit.worker.snapshotter`.
    pub fn open_with(config: OciWorkerConfig, options: OciWorkerOptions) -> Result<Self, Error> {
        fs::create_dir_all(&config.root).map_err(io_err("create", &config.root))?;
        let overlay_xattrs = if options.rootless || userns::running_in_user_namespace() {
            OverlayXattrs::User
        } else {
            OverlayXattrs::Trusted
        };
        let snapshotter = match options.snapshotter {
            Some(Snapshotter::Overlayfs) => {
                probe_overlay(&config.root, overlay_xattrs).map_err(|reason| {
                    Error::Unsupported {
                        what: format!("the overlayfs snapshotter here: {reason}"),
                    }
                })?;
                Snapshotter::Overlayfs
            }
            Some(Snapshotter::Native) => Snapshotter::Native,
            None => match probe_overlay(&config.root, overlay_xattrs) {
                Ok(()) => Snapshotter::Overlayfs,
                Err(reason) => {
                    tracing::warn!(%reason, "overlayfs cannot be used, falling back to the native snapshotter (copies)");
                    Snapshotter::Native
                }
            },
        };
        // Each snapshotter has its own directory (as BuildKit's `runc-<snapshotter>`): their
        // snapshots record whiteouts differently.
        let (worker_dir, xattrs) = match snapshotter {
            Snapshotter::Overlayfs => (WORKER_DIR, overlay_xattrs),
            Snapshotter::Native => (NATIVE_WORKER_DIR, OverlayXattrs::Files),
        };
        tracing::info!(
            snapshotter = snapshotter.name(),
            rootless = options.rootless,
            "OCI worker snapshotter"
        );
        let dir = config.root.join(worker_dir);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let dir = dir.canonicalize().map_err(io_err("resolve", &dir))?;
        mount::unmount_all_under(&dir);

        let content_dir = dir.join("content");
        let content = ContentStore::open(&content_dir).map_err(|e| Error::Content {
            path: content_dir.clone(),
            source: Box::new(e.into()),
        })?;
        let snapshots =
            SnapshotStore::open(&dir.join("snapshots"))?.with_layout(snapshotter, xattrs);

        let executor_dir = dir.join("executor");
        let bundles = executor_dir.join("bundles");
        if bundles.exists() {
            fs::remove_dir_all(&bundles).map_err(io_err("remove", &bundles))?;
        }
        let runc_state = executor_dir.join("runc");
        for d in [&bundles, &runc_state] {
            fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
        cleanup_runc_state(&config.runc_binary, &runc_state);
        let cache_mounts = dir.join("cachemounts");
        fs::create_dir_all(&cache_mounts).map_err(io_err("create", &cache_mounts))?;

        let id = load_or_create_id(&dir.join("workerid"))?;
        let platforms = config
            .platforms
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| vec![Platform::host()]);
        let mut labels = BTreeMap::new();
        let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        for (k, v) in [
            ("executor", "oci"),
            ("snapshotter", snapshotter.name()),
            ("hostname", hostname.as_str()),
            ("network", "host"),
            ("oci.process-mode", "sandbox"),
            ("selinux.enabled", "false"),
        ] {
            labels.insert(format!("{LABEL_PREFIX}{k}"), v.to_string());
        }
        labels.extend(config.labels);

        Ok(Self {
            id,
            labels,
            platforms,
            content,
            snapshots,
            executor: exec::Executor {
                rootless: options.rootless,
                ..exec::Executor::new(config.runc_binary, runc_state, bundles, cache_mounts)
            },
            resolver: Resolver::new(config.registry_hosts).map_err(|e| Error::RegistryClient {
                source: Box::new(e.into()),
            })?,
            base_images: None,
            export_lock: tokio::sync::Mutex::new(()),
            dir,
        })
    }

    /// Attaches a read-only fallback for base images the registry cannot resolve (see the crate
    /// docs); the worker gets the label `org.mobyproject.buildkit.worker.kiln.base-images`
    /// describing it.
    pub fn with_base_images(mut self, source: Arc<dyn BaseImageSource>) -> Self {
        self.labels.insert(
            format!("{LABEL_PREFIX}{BASE_IMAGES_LABEL}"),
            source.describe(),
        );
        self.base_images = Some(source);
        self
    }

    /// Resolves `reference` in the fallback source and copies its manifest, config and layer
    /// blobs into the worker's content store, so `pull` finds them all locally.
    async fn resolve_from_source(
        &self,
        source: &dyn BaseImageSource,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error> {
        let Some(image) = source.resolve(reference, platform).await? else {
            return Ok(None);
        };
        let content_err = |digest: &Digest| {
            let path = self.content.path(digest);
            move |e: kiln_image::content::Error| Error::Content {
                path,
                source: Box::new(e.into()),
            }
        };
        for (bytes, digest) in [
            (&image.manifest_bytes, &image.manifest_digest),
            (&image.config_bytes, &image.manifest.config.digest),
        ] {
            if !self.content.has(digest) {
                let written = self
                    .content
                    .write_blob(bytes)
                    .map_err(content_err(digest))?;
                if &written != digest {
                    return Err(Error::Backend {
                        op: format!("copy blob {digest} from {}", source.describe()),
                        source: format!("its bytes have digest {written}").into(),
                    });
                }
            }
        }
        for layer in &image.manifest.layers {
            source.fetch_blob(layer, &self.content).await?;
        }
        Ok(Some(image))
    }

    /// The worker directory (`<root>/runc-overlayfs` or `<root>/runc-native`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding the snapshot's own changes (an overlay upper dir), for inspection.
    pub fn snapshot_upper(&self, id: &SnapshotId) -> Result<PathBuf, Error> {
        if !self.snapshots.exists(id) {
            return Err(Error::SnapshotNotFound { id: id.clone() });
        }
        Ok(self.snapshots.fs_path(id))
    }

    fn unpack_layer(
        snapshots: &SnapshotStore,
        content: &ContentStore,
        layer: &Descriptor,
        expected_diff_id: &Digest,
        parent: Option<SnapshotId>,
        id: &str,
        description: String,
    ) -> Result<(), Error> {
        let blob = content.open_blob(&layer.digest).map_err(|e| Error::Pull {
            digest: layer.digest.clone(),
            source: Box::new(e.into()),
        })?;
        let pending = snapshots.prepare()?;
        let applied = kiln_image::layer::apply_with(
            io::BufReader::new(blob),
            &pending.fs_path(),
            snapshots.xattrs,
        )
        .map_err(|e| Error::Pull {
            digest: layer.digest.clone(),
            source: Box::new(e.into()),
        })?;
        if &applied.diff_id != expected_diff_id {
            return Err(Error::DiffIdMismatch {
                digest: layer.digest.clone(),
                expected: expected_diff_id.clone(),
                actual: applied.diff_id,
            });
        }
        pending.commit(
            id,
            &SnapshotMeta {
                parent,
                diff_id: Some(applied.diff_id),
                blob: Some(layer.clone()),
                description,
                ..Default::default()
            },
        )
    }
}

/// Runs a `FileOp` on trees of `trees` (see `Worker::file`); `scratch` is a directory for
/// temporary mount points. Blocking: call it from a blocking thread.
pub fn run_file_op(
    trees: &dyn Trees,
    scratch: &Path,
    op: &pb::FileOp,
    inputs: &[Option<SnapshotId>],
) -> Result<Vec<Option<SnapshotId>>, Error> {
    fileop::run(trees, scratch, op, inputs)
}

/// Checks that an overlay with an upper dir can be mounted under `dir` and that removing a lower
/// file leaves a whiteout in the upper (what the overlayfs snapshotter relies on).
fn probe_overlay(dir: &Path, xattrs: OverlayXattrs) -> Result<(), String> {
    let probe = dir.join(format!(".overlay-probe-{}", random_id()));
    let result = (|| {
        let [lower1, lower2, upper, work, merged] =
            ["l1", "l2", "u", "w", "m"].map(|name| probe.join(name));
        for d in [&lower1, &lower2, &upper, &work, &merged] {
            fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        fs::write(lower1.join("f"), b"x").map_err(|e| format!("write probe file: {e}"))?;
        let mounted = mount::mount_overlay(
            &[lower2, lower1],
            Some((&upper, &work)),
            &merged,
            xattrs == OverlayXattrs::User,
        )
        .map_err(|e| {
            format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )
        })?;
        let removed = fs::remove_file(merged.join("f"));
        mounted.unmount().map_err(|e| e.to_string())?;
        removed.map_err(|e| format!("remove a lower file through the overlay: {e}"))?;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        match fs::symlink_metadata(upper.join("f")) {
            Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => Ok(()),
            _ => Err("removing a lower file left no whiteout in the upper dir".to_string()),
        }
    })();
    if let Err(e) = fs::remove_dir_all(&probe) {
        tracing::debug!(path = %probe.display(), error = %e, "failed to remove the overlay probe");
    }
    result
}

/// Deletes the containers left in runc's state dir `state` by a crash.
pub fn cleanup_runc_state(runc: &Path, state: &Path) {
    cleanup_runc_leftovers(runc, state)
}

/// The id of the snapshot holding the layer with chain id `chain`.
fn chain_snapshot_id(chain: &Digest) -> SnapshotId {
    format!("layer-{}", chain.hex())
}

/// The OCI chain id of `parent` + `diff_id`.
fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
    }
}

fn load_or_create_id(path: &Path) -> Result<String, Error> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", path)(e)),
    }
    let bytes: [u8; 16] = rand::random();
    // Base-32-like lowercase id, as BuildKit's worker ids look.
    let id: String = bytes
        .iter()
        .map(|b| char::from(b"0123456789abcdefghijklmnopqrstuv"[(*b & 31) as usize]))
        .collect();
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, &id).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))?;
    Ok(id)
}

fn cleanup_runc_leftovers(runc: &Path, state: &Path) {
    let Ok(entries) = fs::read_dir(state) else {
        return;
    };
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let out = std::process::Command::new(runc)
            .arg("--root")
            .arg(state)
            .args(["delete", "--force", &id])
            .output();
        if let Err(e) = out {
            tracing::warn!(id, error = %e, "failed to delete leftover container");
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Io {
        op: "run blocking task for",
        path: PathBuf::new(),
        source: io::Error::other(e),
    }
}

#[async_trait]
impl Worker for OciWorker {
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
        let remote_error = match self.resolver.resolve(reference, platform).await {
            Ok(image) => return Ok(image),
            Err(e) => e,
        };
        let Some(source) = &self.base_images else {
            return Err(Error::Resolve {
                reference: reference.to_string(),
                source: Box::new(remote_error.into()),
            });
        };
        match self
            .resolve_from_source(source.as_ref(), reference, platform)
            .await
        {
            Ok(Some(image)) => {
                tracing::debug!(%reference, error = %remote_error, source = source.describe(), "registry failed, using the fallback image source");
                Ok(image)
            }
            Ok(None) => {
                tracing::debug!(%reference, source = source.describe(), "image not in the fallback image source either");
                Err(Error::Resolve {
                    reference: reference.to_string(),
                    source: Box::new(remote_error.into()),
                })
            }
            Err(e) => Err(Error::Backend {
                op: format!(
                    "read {reference} from {} (the registry failed: {remote_error})",
                    source.describe()
                ),
                source: Box::new(e),
            }),
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
        let mut parent: Option<SnapshotId> = None;
        let mut chain: Option<Digest> = None;
        let mut holds = Vec::with_capacity(layers.len());
        let description = format!("pulled from {}", image.reference);
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let this_chain = chain_id(chain.as_ref(), diff_id);
            let id = chain_snapshot_id(&this_chain);
            // Held before the existence check, so a concurrent prune cannot remove it after.
            holds.push(self.snapshots.hold(std::slice::from_ref(&id)));
            let status_id = layer.digest.to_string();
            if !self.snapshots.exists(&id) {
                progress.status(&status_id, &status_id, 0, Some(layer.size), false);
                self.resolver
                    .fetch_blob(&image.reference, layer, &self.content)
                    .await
                    .map_err(|e| Error::Pull {
                        digest: layer.digest.clone(),
                        source: Box::new(e.into()),
                    })?;
                let snapshots = self.snapshots.clone();
                let content = self.content.clone();
                let (layer_c, diff_c, parent_c, id_c, description_c) = (
                    layer.clone(),
                    diff_id.clone(),
                    parent.clone(),
                    id.clone(),
                    description.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    Self::unpack_layer(
                        &snapshots,
                        &content,
                        &layer_c,
                        &diff_c,
                        parent_c,
                        &id_c,
                        description_c,
                    )
                })
                .await
                .map_err(join_error)??;
            }
            progress.status(&status_id, &status_id, layer.size, Some(layer.size), true);
            parent = Some(id);
            chain = Some(this_chain);
        }
        if let Some(top) = &parent {
            // Protected until the caller leases it, also when it already existed.
            self.snapshots.mark_fresh(top);
        }
        Ok(parent)
    }

    /// Lazy: a base image is pulled when an exec or file op first needs its tree
    /// (`snapshot_from_dir`, `exec` and `file` never see an image that was not pulled).
    fn pulls_lazily(&self) -> bool {
        true
    }

    async fn snapshot_from_dir(&self, dir: &Path) -> Result<SnapshotId, Error> {
        let snapshots = self.snapshots.clone();
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let pending = snapshots.prepare()?;
            let fs_dir = pending.fs_path();
            for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
                let entry = entry.map_err(io_err("read", &dir))?;
                let from = entry.path();
                fsx::copy_tree(&from, &fs_dir.join(entry.file_name()), &Default::default())
                    .map_err(io_err("copy", &from))?;
            }
            let id = random_id();
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            pending.commit(
                &id,
                &SnapshotMeta {
                    description: format!("local source for {name}"),
                    record_type: Some(RecordType::SourceLocal.as_str().to_string()),
                    ..Default::default()
                },
            )?;
            Ok(id)
        })
        .await
        .map_err(join_error)?
    }

    async fn exec(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        self.exec_in_session(op, inputs, Arc::new(kiln_worker::NoSession), progress)
            .await
    }

    async fn exec_in_session(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        session: Arc<dyn kiln_worker::ExecSession>,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        let _hold = self
            .snapshots
            .hold(&inputs.iter().flatten().cloned().collect::<Vec<_>>());
        self.check_inputs(inputs)?;
        let outputs = self
            .executor
            .run_in_session(&self.snapshots, op, inputs, session, progress)
            .await?;
        self.describe_exec_outputs(op, inputs, &outputs);
        Ok(outputs)
    }

    async fn file(
        &self,
        op: &pb::FileOp,
        inputs: &[Option<SnapshotId>],
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        let hold = self
            .snapshots
            .hold(&inputs.iter().flatten().cloned().collect::<Vec<_>>());
        self.check_inputs(inputs)?;
        let snapshots = self.snapshots.clone();
        let scratch = self.executor.bundles.clone();
        let op = op.clone();
        let inputs = inputs.to_vec();
        tokio::task::spawn_blocking(move || {
            let _hold = hold;
            fileop::run(&snapshots, &scratch, &op, &inputs)
        })
        .await
        .map_err(join_error)?
    }

    fn exists(&self, id: &SnapshotId) -> bool {
        self.snapshots.exists(id)
    }

    async fn snapshot_path(&self, id: &SnapshotId) -> Result<SnapshotView, Error> {
        let lowers = self.snapshots.lowers(id)?;
        if lowers.len() == 1 {
            return Ok(SnapshotView::new(lowers[0].clone(), None));
        }
        let target = self.executor.bundles.join(format!("view-{}", random_id()));
        fs::create_dir_all(&target).map_err(io_err("create", &target))?;
        let mut guard = ViewGuard {
            view: None,
            dir: target.clone(),
        };
        let view = self.snapshots.view(Some(id), &target)?;
        let path = view.path().to_path_buf();
        guard.view = Some(view);
        Ok(SnapshotView::new(path, Some(Box::new(guard))))
    }

    async fn layers(&self, id: &SnapshotId) -> Result<Vec<Layer>, Error> {
        let _lock = self.export_lock.lock().await;
        let chain = self.snapshots.chain(id)?;
        let mut out = Vec::with_capacity(chain.len());
        for (snapshot, meta) in chain {
            if let (Some(blob), Some(diff_id)) = (&meta.blob, &meta.diff_id) {
                if self.content.has(&blob.digest) {
                    out.push(Layer {
                        descriptor: blob.clone(),
                        diff_id: diff_id.clone(),
                    });
                    continue;
                }
            }
            let snapshots = self.snapshots.clone();
            let content = self.content.clone();
            let layer = tokio::task::spawn_blocking(move || {
                export_snapshot(&snapshots, &content, &snapshot, meta)
            })
            .await
            .map_err(join_error)??;
            out.push(layer);
        }
        Ok(out)
    }

    async fn usage(&self) -> Result<Vec<SnapshotUsage>, Error> {
        let snapshots = self.snapshots.clone();
        let caches = self.executor.cache_mounts.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (id, meta) in snapshots.list() {
                let usage = snapshots.usage_meta(&id);
                let in_use = snapshot::lock(snapshots.refs()).in_use(&id);
                let record_type = match meta.record_type.as_deref() {
                    Some("source.local") => RecordType::SourceLocal,
                    _ => RecordType::Regular,
                };
                out.push(SnapshotUsage {
                    size: snapshots.size(&id),
                    created: snapshots.created(&id, &meta),
                    last_used: usage
                        .last_used
                        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s)),
                    usage_count: usage.usage_count,
                    in_use,
                    record_type,
                    description: meta.description,
                    parent: meta.parent,
                    mutable: false,
                    shared: false,
                    id,
                });
            }
            out.extend(caches.usage());
            out
        })
        .await
        .map_err(join_error)
    }

    async fn prune(&self, ids: &[SnapshotId]) -> Result<Vec<SnapshotId>, Error> {
        let (caches, snapshots): (Vec<SnapshotId>, Vec<SnapshotId>) = ids
            .iter()
            .cloned()
            .partition(|id| id.starts_with(cachemount::PREFIX));
        let store = self.snapshots.clone();
        let cache_mounts = self.executor.cache_mounts.clone();
        tokio::task::spawn_blocking(move || {
            let mut removed = store.remove_unused(&snapshots)?;
            removed.extend(cache_mounts.remove_unused(&caches));
            tracing::info!(count = removed.len(), "pruned snapshots");
            Ok(removed)
        })
        .await
        .map_err(join_error)?
    }

    fn hold(&self, ids: &[SnapshotId]) -> Lease {
        Lease::new(Box::new(self.snapshots.hold(ids)))
    }

    fn record_use(&self, ids: &[SnapshotId]) {
        for id in ids {
            if let Err(e) = self.snapshots.record_use(id) {
                tracing::warn!(id, error = %e, "failed to record snapshot use");
            }
        }
    }
}

impl OciWorker {
    /// Records `mount <dest> from exec <args>` (BuildKit's description) in the meta of the new
    /// snapshots an exec made, for `DiskUsage`.
    fn describe_exec_outputs(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        outputs: &[Option<SnapshotId>],
    ) {
        let args = op
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default();
        let mut mounts: Vec<&pb::Mount> = op.mounts.iter().filter(|m| m.output >= 0).collect();
        mounts.sort_by_key(|m| m.output);
        for (mount, id) in mounts.iter().zip(outputs) {
            let Some(id) = id else { continue };
            if inputs.iter().flatten().any(|input| input == id) {
                continue;
            }
            let result = self.snapshots.meta(id).and_then(|mut meta| {
                meta.description = format!("mount {} from exec {args}", mount.dest);
                self.snapshots.update_meta(id, &meta)
            });
            if let Err(e) = result {
                tracing::debug!(id, error = %e, "failed to describe exec output");
            }
        }
    }

    fn check_inputs(&self, inputs: &[Option<SnapshotId>]) -> Result<(), Error> {
        for id in inputs.iter().flatten() {
            if !self.snapshots.exists(id) {
                return Err(Error::SnapshotNotFound { id: id.clone() });
            }
        }
        Ok(())
    }
}

/// Releases a view (unmounting or removing its copy) and removes its mount point.
struct ViewGuard {
    view: Option<SnapshotView>,
    dir: PathBuf,
}

impl Drop for ViewGuard {
    fn drop(&mut self) {
        drop(self.view.take());
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Compresses a snapshot's upper into the content store and records the blob in its meta.
fn export_snapshot(
    snapshots: &SnapshotStore,
    content: &ContentStore,
    id: &str,
    mut meta: SnapshotMeta,
) -> Result<Layer, Error> {
    let export_err = |e: kiln_image::Error| Error::Export {
        id: id.to_string(),
        source: Box::new(e),
    };
    let mut writer = content.writer().map_err(|e| export_err(e.into()))?;
    let blob =
        kiln_image::layer::diff_upper_with(&snapshots.fs_path(id), &mut writer, snapshots.xattrs)
            .map_err(|e| export_err(e.into()))?;
    let (digest, size) = writer
        .commit(Some(&blob.digest))
        .map_err(|e| export_err(e.into()))?;
    let descriptor = Descriptor::new(media_types::OCI_LAYER_GZIP, digest, size);
    if let Some(known) = &meta.diff_id {
        if known != &blob.diff_id {
            tracing::warn!(id, %known, actual = %blob.diff_id, "snapshot diff id changed on re-export");
        }
    }
    meta.diff_id = Some(blob.diff_id.clone());
    meta.blob = Some(descriptor.clone());
    snapshots.update_meta(id, &meta)?;
    tracing::debug!(id, digest = %descriptor.digest, "exported snapshot as layer");
    Ok(Layer {
        descriptor,
        diff_id: blob.diff_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(chain_id(None, &a), a);
        let ab = chain_id(Some(&a), &b);
        assert_eq!(ab, Digest::of(format!("{a} {b}").as_bytes()));
        assert!(snapshot::valid_id(&chain_snapshot_id(&ab)));
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
