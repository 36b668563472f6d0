//! `Control.DiskUsage`, `Control.Prune` and the garbage-collection loop, over
//! [`Solver::disk_usage`], [`Solver::prune`] and [`Solver::gc`].
//!
//! Durations on the wire are Go `time.Duration`s (nanoseconds). Without `all`, prune keeps
//! `internal` and `frontend` records and records shared with an image store, as BuildKit's cache
//! manager does; kiln's OCI worker has neither kind, so `all` changes nothing there today.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::types::GcPolicy;
use kiln_solver::{DiskStat, GcLimits, PruneOptions, Solver};
use kiln_worker::SnapshotUsage;
use tokio::task::JoinHandle;
use tonic::Status;

/// How often the GC loop runs.
const GC_INTERVAL: Duration = Duration::from_secs(60);

/// Answers `DiskUsage`: the worker's usage records matching `filter`, and with `ageLimit` only
/// those used within it.
pub async fn disk_usage(
    solver: &Solver,
    request: api::DiskUsageRequest,
) -> Result<api::DiskUsageResponse, Status> {
    let records = solver
        .disk_usage(&request.filter, duration(request.age_limit))
        .await
        .map_err(status)?;
    Ok(api::DiskUsageResponse {
        record: records.iter().map(usage_record).collect(),
    })
}

/// Answers `Prune`: removes what the request selects and returns the removed records (the
/// handler streams them).
pub async fn prune(
    solver: &Solver,
    request: api::PruneRequest,
) -> Result<Vec<api::UsageRecord>, Status> {
    let options = PruneOptions {
        all: request.all,
        filters: request.filter,
        keep_duration: duration(request.keep_duration),
        reserved_space: bytes(request.reserved_space),
        max_used_space: bytes(request.max_used_space),
        min_free_space: bytes(request.min_free_space),
    };
    let removed = solver.prune(&options).await.map_err(status)?;
    Ok(removed.iter().map(usage_record).collect())
}

/// BuildKit's default policy for the disk holding `root` when no limit is configured
/// (`limits` all zero), as wire `GCPolicy`s (also what `ListWorkers` reports).
pub fn default_gc_policy(root: &Path, limits: GcLimits) -> Vec<GcPolicy> {
    let disk = DiskStat::of(root).unwrap_or_default();
    kiln_solver::default_gc_policy(limits, disk)
        .iter()
        .map(|p| GcPolicy {
            all: p.all,
            keep_duration: p
                .keep_duration
                .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                .unwrap_or(0),
            reserved_space: signed(p.reserved_space),
            filters: p.filters.clone(),
            max_used_space: signed(p.max_used_space),
            min_free_space: signed(p.min_free_space),
        })
        .collect()
}

/// Runs the policies in order every minute (and once at start). A failed round is logged and
/// retried on the next tick. Abort the handle to stop it.
pub fn spawn_gc(solver: Arc<Solver>, policy: Vec<GcPolicy>) -> JoinHandle<()> {
    let policies: Vec<PruneOptions> = policy.into_iter().map(prune_options).collect();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match solver.gc(&policies).await {
                Ok(removed) if !removed.is_empty() => {
                    let bytes: u64 = removed.iter().map(|r| r.size).sum();
                    tracing::info!(
                        records = removed.len(),
                        bytes,
                        "garbage collected build cache"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
            }
        }
    })
}

fn prune_options(p: GcPolicy) -> PruneOptions {
    PruneOptions {
        all: p.all,
        filters: p.filters,
        keep_duration: duration(p.keep_duration),
        reserved_space: bytes(p.reserved_space),
        max_used_space: bytes(p.max_used_space),
        min_free_space: bytes(p.min_free_space),
    }
}

fn duration(nanos: i64) -> Option<Duration> {
    (nanos > 0).then(|| Duration::from_nanos(nanos as u64))
}

