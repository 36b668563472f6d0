//! Scheduler tests with a recording fake worker: which ops ran, how many at once, and that
//! identical steps of concurrent builds run once.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use kiln_image::content::ContentStore;
use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::registry::ResolvedImage;
use kiln_llb::{DefinitionBuilder, OutputRef};
use kiln_proto::pb;
use kiln_worker::{Error as WorkerError, Layer, ProgressSink, SnapshotId, SnapshotView, Worker};

use super::*;

/// Records every exec (by its args) and the peak number running at once; each exec sleeps.
struct FakeWorker {
    content: ContentStore,
    delay: Duration,
    running: AtomicUsize,
    peak: AtomicUsize,
    execs: Mutex<Vec<String>>,
    pulls: AtomicUsize,
    snapshots: Mutex<HashSet<SnapshotId>>,
}

impl FakeWorker {
    fn new(dir: &Path, delay: Duration) -> Self {
        Self {
            content: ContentStore::open(dir.join("content")).unwrap(),
            delay,
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            execs: Mutex::new(Vec::new()),
            pulls: AtomicUsize::new(0),
            snapshots: Mutex::new(HashSet::new()),
        }
    }

    fn execs(&self) -> Vec<String> {
        let mut execs = self.execs.lock().unwrap().clone();
        execs.sort();
        execs
    }
}

fn unsupported(what: &str) -> WorkerError {
    WorkerError::Unsupported { what: what.into() }
}

#[async_trait]
impl Worker for FakeWorker {
    fn id(&self) -> &str {
        "fake"
    }
    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    fn platforms(&self) -> Vec<Platform> {
        vec![Platform::host()]
    }
    fn content(&self) -> &ContentStore {
        &self.content
    }
    async fn resolve_image(
        &self,
        reference: &Reference,
        _: &Platform,
    ) -> Result<ResolvedImage, WorkerError> {
        // Every image has one empty layer-less manifest, named by the reference.
        let config_bytes = b"{}".to_vec();
        let manifest = kiln_image::oci::ImageManifest {
            schema_version: 2,
            media_type: None,
            config: kiln_image::oci::Descriptor::new(
                "application/vnd.oci.image.config.v1+json".to_string(),
                kiln_image::Digest::of(&config_bytes),
                config_bytes.len() as u64,
            ),
            layers: Vec::new(),
            annotations: None,
        };
        Ok(ResolvedImage {
            reference: reference.clone(),
            manifest_digest: kiln_image::Digest::of(reference.to_string().as_bytes()),
            manifest,
            manifest_bytes: Vec::new(),
            config: Default::default(),
            config_bytes,
        })
    }
    async fn pull(
        &self,
        image: &ResolvedImage,
        _: &dyn ProgressSink,
    ) -> Result<Option<SnapshotId>, WorkerError> {
        self.pulls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let id = format!("pulled {}", image.manifest_digest);
        self.snapshots.lock().unwrap().insert(id.clone());
        Ok(Some(id))
    }
    async fn snapshot_from_dir(&self, _: &Path) -> Result<SnapshotId, WorkerError> {
        Err(unsupported("local sources"))
    }
    async fn exec(
        &self,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        _: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, WorkerError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        let args = op
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default();
        self.execs.lock().unwrap().push(args.clone());
        let id = format!("{args} on {inputs:?}");
        self.snapshots.lock().unwrap().insert(id.clone());
        Ok(vec![Some(id)])
    }
    async fn file(
        &self,
        _: &pb::FileOp,
        _: &[Option<SnapshotId>],
    ) -> Result<Vec<Option<SnapshotId>>, WorkerError> {
        Err(unsupported("file ops"))
    }
    fn exists(&self, id: &SnapshotId) -> bool {
        self.snapshots.lock().unwrap().contains(id)
    }
    async fn snapshot_path(&self, id: &SnapshotId) -> Result<SnapshotView, WorkerError> {
        Err(WorkerError::SnapshotNotFound { id: id.clone() })
    }
    async fn layers(&self, _: &SnapshotId) -> Result<Vec<Layer>, WorkerError> {
        Ok(Vec::new())
    }
}

/// An exec of `args` whose root is `input` (scratch when `None`); extra inputs are mounted
/// read-only under `/in<i>`.
fn exec(builder: &mut DefinitionBuilder, args: &str, inputs: &[OutputRef]) -> OutputRef {
    let mut mounts = vec![pb::Mount {
        input: if inputs.is_empty() { -1 } else { 0 },
        dest: "/".into(),
        output: 0,
        ..Default::default()
    }];
    for i in 1..inputs.len() {
        mounts.push(pb::Mount {
            input: i as i64,
            dest: format!("/in{i}"),
            output: -1,
            readonly: true,
            ..Default::default()
        });
    }
    let op = pb::Op {
        op: Some(pb::op::Op::Exec(pb::ExecOp {
            meta: Some(pb::Meta {
                args: args.split(' ').map(String::from).collect(),
                cwd: "/".into(),
                ..Default::default()
            }),
            mounts,
            ..Default::default()
        })),
        ..Default::default()
    };
    OutputRef::new(builder.add(op, inputs).unwrap(), 0)
}

