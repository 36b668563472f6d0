//! The solver: turns an LLB definition into snapshots on a worker.
//!
//! For every vertex reachable from the result it computes a [`CacheKey`]
//! from what determines the vertex's output — the op itself with its input
//! digests cleared, the cache keys of its inputs, and for sources the
//! identity of what they read (the image manifest digest, a content checksum
//! of the local directory) — and looks the key up in the persistent
//! [`CacheRecords`]. A hit whose snapshots still exist is reported as cached
//! and not run. Everything else runs on the [`Worker`], with independent
//! vertices running concurrently (each vertex is a shared future awaiting its
//! inputs), and its result is recorded.
//!
//! Local sources come through [`LocalSources`] (the daemon serves them from
//! the client's session); progress goes out through [`ProgressWriter`].
//!
//! Every snapshot a solve touches is leased from the worker until the
//! [`SolveResult`] (its [`Leases`]) is dropped, so a concurrent
//! [`Solver::prune`] never removes what a running build uses. Pruning and
//! garbage-collection policies live in [`usage`].
//!
//! Every vertex that was not cached says why in a stderr log line
//! `kiln: cache miss: <reason>` (`instruction changed`, `build arg changed:
//! NAME`, `file changed: <path>`, `base image changed: <old> → <new>`,
//! `input <n> changed (<input name>)`, `first build`, `cache disabled`),
//! from the last key parts of the same vertex identity kept by
//! [`explain::ExplainIndex`] next to the cache records.

pub mod cache;
pub mod explain;
mod git;
mod http;
pub mod import;
pub mod progress;
pub mod selector;
pub mod usage;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_llb::Graph;
use kiln_proto::pb;
use kiln_worker::{Layer, Lease, SnapshotId, SnapshotUsage, Worker};
use prost::Message;
use sha2::{Digest as _, Sha256};

pub use cache::{CacheKey, CacheRecord, CacheRecords};
pub use import::{CacheImport, CacheImports, CacheVertex, ImportedResult};
pub use progress::{ProgressWriter, VertexProgress};
pub use usage::{default_gc_policy, DiskStat, Filter, FilterError, GcLimits, PruneOptions};

/// A boxed error from a collaborator (session, frontend).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a vertex comes from in the user's source (a Dockerfile range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRange {
    /// File name as the frontend recorded it (`Dockerfile`).
    pub filename: String,
    /// First line, 1-based.
    pub start_line: u32,
    /// Last line, 1-based.
    pub end_line: u32,
    /// The whole source text, for rendering the excerpt.
    pub data: Vec<u8>,
}

/// Solver errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The definition is not a valid LLB graph.
    #[error("invalid build definition")]
    Definition(#[source] kiln_llb::Error),
    /// A vertex failed on the worker.
    #[error("{source}")]
    Vertex {
        /// Vertex name (`[2/2] RUN false`).
        name: String,
        /// Where the vertex comes from, if the frontend said.
        location: Option<Box<SourceRange>>,
        /// The worker's error.
        #[source]
        source: Box<kiln_worker::Error>,
    },
    /// Reading a local source from the client failed.
    #[error("failed to transfer local source {name:?}")]
    Local {
        /// Local name (`context`).
        name: String,
        /// The session error.
        #[source]
        source: BoxError,
    },
    /// An op kind or source scheme kiln cannot run yet.
    #[error("{what} is not supported yet")]
    Unsupported {
        /// What was asked for.
        what: String,
    },
    /// Downloading an http(s) source failed.
    #[error("failed to fetch {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Fetching a git source failed.
    #[error("failed to fetch git repository {url}: {reason}")]
    Git {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A source identifier could not be understood.
    #[error("invalid source {identifier:?}: {reason}")]
    InvalidSource {
        /// The identifier.
        identifier: String,
        /// Why.
        reason: String,
    },
    /// A filesystem error in the solver's own state.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An input of this vertex failed (the first failure is reported).
    #[error(transparent)]
    Input(Arc<Error>),
    /// A disk-usage or prune filter is invalid.
    #[error("invalid usage filter")]
    Filter(#[source] FilterError),
    /// A result of an imported cache could not be applied.
    #[error("failed to import cache result {key}")]
    Import {
        /// The cache key.
        key: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The worker failed to report or remove snapshots.
    #[error("failed to {op} snapshots")]
    Worker {
        /// `list` or `prune`.
        op: &'static str,
        /// The worker's error.
        #[source]
        source: Box<kiln_worker::Error>,
    },
}

impl Error {
    /// The innermost vertex failure, skipping `Input` wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Input(inner) => inner.root(),
            other => other,
        }
    }

    /// The source location of the failing vertex, if known.
    pub fn location(&self) -> Option<&SourceRange> {
        match self.root() {
            Error::Vertex { location, .. } => location.as_deref(),
            _ => None,
        }
    }
}

/// Supplies local sources (`local://<name>`) — the daemon implements it over
/// the client's session.
#[async_trait::async_trait]
pub trait LocalSources: Send + Sync {
    /// Brings the local directory `name` up to date on the daemon side and
    /// returns the directory holding it. `attrs` are the source op's attrs
    /// (session id, include/exclude patterns, followpaths, shared key hint).
    async fn sync(
        &self,
        name: &str,
        attrs: &BTreeMap<String, String>,
        progress: &VertexProgress,
    ) -> Result<PathBuf, BoxError>;
}

/// Counters of one solve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SolveStats {
    /// Vertices taken from the cache.
    pub cached: usize,
    /// Vertices run.
    pub executed: usize,
}

/// The worker leases a solve holds: every snapshot it used or made stays in use (unprunable)
/// until the last clone is dropped.
#[derive(Clone, Debug, Default)]
pub struct Leases(Arc<std::sync::Mutex<Vec<Lease>>>);

impl Leases {
    fn push(&self, lease: Lease) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(lease);
    }
}

/// The outcome of a solve.
#[derive(Clone, Debug)]
pub struct SolveResult {
    /// The result snapshot (`None` = scratch or empty definition).
    pub snapshot: Option<SnapshotId>,
    /// Cache key of the result vertex.
    pub cache_key: Option<CacheKey>,
    /// Cache hit / run counts.
    pub stats: SolveStats,
    /// When the result was first made (seconds since the epoch): a fully
    /// cached rebuild reports the original time, so its image is identical.
    pub created: Option<u64>,
    /// Keeps the snapshots of this solve from being pruned while the result
    /// is exported; drop the result to release them.
    pub leases: Leases,
    /// Every vertex that resolved, inputs before the vertices using them
    /// (what a cache exporter writes).
    pub vertices: Vec<CacheVertex>,
    /// The result is a base image the worker has not pulled (see
    /// [`Worker::pulls_lazily`]): `snapshot` is `None` and this says what it is.
    pub lazy: Option<LazyImage>,
}

