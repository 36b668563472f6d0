//! The build backend seen by the solver.
//!
//! A [`Worker`] owns content (blobs in a [`ContentStore`]) and snapshots (immutable filesystem
//! trees named by a [`SnapshotId`]). The solver resolves and pulls images through it, runs LLB
//! `ExecOp`s and `FileOp`s on snapshots, and asks it for the layers of a result to export.
//! Progress of long operations (pulls, process output) goes to a [`ProgressSink`] supplied by
//! the caller; the worker never renders anything itself.
//!
//! Secrets and SSH agents of `RUN --mount=type=secret|ssh` come from the client through an
//! [`ExecSession`] the solver passes to [`Worker::exec_in_session`].
//!
//! Main types: [`Worker`], [`ExecSession`], [`ImageStore`], [`SnapshotId`], [`Layer`], [`SnapshotView`], [`ProgressSink`],
//! [`SnapshotUsage`], [`Lease`], [`Error`]. The OCI backend lives in `kiln-worker-oci`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use kiln_image::content::ContentStore;
use kiln_image::oci::{Descriptor, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::ResolvedImage;
use kiln_image::Digest;
use kiln_proto::pb;

/// Label key prefix of worker labels (`org.mobyproject.buildkit.worker.executor`, …).
pub const LABEL_PREFIX: &str = "org.mobyproject.buildkit.worker.";

/// The name of an immutable snapshot inside one worker.
///
/// Opaque to callers: only the worker that returned it gives it meaning. A plain string so it can
/// be stored in cache records as is.
pub type SnapshotId = String;

/// One layer of a snapshot chain, as it would appear in an image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The compressed blob (present in [`Worker::content`]).
    pub descriptor: Descriptor,
    /// The digest of the uncompressed tar (the image config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
}

/// Receives progress of worker operations. Implementations must be cheap: they are called from
/// the middle of I/O loops.
pub trait ProgressSink: Send + Sync {
    /// Output of a process: `stream` 1 is stdout, 2 is stderr.
    fn log(&self, stream: i64, data: &[u8]);
    /// Status of a sub-task such as one layer download: `id` is stable across updates, `name` is
    /// what a user sees, `current`/`total` count bytes, `done` marks the last update.
    fn status(&self, id: &str, name: &str, current: u64, total: Option<u64>, done: bool);
}

/// A [`ProgressSink`] that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn log(&self, _stream: i64, _data: &[u8]) {}
    fn status(&self, _id: &str, _name: &str, _current: u64, _total: Option<u64>, _done: bool) {}
}

/// A read-only view of a snapshot's full tree on the host, valid while the value lives.
///
/// Dropping it releases whatever was needed to present the tree (for example an overlay mount).
pub struct SnapshotView {
    path: PathBuf,
    _release: Option<Box<dyn Send + Sync>>,
}

impl SnapshotView {
    /// A view of `path` that holds `release` (dropped, and so run, after the view is dropped).
    pub fn new(path: PathBuf, release: Option<Box<dyn Send + Sync>>) -> Self {
        Self {
            path,
            _release: release,
        }
    }

    /// The root of the tree. Do not write under it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What kind of data a usage record holds; the strings are BuildKit's `RecordType`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RecordType {
    /// A layer or op result.
    #[default]
    Regular,
    /// A copy of a local source (the build context).
    SourceLocal,
    /// A `RUN --mount=type=cache` directory.
    ExecCacheMount,
    /// A git checkout.
    GitCheckout,
    /// Used by the daemon itself.
    Internal,
    /// Read by a frontend (the Dockerfile).
    Frontend,
}

impl RecordType {
    /// BuildKit's name (`regular`, `source.local`, `exec.cachemount`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::Regular => "regular",
            RecordType::SourceLocal => "source.local",
            RecordType::ExecCacheMount => "exec.cachemount",
            RecordType::GitCheckout => "source.git.checkout",
            RecordType::Internal => "internal",
            RecordType::Frontend => "frontend",
        }
    }
}

/// Usage of one snapshot or cache mount, as [`Worker::usage`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// The id [`Worker::prune`] takes.
    pub id: SnapshotId,
    /// The snapshot below this one.
    pub parent: Option<SnapshotId>,
    /// Bytes of the snapshot's own data (not its parents').
    pub size: u64,
    /// When it was made.
    pub created: std::time::SystemTime,
    /// When it was last used, `None` if never since it was made.
    pub last_used: Option<std::time::SystemTime>,
    /// How many times it was used.
    pub usage_count: u64,
    /// Whether a running build holds it.
    pub in_use: bool,
    /// What it holds.
    pub record_type: RecordType,
    /// Human-readable origin (`pulled from …`, `mount / from exec …`).
    pub description: String,
    /// Whether it can still change (cache mounts).
    pub mutable: bool,
    /// Whether its content is shared with an image store outside the worker.
    pub shared: bool,
}