/// An image and one step on it.
fn from_image() -> pb::Definition {
    let mut builder = DefinitionBuilder::new();
    let source = pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: "docker-image://127.0.0.1:5000/busybox:latest".into(),
            attrs: BTreeMap::new(),
        })),
        ..Default::default()
    };
    let base = OutputRef::new(builder.add(source, &[]).unwrap(), 0);
    let step = exec(&mut builder, "step", &[base]);
    builder.build(Some(step))
}

/// Four independent steps joined by a fifth.
fn fan_in() -> pb::Definition {
    let mut builder = DefinitionBuilder::new();
    let branches: Vec<OutputRef> = (0..4)
        .map(|i| exec(&mut builder, &format!("branch {i}"), &[]))
        .collect();
    let join = exec(&mut builder, "join", &branches);
    builder.build(Some(join))
}

async fn solve(solver: &Solver, definition: &pb::Definition) -> SolveStats {
    solver
        .solve(
            definition,
            Arc::new(NoLocals),
            ProgressWriter::discard(),
            SolveOptions::default(),
        )
        .await
        .unwrap()
        .stats
}

struct NoLocals;

#[async_trait]
impl LocalSources for NoLocals {
    async fn sync(
        &self,
        name: &str,
        _: &BTreeMap<String, String>,
        _: &VertexProgress,
    ) -> Result<PathBuf, BoxError> {
        Err(format!("no local {name}").into())
    }
}

fn solver_with(limit: usize) -> (tempfile::TempDir, Arc<FakeWorker>, Solver) {
    let dir = tempfile::tempdir().unwrap();
    let worker = Arc::new(FakeWorker::new(dir.path(), Duration::from_millis(100)));
    let solver = Solver::open(worker.clone(), &dir.path().join("state"))
        .unwrap()
        .with_max_parallelism(limit);
    (dir, worker, solver)
}

#[tokio::test]
async fn independent_steps_run_in_parallel_unless_bounded() {
    let table = [(0, 4), (1, 1), (2, 2)];
    for (limit, peak) in table {
        let (_dir, worker, solver) = solver_with(limit);
        let stats = solve(&solver, &fan_in()).await;
        assert_eq!(stats.executed, 5, "limit {limit}");
        assert_eq!(
            worker.peak.load(Ordering::SeqCst),
            peak,
            "max-parallelism {limit}"
        );
        assert_eq!(
            worker.execs(),
            vec!["branch 0", "branch 1", "branch 2", "branch 3", "join"]
        );
    }
}

#[tokio::test]
async fn concurrent_builds_run_identical_steps_once() {
    let (_dir, worker, solver) = solver_with(0);
    let definition = fan_in();
    let (a, b) = tokio::join!(solve(&solver, &definition), solve(&solver, &definition));
    assert_eq!(worker.execs().len(), 5, "{:?}", worker.execs());
    assert_eq!(a.executed + b.executed, 5, "{a:?} {b:?}");
    assert_eq!(a.cached + b.cached, 5, "{a:?} {b:?}");
    // A later build takes everything from the cache.
    let again = solve(&solver, &definition).await;
    assert_eq!((again.executed, again.cached), (0, 5));
}

#[tokio::test]
async fn concurrent_builds_pull_a_shared_base_image_once() {
    let (_dir, worker, solver) = solver_with(0);
    let definition = from_image();
    let (a, b) = tokio::join!(solve(&solver, &definition), solve(&solver, &definition));
    assert_eq!(worker.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(worker.execs(), vec!["step"]);
    assert_eq!(a.executed + b.executed, 2, "{a:?} {b:?}");
}

#[tokio::test]
async fn a_fully_cached_solve_reports_every_vertex_output() {
    let (_dir, _worker, solver) = solver_with(0);
    let definition = fan_in();
    let solve_vertices = || async {
        solver
            .solve(
                &definition,
                Arc::new(NoLocals),
                ProgressWriter::discard(),
                SolveOptions::default(),
            )
            .await
            .unwrap()
            .vertices
    };
    let first = solve_vertices().await;
    // The branches are local hits below a hit on the join: never awaited,
    // still reported with their snapshots (what cache exports carry).
    let again = solve_vertices().await;
    assert_eq!(again.len(), 5);
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(a.key, b.key);
        assert!(!b.outputs.is_empty(), "no outputs for {}", b.key);
        assert_eq!(a.outputs, b.outputs);
    }
}