/// A result that is a registry image not pulled yet: its layers as the manifest names them
/// (blobs in the registry, not necessarily in the worker's content store), and the pull that
/// makes its snapshot when an exporter needs the tree.
#[derive(Clone)]
pub struct LazyImage {
    /// The image, as resolved (its layer blobs live in this repository).
    pub reference: Reference,
    /// Its layers, bottom → top: the manifest's descriptors (digests and media types as they
    /// are) with the config's diff ids.
    pub layers: Vec<Layer>,
    materialize: MaterializeFuture,
}

impl LazyImage {
    /// Pulls the image (once, shared with every other user of the same solve) and returns its
    /// snapshot, `None` for an image without layers.
    pub async fn snapshot(&self) -> Result<Option<SnapshotId>, Arc<Error>> {
        let made = self.materialize.clone().await?;
        Ok(made.outputs.first().cloned().flatten())
    }
}

impl fmt::Debug for LazyImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyImage")
            .field("reference", &self.reference.to_string())
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

/// Per-solve options.
#[derive(Clone, Debug, Default)]
pub struct SolveOptions {
    /// Ignore the cache for every vertex (results are still recorded).
    pub no_cache: bool,
    /// Caches imported for this solve (`--cache-from`), consulted after the
    /// worker's own records.
    pub cache_imports: CacheImports,
    /// The client's session for secret and ssh mounts of execs (`None`: no secrets, no
    /// agents). Secret values never enter cache keys: an exec's key names only the ids.
    pub session: Option<Arc<dyn kiln_worker::ExecSession>>,
}

/// The solver of one worker.
pub struct Solver {
    worker: Arc<dyn Worker>,
    records: CacheRecords,
    /// First-use times of lazily pulled images (see [`lazy_created`]).
    lazy_images: CacheRecords,
    explain: explain::ExplainIndex,
    state_dir: PathBuf,
    /// One prune at a time (API and garbage collection).
    prune_lock: tokio::sync::Mutex<()>,
    /// Cache keys being computed right now, by any build.
    inflight: InFlight,
    /// Bounds the ops running at once on the worker (`max-parallelism`); `None` = unbounded.
    parallelism: Option<Arc<tokio::sync::Semaphore>>,
}

/// One lock per cache key being computed: a build that needs a key another build is computing
/// waits for it and then finds its record, so identical steps of concurrent builds run once.
#[derive(Clone, Default)]
struct InFlight(Arc<std::sync::Mutex<HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>>);

impl InFlight {
    /// Waits until no other build computes `key`, and holds it until the guard drops.
    async fn acquire(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, weak| weak.strong_count() > 0);
            match map.get(key).and_then(|weak| weak.upgrade()) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_string(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

impl fmt::Debug for Solver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Solver")
            .field("worker", &self.worker.id())
            .field("records", &self.records)
            .finish()
    }
}

/// What a vertex produced, once it exists on the worker.
#[derive(Debug)]
struct Materialized {
    outputs: Vec<Option<SnapshotId>>,
    /// When the result was first made (seconds since the epoch): now for
    /// a vertex that ran, the record's time for a cache hit.
    created: u64,
}

/// Makes a vertex's result exist on the worker: already done for a local
/// cache hit, applying layers for an imported result, running the op for a
/// miss. Lazy: a result nothing needs (everything after it came from the
/// cache) is never made.
type MaterializeFuture = Shared<BoxFuture<'static, Result<Arc<Materialized>, Arc<Error>>>>;

/// A vertex with its cache key known.
struct Resolved {
    key: CacheKey,
    /// A cache hit (local or imported).
    cached: bool,
    /// Whether the vertex ran (for a miss: whether its result was needed).
    ran: Arc<std::sync::atomic::AtomicBool>,
    materialize: MaterializeFuture,
    /// For an image source the worker pulls lazily: the image and its layers, so a result
    /// that is the image itself can be exported without the pull.
    lazy: Option<Arc<LazyLayers>>,
}

/// What a lazily pulled image source is made of, known from its manifest and config.
struct LazyLayers {
    reference: Reference,
    layers: Vec<Layer>,
    created: u64,
}

impl Resolved {
    /// A result that exists already.
    fn ready(key: CacheKey, cached: bool, outputs: Vec<Option<SnapshotId>>, created: u64) -> Self {
        let materialize: MaterializeFuture =
            futures::future::ready(Ok(Arc::new(Materialized { outputs, created })))
                .boxed()
                .shared();
        // Polled once here so `peek` sees the result even when nothing awaits
        // it (a local hit below a later hit): the solve's `vertices` report
        // its outputs, and cache exports can carry it.
        let _ = materialize.clone().now_or_never();
        Self {
            key,
            cached,
            ran: Arc::new(std::sync::atomic::AtomicBool::new(!cached)),
            materialize,
            lazy: None,
        }
    }

    fn ran(&self) -> bool {
        self.ran.load(std::sync::atomic::Ordering::SeqCst)
    }
}

type VertexFuture = Shared<BoxFuture<'static, Result<Arc<Resolved>, Arc<Error>>>>;

struct Context {
    worker: Arc<dyn Worker>,
    records: CacheRecords,
    lazy_images: CacheRecords,
    explain: explain::ExplainIndex,
    locals: Arc<dyn LocalSources>,
    progress: ProgressWriter,
    options: SolveOptions,
    leases: Leases,
    inflight: InFlight,
    parallelism: Option<Arc<tokio::sync::Semaphore>>,
    /// The solver's state directory (downloads and http validators live below it).
    state_dir: PathBuf,
}

impl Solver {
    /// A solver for `worker`, keeping cache records in `state_dir/cache`.
    pub fn open(worker: Arc<dyn Worker>, state_dir: &Path) -> Result<Self, Error> {
        let records = CacheRecords::open(&state_dir.join("cache"))?;
        // Opened once: opening removes leftover temporary files, which must not race a write.
        let lazy_images = CacheRecords::open(&state_dir.join(LAZY_IMAGES_DIR))?;
        let explain_dir = state_dir.join("cache").join("explain");
        let explain = explain::ExplainIndex::open(&explain_dir).map_err(|source| Error::Io {
            path: explain_dir,
            source,
        })?;
        Ok(Self {
            worker,
            records,
            lazy_images,
            explain,
            state_dir: state_dir.to_path_buf(),
            prune_lock: tokio::sync::Mutex::new(()),
            inflight: InFlight::default(),
            parallelism: None,
        })
    }

    /// Runs at most `limit` exec and file ops at once (buildkitd's `max-parallelism`); `0`
    /// means unbounded.
    pub fn with_max_parallelism(mut self, limit: usize) -> Self {
        self.parallelism = (limit > 0).then(|| Arc::new(tokio::sync::Semaphore::new(limit)));
        self
    }