fn bytes(value: i64) -> u64 {
    value.max(0) as u64
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

fn usage_record(r: &SnapshotUsage) -> api::UsageRecord {
    api::UsageRecord {
        id: r.id.clone(),
        mutable: r.mutable,
        in_use: r.in_use,
        size: signed(r.size),
        parent: r.parent.clone().unwrap_or_default(),
        created_at: Some(timestamp(r.created)),
        last_used_at: r.last_used.map(timestamp),
        usage_count: i64::try_from(r.usage_count).unwrap_or(i64::MAX),
        description: r.description.clone(),
        record_type: r.record_type.as_str().to_string(),
        shared: r.shared,
        parents: r.parent.iter().cloned().collect(),
    }
}

fn status(e: kiln_solver::Error) -> Status {
    match &e {
        kiln_solver::Error::Filter(inner) => Status::invalid_argument(inner.to_string()),
        _ => Status::unknown(format!("{e}: {}", source_chain(&e))),
    }
}

fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_record_carries_every_field() {
        let record = usage_record(&SnapshotUsage {
            id: "abc".into(),
            parent: Some("base".into()),
            size: 42,
            created: UNIX_EPOCH + Duration::from_secs(100),
            last_used: Some(UNIX_EPOCH + Duration::from_millis(200_500)),
            usage_count: 3,
            in_use: true,
            record_type: kiln_worker::RecordType::ExecCacheMount,
            description: "cached mount /c".into(),
            mutable: true,
            shared: false,
        });
        assert_eq!(record.parents, vec!["base".to_string()]);
        assert_eq!(record.parent, "base");
        assert_eq!(record.size, 42);
        assert_eq!(record.created_at.unwrap().seconds, 100);
        let last = record.last_used_at.unwrap();
        assert_eq!((last.seconds, last.nanos), (200, 500_000_000));
        assert_eq!(record.record_type, "exec.cachemount");
        assert!(record.in_use && record.mutable && !record.shared);
    }

    #[test]
    fn policies_round_trip_with_nanosecond_durations() {
        let policy = default_gc_policy(Path::new("/"), GcLimits::default());
        assert_eq!(policy.len(), 4);
        assert_eq!(policy[0].keep_duration, 48 * 3600 * 1_000_000_000);
        assert_eq!(policy[0].filters[1], "type==exec.cachemount");
        let back = prune_options(policy[1].clone());
        assert_eq!(
            back.keep_duration,
            Some(Duration::from_secs(60 * 24 * 3600))
        );
        assert!(back.max_used_space > 0 && back.min_free_space > 0);
        assert!(policy[3].all);
        assert_eq!(duration(0), None);
        assert_eq!(bytes(-5), 0);
    }

    /// A solver on the real OCI worker (runc, overlayfs, the registry on 127.0.0.1:5000).
    fn oci_solver(root: &Path) -> Arc<Solver> {
        use kiln_image::registry::{HostConfig, RegistryHosts};
        let hosts = RegistryHosts::new().with(
            "127.0.0.1:5000",
            HostConfig {
                http: true,
                insecure: false,
            },
        );
        let worker = kiln_worker_oci::OciWorker::open(kiln_worker_oci::OciWorkerConfig {
            root: root.to_path_buf(),
            runc_binary: "/usr/sbin/runc".into(),
            registry_hosts: hosts,
            labels: Default::default(),
            platforms: None,
        })
        .unwrap();
        Arc::new(Solver::open(Arc::new(worker), root).unwrap())
    }

    struct NoLocals;

    #[async_trait::async_trait]
    impl kiln_solver::LocalSources for NoLocals {
        async fn sync(
            &self,
            name: &str,
            _attrs: &std::collections::BTreeMap<String, String>,
            _progress: &kiln_solver::VertexProgress,
        ) -> Result<std::path::PathBuf, kiln_solver::BoxError> {
            Err(format!("no local {name}").into())
        }
    }

    async fn build(solver: &Solver) {
        use kiln_llb::{DefinitionBuilder, OutputRef};
        use kiln_proto::pb;
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
                            args: vec!["/bin/sh".into(), "-c".into(), "echo x > /x".into()],
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
        let definition = b.build(Some(OutputRef::new(exec, 0)));
        let result = solver
            .solve(
                &definition,
                Arc::new(NoLocals),
                kiln_solver::ProgressWriter::discard(),
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(result.stats.executed, 2);
    }

    #[tokio::test]
    async fn disk_usage_and_prune_over_the_wire_types() {
        let root = tempfile::tempdir().unwrap();
        let solver = oci_solver(root.path());
        build(&solver).await;
        let all = disk_usage(&solver, api::DiskUsageRequest::default())
            .await
            .unwrap();
        assert!(all.record.len() >= 2);
        assert!(all
            .record
            .iter()
            .all(|r| r.size > 0 && r.created_at.is_some()));
        let regular = disk_usage(
            &solver,
            api::DiskUsageRequest {
                filter: vec!["type==regular,description~=^mount /".into()],
                age_limit: 3_600_000_000_000,
            },
        )
        .await
        .unwrap();
        assert_eq!(regular.record.len(), 1);
        assert_eq!(regular.record[0].parents.len(), 1);
        let bad = disk_usage(
            &solver,
            api::DiskUsageRequest {
                filter: vec!["description~=(".into()],
                age_limit: 0,
            },
        )
        .await
        .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);

        let removed = prune(
            &solver,
            api::PruneRequest {
                all: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(removed.len(), all.record.len());
        let after = disk_usage(&solver, api::DiskUsageRequest::default())
            .await
            .unwrap();
        assert!(after.record.is_empty());
    }

    #[tokio::test]
    async fn gc_loop_applies_the_policies() {
        let root = tempfile::tempdir().unwrap();
        let solver = oci_solver(root.path());
        build(&solver).await;
        let policy = vec![GcPolicy {
            all: true,
            max_used_space: 1,
            ..Default::default()
        }];
        let handle = spawn_gc(solver.clone(), policy);
        let mut left = usize::MAX;
        for _ in 0..100 {
            left = solver.disk_usage(&[], None).await.unwrap().len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        handle.abort();
        assert_eq!(left, 0, "the first round prunes down to the limit");
    }
}
