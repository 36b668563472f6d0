//! Disk usage and prune through the solver on the real OCI worker (runc, overlayfs, the registry
//! on 127.0.0.1:5000 holding 127.0.0.1:5000/busybox:latest). Needs root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_llb::{DefinitionBuilder, OutputRef};
use kiln_proto::pb;
use kiln_solver::{
    BoxError, LocalSources, ProgressWriter, PruneOptions, SolveOptions, Solver, VertexProgress,
};
use kiln_worker::RecordType;
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

struct NoLocals;

#[async_trait::async_trait]
impl LocalSources for NoLocals {
    async fn sync(
        &self,
        name: &str,
        _attrs: &BTreeMap<String, String>,
        _progress: &VertexProgress,
    ) -> Result<PathBuf, BoxError> {
        Err(format!("no local {name}").into())
    }
}

fn solver(root: &Path) -> Solver {
    let hosts = RegistryHosts::new().with(
        "127.0.0.1:5000",
        HostConfig {
            http: true,
            insecure: false,
        },
    );
    let worker = OciWorker::open(OciWorkerConfig {
        root: root.to_path_buf(),
        runc_binary: PathBuf::from("/usr/sbin/runc"),
        registry_hosts: hosts,
        labels: BTreeMap::new(),
        platforms: None,
    })
    .unwrap();
    Solver::open(Arc::new(worker), root).unwrap()
}

fn definition() -> pb::Definition {
    let mut b = DefinitionBuilder::new();
    let image = b
        .add(
            pb::Op {
                op: Some(pb::op::Op::Source(pb::SourceOp {
                    identifier: "docker-image://127.0.0.1:5000/busybox:latest".into(),
                    attrs: Default::default(),
                })),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
    let exec = b
        .add(
            pb::Op {
                op: Some(pb::op::Op::Exec(pb::ExecOp {
                    meta: Some(pb::Meta {
                        args: vec!["/bin/sh".into(), "-c".into(), "echo built > /out".into()],
                        env: vec!["PATH=/bin:/usr/bin".into()],
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
                })),
                ..Default::default()
            },
            &[OutputRef::new(image, 0)],
        )
        .unwrap();
    b.build(Some(OutputRef::new(exec, 0)))
}

async fn solve(solver: &Solver) -> kiln_solver::SolveResult {
    solver
        .solve(
            &definition(),
            Arc::new(NoLocals),
            ProgressWriter::discard(),
            SolveOptions::default(),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn prune_all_empties_the_cache_and_the_next_solve_runs_again() {
    let root = tempfile::tempdir().unwrap();
    let solver = solver(root.path());
    let first = solve(&solver).await;
    assert_eq!(first.stats.executed, 2);
    let top = first.snapshot.clone().unwrap();

    let usage = solver.disk_usage(&[], None).await.unwrap();
    assert!(usage.len() >= 2, "{usage:?}");
    assert!(usage.iter().all(|r| r.size > 0), "{usage:?}");
    assert!(usage.iter().any(|r| r.id == top && r.in_use));
    let only_top = solver
        .disk_usage(&[format!("id=={top}")], None)
        .await
        .unwrap();
    assert_eq!(only_top.len(), 1);
    let execs = solver
        .disk_usage(&["description~=^mount / from exec".into()], None)
        .await
        .unwrap();
    assert_eq!(execs.len(), 1);
    assert_eq!(execs[0].record_type, RecordType::Regular);

    // While the result is held (being exported), nothing of its chain goes.
    let options = PruneOptions {
        all: true,
        ..Default::default()
    };
    assert!(solver.prune(&options).await.unwrap().is_empty());
    drop(first);

    // A cached rebuild takes the records and uses the snapshots.
    let second = solve(&solver).await;
    assert_eq!(second.stats.cached, 2);
    drop(second);
    let used = solver.disk_usage(&[], None).await.unwrap();
    let top_record = used.iter().find(|r| r.id == top).unwrap();
    assert!(top_record.usage_count >= 1 && top_record.last_used.is_some());

    // keep-duration keeps what was just used.
    let keep = PruneOptions {
        all: true,
        keep_duration: Some(std::time::Duration::from_secs(3600)),
        ..Default::default()
    };
    assert!(solver.prune(&keep).await.unwrap().is_empty());

    let pruned = solver.prune(&options).await.unwrap();
    assert_eq!(pruned.len(), usage.len(), "{pruned:?}");
    assert!(solver.disk_usage(&[], None).await.unwrap().is_empty());
    assert!(
        solver.records().all().is_empty(),
        "cache records of pruned snapshots are gone"
    );

    let third = solve(&solver).await;
    assert_eq!(third.stats.executed, 2, "nothing is cached after a prune");
}

#[tokio::test]
async fn prune_with_max_used_space_removes_least_recently_used_first() {
    let root = tempfile::tempdir().unwrap();
    let solver = solver(root.path());
    let result = solve(&solver).await;
    let top = result.snapshot.clone().unwrap();
    drop(result);
    let usage = solver.disk_usage(&[], None).await.unwrap();
    let total: u64 = usage.iter().map(|r| r.size).sum();
    let top_size = usage.iter().find(|r| r.id == top).unwrap().size;
    // A limit just below the total: removing the leaf (the exec output) is enough.
    let options = PruneOptions {
        max_used_space: total - top_size,
        ..Default::default()
    };
    let pruned = solver.prune(&options).await.unwrap();
    let ids: Vec<_> = pruned.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, vec![top.clone()]);
    let left = solver.disk_usage(&[], None).await.unwrap();
    assert_eq!(left.len(), usage.len() - 1);
}