/// Keeps snapshots in use while it lives (see [`Worker::hold`]).
#[derive(Default)]
pub struct Lease {
    _release: Option<Box<dyn Send + Sync>>,
}

impl Lease {
    /// A lease that drops (and so runs) `release` when it is dropped.
    pub fn new(release: Box<dyn Send + Sync>) -> Self {
        Self {
            _release: Some(release),
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}

/// A failure of the session behind an [`ExecSession`].
pub type SessionError = Box<dyn std::error::Error + Send + Sync>;

/// What an exec can ask of the client that started the build (its session): the values of
/// secrets and connections to SSH agents. The daemon implements it over the build's session.
#[async_trait]
pub trait ExecSession: Send + Sync + std::fmt::Debug {
    /// The value of secret `id`, `None` when the client does not have it.
    async fn secret(&self, id: &str) -> Result<Option<Vec<u8>>, SessionError>;

    /// Whether the client forwards an SSH agent named `id`.
    async fn has_ssh_agent(&self, id: &str) -> Result<bool, SessionError>;

    /// Forwards one connection made to the agent socket inside the container to the client's
    /// agent `id`, until either side closes it.
    async fn forward_ssh(
        &self,
        id: &str,
        conn: std::os::unix::net::UnixStream,
    ) -> Result<(), SessionError>;
}

/// An [`ExecSession`] without a client: no secret, no agent (builds without a session, tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSession;

#[async_trait]
impl ExecSession for NoSession {
    async fn secret(&self, _id: &str) -> Result<Option<Vec<u8>>, SessionError> {
        Ok(None)
    }

    async fn has_ssh_agent(&self, _id: &str) -> Result<bool, SessionError> {
        Ok(false)
    }

    async fn forward_ssh(
        &self,
        id: &str,
        _conn: std::os::unix::net::UnixStream,
    ) -> Result<(), SessionError> {
        Err(format!("no session to forward ssh agent {id} over").into())
    }
}

/// A worker failure. `kiln_image` causes are boxed to keep `Result<_, Error>` small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A process of an `ExecOp` exited with a status not accepted as success. The message is
    /// BuildKit's, word for word, because users and tests match on it.
    #[error("process \"{command}\" did not complete successfully: exit code: {exit_code}")]
    ExecFailed {
        /// The process arguments joined by spaces.
        command: String,
        /// The exit status (128 + signal when killed by a signal).
        exit_code: i32,
    },
    /// The snapshot does not exist in this worker.
    #[error("snapshot {id} not found")]
    SnapshotNotFound {
        /// The unknown id.
        id: SnapshotId,
    },
    /// An op refers to an input that was not given, or is malformed.
    #[error("invalid {op}: {reason}")]
    InvalidOp {
        /// `exec` or `file`.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An exec for a platform the worker cannot run (no binfmt emulation for it): refused
    /// before the process starts, where it would fail with `exec format error` or worse.
    #[error(
        "exec format error: building for {platform} on a {host} host needs binfmt emulation \
         (qemu-user-static registered with binfmt_misc, and the platform listed in the worker's \
         platforms, e.g. kilnd --oci-worker-platform); this worker runs {available}"
    )]
    ForeignPlatform {
        /// The platform the step is for.
        platform: String,
        /// The worker's native platform.
        host: String,
        /// Every platform the worker runs, comma-separated.
        available: String,
    },
    /// The op asks for something this worker does not implement.
    #[error("{what} is not supported by this worker")]
    Unsupported {
        /// The feature.
        what: String,
    },
    /// Resolving an image reference against its registry failed.
    #[error("failed to resolve {reference}")]
    Resolve {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<kiln_image::Error>,
    },
    /// The registry client could not be created.
    #[error("failed to create registry client")]
    RegistryClient {
        /// The cause.
        #[source]
        source: Box<kiln_image::Error>,
    },
    /// The content store failed.
    #[error("content store failed at {path}")]
    Content {
        /// The store or blob path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<kiln_image::Error>,
    },
    /// Fetching or unpacking a layer failed.
    #[error("failed to pull layer {digest}")]
    Pull {
        /// The layer blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: Box<kiln_image::Error>,
    },
    /// A layer's uncompressed digest does not match the image config.
    #[error("layer {digest} has diff id {actual}, image config says {expected}")]
    DiffIdMismatch {
        /// The layer blob.
        digest: Digest,
        /// What the config says.
        expected: Digest,
        /// What the blob holds.
        actual: Digest,
    },
    /// Writing a snapshot as a layer blob failed.
    #[error("failed to export snapshot {id} as a layer")]
    Export {
        /// The snapshot.
        id: SnapshotId,
        /// The cause.
        #[source]
        source: Box<kiln_image::Error>,
    },
    /// A file action of a `FileOp` failed.
    #[error("file action {index} ({action}) failed on {path}: {reason}")]
    FileAction {
        /// Index of the action in the op.
        index: usize,
        /// `copy`, `mkdir`, `mkfile`, `rm` or `symlink`.
        action: &'static str,
        /// The path inside the snapshot.
        path: String,
        /// What went wrong.
        reason: String,
        /// The cause, when it is an I/O error.
        #[source]
        source: Option<io::Error>,
    },
    /// A required `RUN --mount=type=secret` names a secret the client does not have.
    #[error("secret {id} not found (give it to the build with --secret id={id},src=<file> or --secret id={id},env=<variable>)")]
    SecretNotFound {
        /// The secret id.
        id: String,
    },
    /// A required `RUN --mount=type=ssh` names an agent the client does not forward.
    #[error("no ssh agent {id:?} forwarded from the client (give it to the build with --ssh {id}[=<socket>])")]
    SshNotForwarded {
        /// The agent id.
        id: String,
    },
    /// Asking the client's session for a secret or an agent failed.
    #[error("failed to {what} over the session")]
    Session {
        /// What was being done, e.g. `get secret mysecret`.
        what: String,
        /// The cause.
        #[source]
        source: SessionError,
    },
    /// The container runtime could not run the process.
    #[error("failed to run container {id}: {reason}")]
    Runtime {
        /// The container id.
        id: String,
        /// What failed.
        reason: String,
        /// The cause, when it is an I/O error.
        #[source]
        source: Option<io::Error>,
    },
    /// A call to the service behind the worker (containerd's API for the containerd worker)
    /// failed.
    #[error("failed to {op}")]
    Backend {
        /// What was being done, e.g. `commit snapshot <name>`.
        op: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A filesystem operation of the worker failed.
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A build backend: content, snapshots, and the ability to run LLB ops on them.
///
/// All methods may be called concurrently. A future that is dropped before completion (the
/// client went away) must leave nothing behind: no mounts, no containers, no temporary
/// directories, no half-written snapshot.
#[async_trait]
pub trait Worker: Send + Sync {
    /// A stable random id, persisted in the worker's state.
    fn id(&self) -> &str;

    /// Labels reported by `ListWorkers` (keys prefixed with [`LABEL_PREFIX`] plus configured ones).
    fn labels(&self) -> BTreeMap<String, String>;

    /// Platforms this worker can run processes for, preferred first.
    fn platforms(&self) -> Vec<Platform>;

    /// The worker's blob store: pulled layers, exported layers.
    fn content(&self) -> &ContentStore;

    /// Resolves `reference` to a manifest and config for `platform` (no layer is fetched).
    async fn resolve_image(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage, Error>;

    /// Fetches and unpacks the layers of `image`; returns the top snapshot, `None` for an image
    /// without layers. Layers already unpacked (same chain) are reused.
    async fn pull(
        &self,
        image: &ResolvedImage,
        progress: &dyn ProgressSink,
    ) -> Result<Option<SnapshotId>, Error>;

    /// Whether the solver may defer [`pull`](Self::pull) of a base image until a step needs
    /// its tree (BuildKit's lazy refs). Until then a result that is the image itself is exported
    /// from the manifest's layer descriptors, whose blobs are *not* in
    /// [`content`](Self::content): exporters fetch them from the image's registry, or a push
    /// mounts them from it. The default (`false`) keeps pulls eager.
    fn pulls_lazily(&self) -> bool {
        false
    }

    /// Makes a snapshot holding a copy of the directory `dir` (for local sources).
    async fn snapshot_from_dir(&self, dir: &Path) -> Result<SnapshotId, Error>;

    /// Runs an `ExecOp`. `inputs[i]` is the snapshot of op input `i` (`None` = scratch). Returns
    /// one entry per mount with `output >= 0`, ordered by output index.
    async fn exec(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error>;

    /// [`exec`](Self::exec) with the build's session, which serves the secrets and SSH agents of
    /// `type=secret` and `type=ssh` mounts. The default ignores the session (a worker that
    /// cannot mount secrets fails on such mounts in `exec`).
    async fn exec_in_session(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        session: std::sync::Arc<dyn ExecSession>,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        let _ = session;
        self.exec(op, inputs, progress).await
    }

    /// Runs a `FileOp`. Returns one entry per action output index, ordered by it.
    async fn file(
        &self,
        op: &pb::FileOp,
        inputs: &[Option<SnapshotId>],
    ) -> Result<Vec<Option<SnapshotId>>, Error>;

    /// Whether the snapshot exists.
    fn exists(&self, id: &SnapshotId) -> bool;

    /// A read-only view of the snapshot's full tree (for frontends reading build files).
    async fn snapshot_path(&self, id: &SnapshotId) -> Result<SnapshotView, Error>;

    /// The layers of the snapshot chain ending at `id`, bottom → top, blobs in
    /// [`content`](Self::content). Each snapshot is compressed at most once.
    async fn layers(&self, id: &SnapshotId) -> Result<Vec<Layer>, Error>;

    /// Usage of every snapshot and cache mount the worker holds, for `DiskUsage` and `Prune`.
    /// Workers that do not track usage report nothing.
    async fn usage(&self) -> Result<Vec<SnapshotUsage>, Error> {
        Ok(Vec::new())
    }

    /// Removes the snapshots (and cache mounts) of `ids` that are not in use and are not the
    /// parent of a snapshot that stays; returns the ids actually removed. Unknown ids are
    /// skipped. Workers that cannot remove anything return an empty list.
    async fn prune(&self, ids: &[SnapshotId]) -> Result<Vec<SnapshotId>, Error> {
        let _ = ids;
        Ok(Vec::new())
    }

    /// Marks `ids` as in use until the returned [`Lease`] is dropped: [`prune`](Self::prune)
    /// does not remove them meanwhile. Take the lease before checking
    /// [`exists`](Self::exists), so a concurrent prune cannot slip in between.
    fn hold(&self, ids: &[SnapshotId]) -> Lease {
        let _ = ids;
        Lease::default()
    }

    /// Records that `ids` were used now (a cache hit on them, or an op running on them): updates
    /// their last-used time and usage count.
    fn record_use(&self, ids: &[SnapshotId]) {
        let _ = ids;
    }

    /// The image store this worker's images can be named and unpacked in (BuildKit's
    /// `ImageStore`), `None` when it has none (the OCI worker: the image exporter then cannot
    /// name or unpack images).
    fn image_store(&self) -> Option<&dyn ImageStore> {
        None
    }
}

/// Named images next to a worker's snapshots (containerd's image service for the containerd
/// worker): base images found locally, exported images named and unpacked.
#[async_trait]
pub trait ImageStore: Send + Sync {
    /// The image `reference` for `platform` when the store holds it (manifest and config read
    /// from the store), `None` when it has no image of that name.
    async fn resolve_local(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error>;

    /// Names `manifest` (a manifest or an index, with everything it references in `content`)
    /// `name`: copies the blobs the store lacks, then creates the image record or moves an
    /// existing one to the new target.
    async fn create_image(
        &self,
        name: &str,
        manifest: &Descriptor,
        content: &ContentStore,
    ) -> Result<(), Error>;

    /// Unpacks the image `name` for `platform` into the worker's snapshotter so containers can
    /// run it.
    async fn unpack(&self, name: &str, platform: &Platform) -> Result<(), Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_failed_message_is_buildkits() {
        let err = Error::ExecFailed {
            command: "/bin/sh -c false".into(),
            exit_code: 1,
        };
        assert_eq!(
            err.to_string(),
            "process \"/bin/sh -c false\" did not complete successfully: exit code: 1"
        );
    }

    #[test]
    fn error_stays_small() {
        assert!(std::mem::size_of::<Error>() <= 96);
    }

    #[test]
    fn snapshot_view_runs_release_on_drop() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(AtomicBool::new(false));
        let view = SnapshotView::new("/x".into(), Some(Box::new(Flag(flag.clone()))));
        assert_eq!(view.path(), Path::new("/x"));
        assert!(!flag.load(Ordering::SeqCst));
        drop(view);
        assert!(flag.load(Ordering::SeqCst));
    }
}