    /// The worker this solver runs on.
    pub fn worker(&self) -> &Arc<dyn Worker> {
        &self.worker
    }

    /// The cache records.
    pub fn records(&self) -> &CacheRecords {
        &self.records
    }

    /// Usage records of the worker matching `filters` (BuildKit filter
    /// strings). With `age_limit`, only records used (or made) within it.
    pub async fn disk_usage(
        &self,
        filters: &[String],
        age_limit: Option<std::time::Duration>,
    ) -> Result<Vec<SnapshotUsage>, Error> {
        let filter = Filter::parse(filters).map_err(Error::Filter)?;
        let now = std::time::SystemTime::now();
        let mut records = self.worker.usage().await.map_err(|e| Error::Worker {
            op: "list",
            source: Box::new(e),
        })?;
        records.retain(|r| {
            filter.matches(r)
                && age_limit.is_none_or(|limit| {
                    let last = r.last_used.unwrap_or(r.created);
                    now.duration_since(last).unwrap_or_default() <= limit
                })
        });
        Ok(records)
    }

    /// Removes what `options` selects (see [`usage`]) and the cache records
    /// that point at removed snapshots; returns the removed records.
    pub async fn prune(&self, options: &PruneOptions) -> Result<Vec<SnapshotUsage>, Error> {
        let filter = Filter::parse(&options.filters).map_err(Error::Filter)?;
        let _one_at_a_time = self.prune_lock.lock().await;
        let mut pruned: Vec<SnapshotUsage> = Vec::new();
        loop {
            let records = self.worker.usage().await.map_err(|e| Error::Worker {
                op: "list",
                source: Box::new(e),
            })?;
            let now = std::time::SystemTime::now();
            let parents: std::collections::HashSet<&str> =
                records.iter().filter_map(|r| r.parent.as_deref()).collect();
            let mut candidates: Vec<SnapshotUsage> = records
                .iter()
                .filter(|r| !r.in_use)
                .filter(|r| {
                    options.all
                        || !(r.shared
                            || matches!(
                                r.record_type,
                                kiln_worker::RecordType::Internal
                                    | kiln_worker::RecordType::Frontend
                            ))
                })
                .filter(|r| {
                    options.keep_duration.is_none_or(|keep| {
                        let last = r.last_used.unwrap_or(r.created);
                        now.duration_since(last).unwrap_or_default() > keep
                    })
                })
                .filter(|r| filter.matches(r))
                .cloned()
                .collect();
            let total: u64 = records.iter().filter(|r| !r.shared).map(|r| r.size).sum();
            let disk = DiskStat::of(&self.state_dir).unwrap_or_default();
            let chosen: Vec<SnapshotUsage> = match usage::keep_bytes(total, disk, options) {
                None => candidates,
                Some(keep) if total <= keep => break,
                Some(keep) => {
                    // Leaves only: a parent becomes a candidate once its
                    // children are gone (next round).
                    candidates.retain(|r| !parents.contains(r.id.as_str()));
                    usage::sort_for_deletion(&mut candidates);
                    let mut remaining = total;
                    let mut chosen = Vec::new();
                    for r in candidates {
                        if remaining <= keep {
                            break;
                        }
                        remaining = remaining.saturating_sub(r.size);
                        chosen.push(r);
                    }
                    chosen
                }
            };
            if chosen.is_empty() {
                break;
            }
            let ids: Vec<SnapshotId> = chosen.iter().map(|r| r.id.clone()).collect();
            let removed = self.worker.prune(&ids).await.map_err(|e| Error::Worker {
                op: "prune",
                source: Box::new(e),
            })?;
            if removed.is_empty() {
                break;
            }
            let removed: std::collections::HashSet<SnapshotId> = removed.into_iter().collect();
            self.forget_records(&removed)?;
            pruned.extend(chosen.into_iter().filter(|r| removed.contains(&r.id)));
        }
        if !pruned.is_empty() && self.records.all().is_empty() {
            for (key, _) in self.lazy_images.all() {
                self.lazy_images.remove(&key)?;
            }
        }
        tracing::info!(count = pruned.len(), "pruned build cache");
        Ok(pruned)
    }

    /// Applies garbage-collection policies in order (each one a prune).
    pub async fn gc(&self, policies: &[PruneOptions]) -> Result<Vec<SnapshotUsage>, Error> {
        let mut pruned = Vec::new();
        for policy in policies {
            pruned.extend(self.prune(policy).await?);
        }
        Ok(pruned)
    }

    /// Removes cache records whose outputs include a removed snapshot.
    fn forget_records(&self, removed: &std::collections::HashSet<SnapshotId>) -> Result<(), Error> {
        for (key, record) in self.records.all() {
            if record
                .outputs
                .iter()
                .flatten()
                .any(|id| removed.contains(id))
            {
                self.records.remove(&key)?;
            }
        }
        Ok(())
    }

