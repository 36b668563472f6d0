//! Scheduler tests with a recording fake worker: which ops ran, in which order, how many at
//! once, which were cache hits (tables of graphs), that identical steps of concurrent builds
//! run once, and that a cancelled solve leaves no record behind.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Records every exec (by its args, at start and at end) and the peak number running at once;
/// each exec sleeps `delay` milliseconds.
struct FakeWorker {
    content: ContentStore,
    delay: AtomicU64,
    events: Mutex<Vec<Event>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    execs: Mutex<Vec<String>>,
    pulls: AtomicUsize,
    snapshots: Mutex<HashSet<SnapshotId>>,
    lazy: std::sync::atomic::AtomicBool,
}

impl FakeWorker {
    fn new(dir: &Path, delay: Duration) -> Self {
        Self {
            content: ContentStore::open(dir.join("content")).unwrap(),
            delay: AtomicU64::new(delay.as_millis() as u64),
            events: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            execs: Mutex::new(Vec::new()),
            pulls: AtomicUsize::new(0),
            snapshots: Mutex::new(HashSet::new()),
            lazy: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn execs(&self) -> Vec<String> {
        let mut execs = self.execs.lock().unwrap().clone();
        execs.sort();
        execs
    }

    /// The events recorded since the last call.
    fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

/// An exec starting (with its input snapshots) or ending, by its first argument.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    Start(String, Vec<Option<SnapshotId>>),
    End(String),
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
    fn pulls_lazily(&self) -> bool {
        self.lazy.load(Ordering::SeqCst)
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
        tokio::time::sleep(Duration::from_millis(self.delay.load(Ordering::SeqCst))).await;
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
        let args = op
            .meta
            .as_ref()
            .map(|m| m.args.join(" "))
            .unwrap_or_default();
        let name = args.split(' ').next().unwrap_or_default().to_string();
        self.events
            .lock()
            .unwrap()
            .push(Event::Start(name.clone(), inputs.to_vec()));
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(self.delay.load(Ordering::SeqCst))).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.execs.lock().unwrap().push(args.clone());
        self.events.lock().unwrap().push(Event::End(name));
        // One snapshot per mount with an output, in output order.
        let mut outputs: Vec<&pb::Mount> = op.mounts.iter().filter(|m| m.output >= 0).collect();
        outputs.sort_by_key(|m| m.output);
        let ids: Vec<Option<SnapshotId>> = outputs
            .iter()
            .map(|m| Some(format!("{args} out{} on {inputs:?}", m.output)))
            .collect();
        let mut snapshots = self.snapshots.lock().unwrap();
        snapshots.extend(ids.iter().flatten().cloned());
        Ok(ids)
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
    let digest = exec_with(builder, args, inputs, 1, false);
    OutputRef::new(digest, 0)
}

/// [`exec`] with `outputs` outputs (the root, then scratch mounts under `/out<i>`) and the
/// vertex's `ignore_cache`; returns the op digest.
fn exec_with(
    builder: &mut DefinitionBuilder,
    args: &str,
    inputs: &[OutputRef],
    outputs: usize,
    ignore_cache: bool,
) -> String {
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
    for i in 1..outputs {
        mounts.push(pb::Mount {
            input: -1,
            dest: format!("/out{i}"),
            output: i as i64,
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
    let metadata = pb::OpMetadata {
        ignore_cache,
        ..Default::default()
    };
    builder.add_with_metadata(op, inputs, metadata).unwrap()
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

/// An image alone (a result that needs only the image's layers).
fn image_only() -> pb::Definition {
    let mut builder = DefinitionBuilder::new();
    let source = pb::Op {
        op: Some(pb::op::Op::Source(pb::SourceOp {
            identifier: "docker-image://127.0.0.1:5000/busybox:latest".into(),
            attrs: BTreeMap::new(),
        })),
        ..Default::default()
    };
    let base = OutputRef::new(builder.add(source, &[]).unwrap(), 0);
    builder.build(Some(base))
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
    solve_with(solver, definition, false).await
}

async fn solve_with(solver: &Solver, definition: &pb::Definition, no_cache: bool) -> SolveStats {
    let options = SolveOptions {
        no_cache,
        ..Default::default()
    };
    solver
        .solve(
            definition,
            Arc::new(NoLocals),
            ProgressWriter::discard(),
            options,
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

/// One step of a table graph: an exec named `name` (its first argument) reading `inputs`
/// (`"a"` = output 0 of step `a`, `"a:1"` = its output 1).
struct Step {
    name: &'static str,
    inputs: &'static [&'static str],
    outputs: usize,
    ignore_cache: bool,
}

const fn step(name: &'static str, inputs: &'static [&'static str]) -> Step {
    Step {
        name,
        inputs,
        outputs: 1,
        ignore_cache: false,
    }
}

/// A graph of steps whose result is the last step; `changed` gets another command.
fn graph(steps: &[Step], changed: Option<&str>) -> pb::Definition {
    let mut builder = DefinitionBuilder::new();
    let mut digests: BTreeMap<&str, String> = BTreeMap::new();
    for step in steps {
        let inputs: Vec<OutputRef> = step
            .inputs
            .iter()
            .map(|input| {
                let (name, index) = input.split_once(':').unwrap_or((input, "0"));
                OutputRef::new(digests[name].clone(), index.parse().unwrap())
            })
            .collect();
        let version = if changed == Some(step.name) {
            "v2"
        } else {
            "v1"
        };
        let args = format!("{} {version}", step.name);
        let digest = exec_with(
            &mut builder,
            &args,
            &inputs,
            step.outputs,
            step.ignore_cache,
        );
        digests.insert(step.name, digest);
    }
    let last = steps.last().unwrap().name;
    builder.build(Some(OutputRef::new(digests[last].clone(), 0)))
}

/// Checks that every step that ran started after each of its inputs that ran in the same solve
/// had ended; returns the names of the steps that ran.
fn ran_in_order(case: &str, steps: &[Step], events: &[Event]) -> Vec<String> {
    let position = |wanted: &Event| events.iter().position(|e| e == wanted);
    let mut ran = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let Event::Start(name, _) = event else {
            continue;
        };
        ran.push(name.clone());
        let step = steps.iter().find(|s| s.name == name).unwrap();
        for input in step.inputs {
            let input = input.split(':').next().unwrap();
            let input_started = events
                .iter()
                .any(|e| matches!(e, Event::Start(n, _) if n == input));
            if input_started {
                let ended = position(&Event::End(input.to_string()));
                assert!(
                    ended.is_some_and(|end| end < index),
                    "{case}: {name} started before its input {input} ended: {events:?}"
                );
            }
        }
    }
    ran.sort();
    ran
}

/// A row of the scheduler table.
struct Case {
    name: &'static str,
    steps: &'static [Step],
    no_cache: bool,
    /// (executed, cached) of the first solve and of the same graph solved again.
    first: (usize, usize),
    again: (usize, usize),
    /// Changing this step's command re-runs exactly `rerun` (the rest are hits).
    change: &'static str,
    rerun: &'static [&'static str],
}

const CHAIN: &[Step] = &[step("a", &[]), step("b", &["a"]), step("c", &["b"])];
const DIAMOND: &[Step] = &[
    step("a", &[]),
    step("b", &["a"]),
    step("c", &["a"]),
    step("d", &["b", "c"]),
];
const FAN_IN: &[Step] = &[
    step("a", &[]),
    step("b", &[]),
    step("c", &[]),
    step("d", &[]),
    step("e", &["a", "b", "c", "d"]),
];
const TWO_OUTPUTS: &[Step] = &[
    Step {
        name: "a",
        inputs: &[],
        outputs: 2,
        ignore_cache: false,
    },
    step("b", &["a:0"]),
    step("c", &["a:1"]),
    step("d", &["b", "c"]),
];
const IGNORE_CACHE: &[Step] = &[
    step("a", &[]),
    Step {
        name: "b",
        inputs: &["a"],
        outputs: 1,
        ignore_cache: true,
    },
    step("c", &["b"]),
];

const CASES: &[Case] = &[
    Case {
        name: "chain",
        steps: CHAIN,
        no_cache: false,
        first: (3, 0),
        again: (0, 3),
        change: "b",
        rerun: &["b", "c"],
    },
    Case {
        name: "diamond",
        steps: DIAMOND,
        no_cache: false,
        first: (4, 0),
        again: (0, 4),
        change: "b",
        rerun: &["b", "d"],
    },
    Case {
        name: "fan-in",
        steps: FAN_IN,
        no_cache: false,
        first: (5, 0),
        again: (0, 5),
        change: "c",
        rerun: &["c", "e"],
    },
    Case {
        name: "two outputs",
        steps: TWO_OUTPUTS,
        no_cache: false,
        first: (4, 0),
        again: (0, 4),
        change: "c",
        rerun: &["c", "d"],
    },
    Case {
        name: "two outputs, producer changed",
        steps: TWO_OUTPUTS,
        no_cache: false,
        first: (4, 0),
        again: (0, 4),
        change: "a",
        rerun: &["a", "b", "c", "d"],
    },
    Case {
        // The step that ignores the cache runs every time, even though the step after it is
        // a hit; the step before it is a hit.
        name: "ignore_cache vertex",
        steps: IGNORE_CACHE,
        no_cache: false,
        first: (3, 0),
        again: (1, 2),
        change: "c",
        rerun: &["b", "c"],
    },
    Case {
        name: "no_cache",
        steps: DIAMOND,
        no_cache: true,
        first: (4, 0),
        again: (4, 0),
        change: "b",
        rerun: &["a", "b", "c", "d"],
    },
];

#[tokio::test]
async fn table_of_graphs_runs_in_dependency_order_and_hits_the_cache() {
    for case in CASES {
        let (_dir, worker, solver) = solver_with(0);
        worker.delay.store(5, Ordering::SeqCst);
        let definition = graph(case.steps, None);

        let first = solve_with(&solver, &definition, case.no_cache).await;
        assert_eq!(
            (first.executed, first.cached),
            case.first,
            "{}: first",
            case.name
        );
        let ran = ran_in_order(case.name, case.steps, &worker.take_events());
        assert_eq!(ran.len(), case.first.0, "{}: first ran {ran:?}", case.name);

        let again = solve_with(&solver, &definition, case.no_cache).await;
        assert_eq!(
            (again.executed, again.cached),
            case.again,
            "{}: again",
            case.name
        );
        let ran = ran_in_order(case.name, case.steps, &worker.take_events());
        assert_eq!(ran.len(), case.again.0, "{}: again ran {ran:?}", case.name);

        let changed = graph(case.steps, Some(case.change));
        let stats = solve_with(&solver, &changed, case.no_cache).await;
        let ran = ran_in_order(case.name, case.steps, &worker.take_events());
        assert_eq!(
            ran, case.rerun,
            "{}: after changing {}",
            case.name, case.change
        );
        assert_eq!(
            (stats.executed, stats.cached),
            (case.rerun.len(), case.steps.len() - case.rerun.len()),
            "{}: after changing {}",
            case.name,
            case.change
        );
    }
}

#[tokio::test]
async fn each_output_of_a_step_feeds_the_step_that_reads_it() {
    let (_dir, worker, solver) = solver_with(0);
    solve(&solver, &graph(TWO_OUTPUTS, None)).await;
    let events = worker.take_events();
    let inputs_of = |wanted: &str| {
        events
            .iter()
            .find_map(|e| match e {
                Event::Start(name, inputs) if name == wanted => Some(inputs.clone()),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(inputs_of("b"), vec![Some("a v1 out0 on []".to_string())]);
    assert_eq!(inputs_of("c"), vec![Some("a v1 out1 on []".to_string())]);
}

#[tokio::test]
async fn builds_sharing_a_subgraph_run_it_once() {
    const FIRST: &[Step] = &[step("a", &[]), step("b", &["a"]), step("x", &["b"])];
    const SECOND: &[Step] = &[step("a", &[]), step("b", &["a"]), step("y", &["b"])];
    const THIRD: &[Step] = &[step("a", &[]), step("b", &["a"]), step("z", &["b"])];

    // One after the other: the second build reuses the shared steps.
    let (_dir, worker, solver) = solver_with(0);
    solve(&solver, &graph(FIRST, None)).await;
    worker.take_events();
    let second = solve(&solver, &graph(SECOND, None)).await;
    assert_eq!((second.executed, second.cached), (1, 2));
    assert_eq!(ran_in_order("second", SECOND, &worker.take_events()), ["y"]);

    // At the same time, on a fresh solver: the shared steps still run once.
    let (_dir, worker, solver) = solver_with(0);
    let (first, third) = (graph(FIRST, None), graph(THIRD, None));
    let (first, third) = tokio::join!(solve(&solver, &first), solve(&solver, &third));
    assert_eq!(worker.execs(), vec!["a v1", "b v1", "x v1", "z v1"]);
    assert_eq!(first.executed + third.executed, 4, "{first:?} {third:?}");
    assert_eq!(first.cached + third.cached, 2, "{first:?} {third:?}");
}

#[tokio::test]
async fn a_solve_dropped_mid_exec_leaves_no_record_and_the_step_runs_again() {
    const ONE: &[Step] = &[step("slow", &[])];
    let (dir, worker, solver) = solver_with(0);
    worker.delay.store(10_000, Ordering::SeqCst);
    let definition = graph(ONE, None);
    let dropped = tokio::time::timeout(Duration::from_millis(300), solve(&solver, &definition));
    assert!(
        dropped.await.is_err(),
        "the solve finished before it was dropped"
    );
    let started = worker.take_events();
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(matches!(&started[0], Event::Start(name, _) if name == "slow"));
    // No record, and no temporary file of one, for the step that never finished.
    let records = dir.path().join("state").join("cache");
    let files: Vec<String> = std::fs::read_dir(&records)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.is_empty(), "records left behind: {files:?}");

    worker.delay.store(5, Ordering::SeqCst);
    let stats = solve(&solver, &definition).await;
    assert_eq!((stats.executed, stats.cached), (1, 0));
    let events = worker.take_events();
    assert_eq!(ran_in_order("after cancel", ONE, &events), ["slow"]);
    let again = solve(&solver, &definition).await;
    assert_eq!((again.executed, again.cached), (0, 1));
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

#[tokio::test]
async fn a_lazily_pulling_worker_pulls_only_when_a_step_runs_on_the_image() {
    let (_dir, worker, solver) = solver_with(0);
    worker.lazy.store(true, Ordering::SeqCst);
    let solve_image = || async {
        solver
            .solve(
                &image_only(),
                Arc::new(NoLocals),
                ProgressWriter::discard(),
                SolveOptions::default(),
            )
            .await
            .unwrap()
    };
    let first = solve_image().await;
    assert_eq!(
        worker.pulls.load(Ordering::SeqCst),
        0,
        "nothing needed the tree"
    );
    assert_eq!(first.snapshot, None);
    let lazy = first.lazy.clone().expect("a lazy result");
    assert_eq!(lazy.reference.to_string(), "127.0.0.1:5000/busybox:latest");
    // Not pulled, so not recorded, yet a rebuild reports the same time (the same image).
    let second = solve_image().await;
    assert_eq!(second.created, first.created);
    assert!(second.lazy.is_some());
    // An exporter that needs the tree pulls it, once.
    let pulled = lazy.snapshot().await.unwrap().expect("a snapshot");
    assert_eq!(
        lazy.snapshot().await.unwrap().as_deref(),
        Some(pulled.as_str())
    );
    assert_eq!(worker.pulls.load(Ordering::SeqCst), 1);
    // Now a local record: the image is a cache hit, and a step on it does not pull again.
    let third = solve_image().await;
    assert_eq!(
        (third.snapshot.as_deref(), third.lazy.is_none()),
        (Some(pulled.as_str()), true)
    );
    assert_eq!(third.created, first.created);
    solve(&solver, &from_image()).await;
    assert_eq!(worker.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(
        worker.take_events()[0],
        Event::Start("step".into(), vec![Some(pulled)])
    );

    // A fresh worker: the step needs the image, so it is pulled for it, once.
    let (_dir, worker, solver) = solver_with(0);
    worker.lazy.store(true, Ordering::SeqCst);
    let stats = solve(&solver, &from_image()).await;
    assert_eq!(worker.pulls.load(Ordering::SeqCst), 1);
    assert_eq!(worker.execs(), vec!["step"]);
    assert_eq!(stats.executed, 2);
}