    /// Solves `definition`: every vertex reachable from its result, in
    /// parallel where the graph allows.
    pub async fn solve(
        &self,
        definition: &pb::Definition,
        locals: Arc<dyn LocalSources>,
        progress: ProgressWriter,
        options: SolveOptions,
    ) -> Result<SolveResult, Arc<Error>> {
        let graph = Arc::new(
            Graph::from_definition(definition).map_err(|e| Arc::new(Error::Definition(e)))?,
        );
        let Some(result) = graph.result() else {
            return Ok(SolveResult {
                snapshot: None,
                cache_key: None,
                stats: SolveStats::default(),
                created: None,
                leases: Leases::default(),
                vertices: Vec::new(),
                lazy: None,
            });
        };
        let context = Arc::new(Context {
            worker: self.worker.clone(),
            records: self.records.clone(),
            lazy_images: self.lazy_images.clone(),
            explain: self.explain.clone(),
            locals,
            progress,
            options,
            leases: Leases::default(),
            inflight: self.inflight.clone(),
            parallelism: self.parallelism.clone(),
            state_dir: self.state_dir.clone(),
        });
        let mut futures: HashMap<String, VertexFuture> = HashMap::new();
        for digest in graph.topological_order().iter().cloned() {
            let inputs: Vec<(VertexFuture, usize)> = graph
                .op(&digest)
                .map(|op| {
                    op.inputs
                        .iter()
                        .filter_map(|input| {
                            futures.get(&input.digest).map(|f| {
                                (
                                    f.clone(),
                                    usize::try_from(input.index).unwrap_or(usize::MAX),
                                )
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let future = run_vertex(context.clone(), graph.clone(), digest.clone(), inputs)
                .boxed()
                .shared();
            futures.insert(digest, future);
        }
        let Some(top) = futures.get(&result.digest).cloned() else {
            return Err(Arc::new(Error::Unsupported {
                what: format!("result vertex {}", result.digest),
            }));
        };
        // Keys first (every vertex is reachable from the result), then the
        // result itself, which makes exactly the inputs it needs.
        let resolved = top.await?;
        let index = usize::try_from(result.index).unwrap_or(usize::MAX);
        // A result that is a base image nobody pulled stays unpulled: exporters take its layers
        // from the registry (and pull it only if they need its tree).
        let lazy = match (&resolved.lazy, resolved.materialize.peek()) {
            (Some(image), None) if index == 0 => Some(LazyImage {
                reference: image.reference.clone(),
                layers: image.layers.clone(),
                materialize: resolved.materialize.clone(),
            }),
            _ => None,
        };
        let materialized = match (&lazy, &resolved.lazy) {
            (Some(_), Some(image)) => Arc::new(Materialized {
                outputs: Vec::new(),
                created: image.created,
            }),
            _ => resolved.materialize.clone().await?,
        };
        let mut stats = SolveStats::default();
        for digest in graph.topological_order() {
            let Some(Ok(r)) = futures.get(digest).and_then(|f| f.peek()) else {
                continue;
            };
            if r.ran() {
                stats.executed += 1;
            } else {
                stats.cached += 1;
                // A miss whose result nothing needed: its key matched up to
                // a later cache hit, so it counts (and shows) as cached.
                if !r.cached {
                    if let Some(op) = graph.op(digest) {
                        let inputs = op.inputs.iter().map(|i| i.digest.clone()).collect();
                        context
                            .progress
                            .start_vertex(digest, &vertex_name(&graph, digest, op), inputs)
                            .cached();
                    }
                }
            }
        }
        let snapshot = materialized.outputs.get(index).cloned().flatten();
        let mut vertices = Vec::new();
        for digest in graph.topological_order() {
            let Some(Ok(vertex)) = futures.get(digest).and_then(|f| f.peek()) else {
                continue;
            };
            let inputs = graph
                .op(digest)
                .map(|op| {
                    op.inputs
                        .iter()
                        .filter_map(|input| {
                            let Some(Ok(r)) = futures.get(&input.digest).and_then(|f| f.peek())
                            else {
                                return None;
                            };
                            Some((r.key.clone(), usize::try_from(input.index).ok()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let (outputs, created) = match vertex.materialize.peek() {
                Some(Ok(m)) => (m.outputs.clone(), m.created),
                _ => (Vec::new(), 0),
            };
            vertices.push(CacheVertex {
                key: vertex.key.clone(),
                inputs,
                outputs,
                created,
                is_result: *digest == result.digest,
            });
        }
        Ok(SolveResult {
            snapshot,
            cache_key: Some(resolved.key.clone()),
            stats,
            created: Some(materialized.created),
            leases: context.leases.clone(),
            vertices,
            lazy,
        })
    }
}

fn vertex_name(graph: &Graph, digest: &str, op: &pb::Op) -> String {
    if let Some(name) = graph
        .metadata(digest)
        .and_then(|m| m.description.get("llb.customname"))
    {
        return name.clone();
    }
    match &op.op {
        Some(pb::op::Op::Source(source)) => source.identifier.clone(),
        Some(pb::op::Op::Exec(exec)) => exec
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_else(|| "exec".to_string()),
        Some(pb::op::Op::File(_)) => "file".to_string(),
        _ => digest.to_string(),
    }
}

fn location(graph: &Graph, digest: &str) -> Option<SourceRange> {
    let location = graph.source_location(digest)?;
    let start = location.ranges.iter().map(|r| r.start).min()?;
    let end = location.ranges.iter().map(|r| r.end).max()?;
    Some(SourceRange {
        filename: location.filename,
        start_line: u32::try_from(start).unwrap_or(0),
        end_line: u32::try_from(end).unwrap_or(0),
        data: location.data,
    })
}

async fn run_vertex(
    context: Arc<Context>,
    graph: Arc<Graph>,
    digest: String,
    inputs: Vec<(VertexFuture, usize)>,
) -> Result<Arc<Resolved>, Arc<Error>> {
    let op = graph.op(&digest).cloned().ok_or_else(|| {
        Arc::new(Error::Unsupported {
            what: format!("vertex {digest}"),
        })
    })?;
    // Input keys first, concurrently (their results are made only if this
    // vertex has to run).
    let mut input_keys = Vec::with_capacity(inputs.len());
    let mut input_resolved = Vec::with_capacity(inputs.len());
    let results = futures::future::join_all(inputs.iter().map(|(f, _)| f.clone())).await;
    for (result, (_, index)) in results.into_iter().zip(inputs.iter()) {
        let resolved = result.map_err(|e| Arc::new(Error::Input(e)))?;
        input_keys.push(format!("{}:{}", resolved.key, index));
        input_resolved.push((resolved, *index));
    }

    let name = vertex_name(&graph, &digest, &op);
    let ignore_cache =
        context.options.no_cache || graph.metadata(&digest).is_some_and(|m| m.ignore_cache);
    let input_digests: Vec<String> = op.inputs.iter().map(|i| i.digest.clone()).collect();
    let vertex_error = {
        let (name, graph, digest) = (name.clone(), graph.clone(), digest.clone());
        move |source: kiln_worker::Error| {
            Arc::new(Error::Vertex {
                name: name.clone(),
                location: location(&graph, &digest).map(Box::new),
                source: Box::new(source),
            })
        }
    };

    match &op.op {
        Some(pb::op::Op::Source(source)) => {
            let progress = context.progress.start_vertex(&digest, &name, input_digests);
            let result = run_source(
                &context,
                source,
                op.platform.as_ref(),
                ignore_cache,
                &progress,
                &name,
                Arc::new(vertex_error.clone()),
            )
            .await;
            finish(&progress, result, vertex_error)
        }
        Some(pb::op::Op::Exec(_)) | Some(pb::op::Op::File(_)) => {
            let mut stripped = op.clone();
            stripped.inputs.clear();
            let op_bytes = stripped.encode_to_vec();
            let content_keys = match &op.op {
                Some(pb::op::Op::File(file)) => {
                    // Only local-source inputs are read here; they exist
                    // already (a local source is always transferred).
                    let mut snapshots = Vec::with_capacity(input_resolved.len());
                    for (input, (resolved, index)) in op.inputs.iter().zip(&input_resolved) {
                        let is_local = matches!(
                            graph.op(&input.digest).and_then(|o| o.op.as_ref()),
                            Some(pb::op::Op::Source(source)) if source.identifier.starts_with("local://")
                        );
                        if !is_local {
                            snapshots.push(None);
                            continue;
                        }
                        let made = resolved
                            .materialize
                            .clone()
                            .await
                            .map_err(|e| Arc::new(Error::Input(e)))?;
                        snapshots.push(made.outputs.get(*index).cloned().flatten());
                    }
                    copy_source_keys(&context, &graph, &op, file, &snapshots).await
                }
                _ => vec![(None, BTreeMap::new()); input_keys.len()],
            };
            let mut parts: Vec<(&str, &[u8])> = vec![("op", &op_bytes)];
            let mut explained = explain::KeyParts {
                op: hex::encode(Sha256::digest(&op_bytes)),
                env: match &op.op {
                    Some(pb::op::Op::Exec(exec)) => exec
                        .meta
                        .iter()
                        .flat_map(|m| m.env.iter())
                        .filter_map(|e| e.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    _ => BTreeMap::new(),
                },
                ..Default::default()
            };
            for (key, (content, files)) in input_keys.iter().zip(&content_keys) {
                match content {
                    Some(content) => {
                        parts.push(("input-content", content.as_bytes()));
                        explained.inputs.push(format!("content:{content}"));
                    }
                    None => {
                        parts.push(("input", key.as_bytes()));
                        explained.inputs.push(key.clone());
                    }
                }
                explained.files.push(files.clone());
            }
            let key = CacheKey::from_parts(parts);
            if !ignore_cache {
                if let Some(resolved) = lookup(&context, &key) {
                    context
                        .progress
                        .start_vertex(&digest, &name, input_digests)
                        .cached();
                    return Ok(Arc::new(resolved));
                }
                let progress = context
                    .progress
                    .start_vertex(&digest, &name, input_digests.clone());
                if let Some(resolved) = import_lookup(&context, &key, &name, &progress) {
                    progress.cached();
                    return Ok(Arc::new(resolved));
                }
                // Not cached: the vertex shows when (and if) it runs.
                drop(progress);
            }
            let reason = if ignore_cache {
                "cache disabled".to_string()
            } else {
                let input_names: Vec<String> = op
                    .inputs
                    .iter()
                    .map(|i| {
                        graph
                            .op(&i.digest)
                            .map(|o| vertex_name(&graph, &i.digest, o))
                            .unwrap_or_default()
                    })
                    .collect();
                context.explain.explain(&name, &explained, &input_names)
            };
            let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let run = {
                let ran = ran.clone();
                let key = key.clone();
                async move {
                    ran.store(true, std::sync::atomic::Ordering::SeqCst);
                    let made = futures::future::join_all(
                        input_resolved.iter().map(|(r, _)| r.materialize.clone()),
                    )
                    .await;
                    let mut input_snapshots = Vec::with_capacity(made.len());
                    for (made, (_, index)) in made.into_iter().zip(&input_resolved) {
                        let made = made.map_err(|e| Arc::new(Error::Input(e)))?;
                        input_snapshots.push(made.outputs.get(*index).cloned().flatten());
                    }
                    // Another build computing the same key: wait for it, then
                    // take its record.
                    let _computing = match ignore_cache {
                        false => Some(context.inflight.acquire(key.as_str()).await),
                        true => None,
                    };
                    if !ignore_cache {
                        if let Some(resolved) = lookup(&context, &key) {
                            ran.store(false, std::sync::atomic::Ordering::SeqCst);
                            context
                                .progress
                                .start_vertex(&digest, &name, input_digests)
                                .cached();
                            return resolved.materialize.clone().await;
                        }
                    }
                    let progress = context.progress.start_vertex(&digest, &name, input_digests);
                    progress.log(2, format!("{}{reason}\n", explain::MISS_PREFIX).as_bytes());
                    let used: Vec<SnapshotId> = input_snapshots.iter().flatten().cloned().collect();
                    context.worker.record_use(&used);
                    let _permit = match &context.parallelism {
                        Some(limit) => limit.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    let result = match &op.op {
                        Some(pb::op::Op::Exec(exec)) => {
                            let session: Arc<dyn kiln_worker::ExecSession> =
                                match &context.options.session {
                                    Some(session) => session.clone(),
                                    None => Arc::new(kiln_worker::NoSession),
                                };
                            match foreign_platform(
                                op.platform.as_ref(),
                                &context.worker.platforms(),
                            ) {
                                Some(refused) => Err(refused),
                                None => {
                                    context
                                        .worker
                                        .exec_in_session(exec, &input_snapshots, session, &progress)
                                        .await
                                }
                            }
                        }
                        Some(pb::op::Op::File(file)) => {
                            context.worker.file(file, &input_snapshots).await
                        }
                        _ => Ok(Vec::new()),
                    };
                    let result = result.map_err(SourceFailure::Worker).and_then(|outputs| {
                        hold(&context, &outputs);
                        let created = now_secs();
                        record(&context, &key, &outputs, &name, created)?;
                        remember(
                            &context,
                            &explain::exact_identity(&name, &explained.op),
                            &explained,
                        );
                        remember(&context, &explain::step_identity(&name), &explained);
                        Ok(Materialized { outputs, created })
                    });
                    match result {
                        Ok(made) => {
                            progress.done();
                            Ok(Arc::new(made))
                        }
                        Err(failure) => {
                            let error = match failure {
                                SourceFailure::Worker(e) => vertex_error(e),
                                SourceFailure::Other(e) => e,
                            };
                            progress.failed(&error.to_string());
                            Err(error)
                        }
                    }
                }
            };
            let materialize = run.boxed().shared();
            if ignore_cache {
                // As in BuildKit, a step that ignores the cache runs whenever the solve reaches
                // it, even when every step after it would be a cache hit: a dependent's key
                // waits for its result (`--no-cache-filter` of a stage only copied from).
                materialize.clone().await?;
            }
            Ok(Arc::new(Resolved {
                key,
                cached: false,
                ran,
                materialize,
                lazy: None,
            }))
        }
        Some(pb::op::Op::Merge(_)) => Err(Arc::new(Error::Unsupported {
            what: "merge op".to_string(),
        })),
        Some(pb::op::Op::Diff(_)) => Err(Arc::new(Error::Unsupported {
            what: "diff op".to_string(),
        })),
        Some(pb::op::Op::Build(_)) => Err(Arc::new(Error::Unsupported {
            what: "build op".to_string(),
        })),
        None => Err(Arc::new(Error::Unsupported {
            what: "an op without a kind".to_string(),
        })),
    }
}

/// Why a vertex failed, before it is wrapped with its name.
enum SourceFailure {
    Worker(kiln_worker::Error),
    Other(Arc<Error>),
}

fn finish(
    progress: &VertexProgress,
    result: Result<Resolved, SourceFailure>,
    vertex_error: impl Fn(kiln_worker::Error) -> Arc<Error>,
) -> Result<Arc<Resolved>, Arc<Error>> {
    match result {
        Ok(resolved) => {
            if resolved.cached {
                progress.cached();
            } else {
                progress.done();
            }
            Ok(Arc::new(resolved))
        }
        Err(failure) => {
            let error = match failure {
                SourceFailure::Worker(e) => vertex_error(e),
                SourceFailure::Other(e) => e,
            };
            progress.failed(&error.to_string());
            Err(error)
        }
    }
}

/// How many context entries a step's miss explanation records file by file (beyond it, a
/// changed directory is named instead of the file in it).
const EXPLAIN_FILES_BUDGET: usize = 50_000;

/// For each input of a FileOp: when the input is a local source read only
/// as the source of copies, a checksum of exactly what those copies read
/// (so other files of the context do not affect the step's key); `None`
/// where the input's full key must be used.
async fn copy_source_keys(
    context: &Context,
    graph: &Graph,
    op: &pb::Op,
    file: &pb::FileOp,
    snapshots: &[Option<SnapshotId>],
) -> Vec<(Option<String>, BTreeMap<String, String>)> {
    let mut keys = vec![(None, BTreeMap::new()); op.inputs.len()];
    for (index, input) in op.inputs.iter().enumerate() {
        let is_local = matches!(
            graph.op(&input.digest).and_then(|o| o.op.as_ref()),
            Some(pb::op::Op::Source(source)) if source.identifier.starts_with("local://")
        );
        let Some(Some(snapshot)) = snapshots.get(index) else {
            continue;
        };
        let index = index as i64;
        let mut copies = Vec::new();
        let mut only_copies = true;
        for action in &file.actions {
            let uses = action.input == index || action.secondary_input == index;
            match &action.action {
                Some(pb::file_action::Action::Copy(copy))
                    if action.secondary_input == index && action.input != index =>
                {
                    copies.push(copy.clone())
                }
                _ if uses => only_copies = false,
                _ => {}
            }
        }
        if !is_local || !only_copies || copies.is_empty() {
            continue;
        }
        let Ok(view) = context.worker.snapshot_path(snapshot).await else {
            continue;
        };
        let root = view.path().to_path_buf();
        let computed = tokio::task::spawn_blocking(
            move || -> Option<(Option<String>, BTreeMap<String, String>)> {
                let mut hasher = Sha256::new();
                let mut files = BTreeMap::new();
                // Down to each file, in the same walk, so a miss can name the file that changed.
                let mut sums = selector::FileSums::new(&root, EXPLAIN_FILES_BUDGET);
                for copy in &copies {
                    let checksum = selector::checksum_selector_with(
                        &root,
                        &copy.src,
                        copy.allow_wildcard,
                        &mut Some(&mut sums),
                    )
                    .ok()??;
                    hasher.update(copy.src.as_bytes());
                    hasher.update([0]);
                    hasher.update(checksum.as_bytes());
                    hasher.update([0]);
                    let path = copy.src.trim_start_matches("./").trim_start_matches('/');
                    let path = if path.is_empty() { "." } else { path };
                    files.insert(path.to_string(), checksum);
                }
                files.extend(sums.into_files().unwrap_or_default());
                Some((Some(hex::encode(hasher.finalize())), files))
            },
        )
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        drop(view);
        if let Some(slot) = keys.get_mut(index as usize) {
            *slot = computed;
        }
    }
    keys
}

/// A cache record whose snapshots all still exist, as a cached result.
fn lookup(context: &Context, key: &CacheKey) -> Option<Resolved> {
    let record = context.records.get(key)?;
    let ids: Vec<SnapshotId> = record.outputs.iter().flatten().cloned().collect();
    // Leased before the existence check: a concurrent prune either sees the
    // lease or has already removed the snapshot.
    let lease = context.worker.hold(&ids);
    let all_present = ids.iter().all(|id| context.worker.exists(id));
    if !all_present {
        return None;
    }
    context.leases.push(lease);
    context.worker.record_use(&ids);
    Some(Resolved::ready(
        key.clone(),
        true,
        record.outputs,
        record.created,
    ))
}

/// A result of an imported cache for `key`: applied on the worker (and
/// recorded locally, with the imported creation time so a fully cached
/// build gives the same image as the one that made the cache) only when
/// something needs it.
fn import_lookup(
    context: &Arc<Context>,
    key: &CacheKey,
    name: &str,
    progress: &VertexProgress,
) -> Option<Resolved> {
    let (import, imported) = context
        .options
        .cache_imports
        .iter()
        .find_map(|import| Some((import.clone(), import.lookup(key)?)))?;
    let apply = {
        let (context, key, name, progress) = (
            context.clone(),
            key.clone(),
            name.to_string(),
            progress.clone(),
        );
        async move {
            let failed = |source| {
                Arc::new(Error::Import {
                    key: key.to_string(),
                    source,
                })
            };
            let snapshot = import::materialize(
                context.worker.as_ref(),
                import.as_ref(),
                &imported,
                &progress,
            )
            .await
            .map_err(failed)?;
            let outputs = vec![snapshot];
            hold(&context, &outputs);
            let plain: Vec<Option<String>> = outputs
                .iter()
                .map(|o| o.as_ref().map(|s| s.to_string()))
                .collect();
            context
                .records
                .put_created(&key, &plain, &name, imported.created)
                .map_err(Arc::new)?;
            tracing::debug!(%key, name, "result taken from an imported cache");
            Ok(Arc::new(Materialized {
                outputs,
                created: imported.created,
            }))
        }
    };
    Some(Resolved {
        key: key.clone(),
        cached: true,
        ran: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        materialize: apply.boxed().shared(),
        lazy: None,
    })
}

/// Records a vertex's key parts for the next miss explanation; failing to
/// write them only loses an explanation, not the build.
fn remember(context: &Context, identity: &str, parts: &explain::KeyParts) {
    if let Err(err) = context.explain.put(identity, parts) {
        tracing::debug!(%err, "failed to record cache-miss explanation parts");
    }
}

/// Leases the outputs of a vertex that ran for the rest of the solve.
fn hold(context: &Context, outputs: &[Option<SnapshotId>]) {
    let ids: Vec<SnapshotId> = outputs.iter().flatten().cloned().collect();
    context.leases.push(context.worker.hold(&ids));
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records `outputs` for `key`, made at `created`: the same time the solve reports for the
/// result, so a cached rebuild (which reports the record's time) gives the very same image.
fn record(
    context: &Context,
    key: &CacheKey,
    outputs: &[Option<SnapshotId>],
    name: &str,
    created: u64,
) -> Result<(), SourceFailure> {
    let plain: Vec<Option<String>> = outputs
        .iter()
        .map(|o| o.as_ref().map(|s| s.to_string()))
        .collect();
    context
        .records
        .put_created(key, &plain, name, created)
        .map_err(|e| SourceFailure::Other(Arc::new(e)))
}

/// The refusal of an exec whose platform none of the worker's platforms runs (a `RUN` of a
/// foreign-platform stage without binfmt emulation); `None` when it can run.
fn foreign_platform(
    platform: Option<&pb::Platform>,
    worker_platforms: &[Platform],
) -> Option<kiln_worker::Error> {
    let wanted = to_platform(platform);
    if worker_platforms.is_empty() || worker_platforms.iter().any(|p| p.matches(&wanted)) {
        return None;
    }
    let available: Vec<String> = worker_platforms.iter().map(Platform::id).collect();
    Some(kiln_worker::Error::ForeignPlatform {
        platform: wanted.id(),
        host: available[0].clone(),
        available: available.join(", "),
    })
}

fn to_platform(platform: Option<&pb::Platform>) -> Platform {
    match platform {
        Some(p) if !p.os.is_empty() => Platform {
            architecture: p.architecture.clone(),
            os: p.os.clone(),
            variant: (!p.variant.is_empty()).then(|| p.variant.clone()),
            ..Platform::host()
        },
        _ => Platform::host(),
    }
}

async fn run_source(
    context: &Arc<Context>,
    source: &pb::SourceOp,
    platform: Option<&pb::Platform>,
    ignore_cache: bool,
    progress: &VertexProgress,
    name: &str,
    vertex_error: Arc<dyn Fn(kiln_worker::Error) -> Arc<Error> + Send + Sync>,
) -> Result<Resolved, SourceFailure> {
    let identifier = source.identifier.as_str();
    if let Some(reference) = identifier.strip_prefix("docker-image://") {
        let reference = Reference::parse_normalized(reference).map_err(|e| {
            SourceFailure::Other(Arc::new(Error::InvalidSource {
                identifier: identifier.to_string(),
                reason: e.to_string(),
            }))
        })?;
        let platform = to_platform(platform);
        let platform_id = format!(
            "{}/{}/{}",
            platform.os,
            platform.architecture,
            platform.variant.clone().unwrap_or_default()
        );
        // A pinned digest names the content: no registry round trip is
        // needed to know whether the cache holds it.
        if let Some(digest) = reference.digest() {
            let key = CacheKey::from_parts([
                ("image", digest.to_string().as_bytes()),
                ("platform", platform_id.as_bytes()),
            ]);
            if !ignore_cache {
                if let Some(resolved) = lookup(context, &key) {
                    return Ok(resolved);
                }
            }
        }
        let resolved = context
            .worker
            .resolve_image(&reference, &platform)
            .await
            .map_err(SourceFailure::Worker)?;
        let key = CacheKey::from_parts([
            (
                "image",
                reference
                    .digest()
                    .unwrap_or(&resolved.manifest_digest)
                    .to_string()
                    .as_bytes(),
            ),
            ("platform", platform_id.as_bytes()),
        ]);
        if !ignore_cache {
            if let Some(resolved) = lookup(context, &key) {
                return Ok(resolved);
            }
            if let Some(resolved) = import_lookup(context, &key, name, progress) {
                return Ok(resolved);
            }
        }
        let source_digest = reference
            .digest()
            .unwrap_or(&resolved.manifest_digest)
            .to_string();
        let identity = format!("image\0{identifier}\0{platform_id}");
        if let Some(layers) = lazy_layers(context.worker.as_ref(), &resolved) {
            let reason = if ignore_cache {
                "cache disabled".to_string()
            } else {
                context.explain.explain_source(&identity, &source_digest)
            };
            progress.log(2, format!("{}{reason}\n", explain::MISS_PREFIX).as_bytes());
            remember(
                context,
                &identity,
                &explain::KeyParts {
                    source: source_digest,
                    ..Default::default()
                },
            );
            let created = lazy_created(context, &key, name, ignore_cache)?;
            let lazy = Arc::new(LazyLayers {
                reference: resolved.reference.clone(),
                layers,
                created,
            });
            let pull = pull_image(
                context.clone(),
                key.clone(),
                resolved,
                name.to_string(),
                progress.clone(),
                ignore_cache,
                created,
                vertex_error,
            );
            return Ok(Resolved {
                key,
                cached: false,
                ran: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                materialize: pull.boxed().shared(),
                lazy: Some(lazy),
            });
        }
        // Another build pulling the same image: wait for it, then take its
        // record, so the pull and unpack happen once.
        let _pulling = match ignore_cache {
            false => Some(context.inflight.acquire(key.as_str()).await),
            true => None,
        };
        if !ignore_cache {
            if let Some(resolved) = lookup(context, &key) {
                return Ok(resolved);
            }
        }
        let reason = if ignore_cache {
            "cache disabled".to_string()
        } else {
            context.explain.explain_source(&identity, &source_digest)
        };
        progress.log(2, format!("{}{reason}\n", explain::MISS_PREFIX).as_bytes());
        let snapshot = context
            .worker
            .pull(&resolved, progress)
            .await
            .map_err(SourceFailure::Worker)?;
        let outputs = vec![snapshot];
        hold(context, &outputs);
        let created = now_secs();
        record(context, &key, &outputs, name, created)?;
        remember(
            context,
            &identity,
            &explain::KeyParts {
                source: source_digest,
                ..Default::default()
            },
        );
        return Ok(Resolved::ready(key, false, outputs, created));
    }
    if let Some(local_name) = identifier.strip_prefix("local://") {
        let dir = context
            .locals
            .sync(local_name, &source.attrs, progress)
            .await
            .map_err(|source| {
                SourceFailure::Other(Arc::new(Error::Local {
                    name: local_name.to_string(),
                    source,
                }))
            })?;
        let checksum = checksum_dir(&dir).map_err(|source| {
            SourceFailure::Other(Arc::new(Error::Io {
                path: dir.clone(),
                source,
            }))
        })?;
        let key = CacheKey::from_parts([("local", checksum.as_bytes())]);
        if let Some(resolved) = lookup(context, &key) {
            // The content is what an earlier build snapshotted: reuse it.
            // The vertex itself ran (the transfer happened), so it is not
            // reported as cached.
            resolved
                .ran
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return Ok(Resolved {
                cached: false,
                ..resolved
            });
        }
        let snapshot = context
            .worker
            .snapshot_from_dir(&dir)
            .await
            .map_err(SourceFailure::Worker)?;
        let outputs = vec![Some(snapshot)];
        hold(context, &outputs);
        let created = now_secs();
        record(context, &key, &outputs, name, created)?;
        return Ok(Resolved::ready(key, false, outputs, created));
    }
    if identifier.starts_with("git://") {
        return git::run_git_source(context, source, ignore_cache, progress, name).await;
    }
    if identifier.starts_with("http://") || identifier.starts_with("https://") {
        return http::run_http_source(context, source, ignore_cache, progress, name).await;
    }
    let scheme = identifier.split("://").next().unwrap_or(identifier);
    Err(SourceFailure::Other(Arc::new(Error::Unsupported {
        what: format!("source {scheme}://"),
    })))
}

/// The layers of `image` as an export would name them, when `worker` pulls lazily; `None` to
/// pull now (an eager worker, or a manifest and config that disagree, which the pull reports).
fn lazy_layers(
    worker: &dyn Worker,
    image: &kiln_image::registry::ResolvedImage,
) -> Option<Vec<Layer>> {
    let diff_ids = &image.config.rootfs.diff_ids;
    if !worker.pulls_lazily() || image.manifest.layers.len() != diff_ids.len() {
        return None;
    }
    Some(
        image
            .manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(descriptor, diff_id)| Layer {
                descriptor: descriptor.clone(),
                diff_id: diff_id.clone(),
            })
            .collect(),
    )
}

/// Where the first-use times of lazily pulled images are kept: beside the cache records, not
/// among them (they name no snapshot, so they are no cache entry); a prune that empties the
/// cache empties them too.
const LAZY_IMAGES_DIR: &str = "lazy-images";

/// When a lazily pulled image source was first used: kept in a record of its own (without
/// outputs, under [`LAZY_IMAGES_DIR`]) so a rebuild that still never pulls it reports the same
/// time, and so gives the same image, as a rebuild whose pull is a cache hit does.
fn lazy_created(
    context: &Context,
    key: &CacheKey,
    name: &str,
    ignore_cache: bool,
) -> Result<u64, SourceFailure> {
    let store = &context.lazy_images;
    if !ignore_cache {
        if let Some(record) = store.get(key) {
            return Ok(record.created);
        }
    }
    let created = now_secs();
    store
        .put_created(key, &[], name, created)
        .map_err(|e| SourceFailure::Other(Arc::new(e)))?;
    Ok(created)
}

/// The deferred pull of a lazily pulled image source: once per build (another build pulling
/// the same image is waited for and its record taken), recorded with the time the source was
/// first used.
#[allow(clippy::too_many_arguments)]
async fn pull_image(
    context: Arc<Context>,
    key: CacheKey,
    image: kiln_image::registry::ResolvedImage,
    name: String,
    progress: VertexProgress,
    ignore_cache: bool,
    created: u64,
    vertex_error: Arc<dyn Fn(kiln_worker::Error) -> Arc<Error> + Send + Sync>,
) -> Result<Arc<Materialized>, Arc<Error>> {
    let _pulling = match ignore_cache {
        false => Some(context.inflight.acquire(key.as_str()).await),
        true => None,
    };
    if !ignore_cache {
        if let Some(resolved) = lookup(&context, &key) {
            return resolved.materialize.clone().await;
        }
    }
    tracing::debug!(reference = %image.reference, "pulling a lazily resolved image");
    let snapshot = context
        .worker
        .pull(&image, &progress)
        .await
        .map_err(|e| vertex_error(e))?;
    let outputs = vec![snapshot];
    hold(&context, &outputs);
    match record(&context, &key, &outputs, &name, created) {
        Ok(()) => {}
        Err(SourceFailure::Worker(e)) => return Err(vertex_error(e)),
        Err(SourceFailure::Other(e)) => return Err(e),
    }
    Ok(Arc::new(Materialized { outputs, created }))
}

/// A checksum of a directory's content: paths, types, permission bits,
/// symlink targets and file contents — not timestamps or owners, so touching
/// a file keeps the cache.
pub fn checksum_dir(root: &Path) -> std::io::Result<String> {
    checksum_dir_with(root, &mut None)
}

/// [`checksum_dir`], also recording each file and symlink into `sums`.
pub(crate) fn checksum_dir_with(
    root: &Path,
    sums: &mut Option<&mut selector::FileSums>,
) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    checksum_into(root, root, &mut hasher, sums)?;
    Ok(hex::encode(hasher.finalize()))
}

fn checksum_into(
    root: &Path,
    dir: &Path,
    hasher: &mut Sha256,
    sums: &mut Option<&mut selector::FileSums>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(&path);
        let metadata = std::fs::symlink_metadata(&path)?;
        let kind = metadata.file_type();
        hasher.update(relative.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        hasher.update(metadata.permissions().mode().to_le_bytes());
        if kind.is_symlink() {
            hasher.update(b"l");
            let target = std::fs::read_link(&path)?;
            hasher.update(target.as_os_str().as_encoded_bytes());
            if let Some(sums) = sums {
                sums.record(&path, format!("link:{}", target.display()));
            }
        } else if kind.is_dir() {
            hasher.update(b"d");
            checksum_into(root, &path, hasher, sums)?;
            hasher.update(b"/d");
        } else if kind.is_file() {
            hasher.update(b"f");
            let mut file_hasher = Sha256::new();
            let mut file = std::fs::File::open(&path)?;
            std::io::copy(&mut file, &mut file_hasher)?;
            let sum = file_hasher.finalize();
            hasher.update(sum);
            if let Some(sums) = sums {
                let mode = metadata.permissions().mode();
                sums.record(&path, format!("{mode:o}:{}", &hex::encode(sum)[..16]));
            }
        } else {
            hasher.update(b"o");
        }
        hasher.update([0]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_mtime_but_not_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), b"one").unwrap();
        std::fs::write(dir.path().join("b"), b"two").unwrap();
        let first = checksum_dir(dir.path()).unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(dir.path().join("b"))
            .unwrap();
        file.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(first, checksum_dir(dir.path()).unwrap());
        std::fs::write(dir.path().join("sub/a"), b"ONE").unwrap();
        assert_ne!(first, checksum_dir(dir.path()).unwrap());
    }

    #[test]
    fn foreign_platform_execs_are_refused_naming_both_platforms() {
        let amd64 = Platform::new("linux", "amd64", None);
        let arm64 = pb::Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            ..Default::default()
        };
        let refused = foreign_platform(Some(&arm64), std::slice::from_ref(&amd64))
            .unwrap()
            .to_string();
        assert!(
            refused.contains("exec format error: building for linux/arm64 on a linux/amd64 host needs binfmt emulation"),
            "{refused}"
        );
        let both = [amd64.clone(), Platform::new("linux", "arm64", Some("v8"))];
        assert!(foreign_platform(Some(&arm64), &both).is_none());
        assert!(foreign_platform(None, &[Platform::host()]).is_none());
    }
}

#[cfg(test)]
mod scheduler_tests;
