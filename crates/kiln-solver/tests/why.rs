//! Cache-miss explanations through the solver on the real OCI worker (runc, overlayfs, the registry
//! on 127.0.0.1:5000 holding 127.0.0.1:5000/busybox:latest). Needs root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_llb::{DefinitionBuilder, OutputRef};
use kiln_proto::pb;
use kiln_solver::{BoxError, LocalSources, ProgressWriter, SolveOptions, Solver, VertexProgress};
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

struct Dir(PathBuf);

#[async_trait::async_trait]
impl LocalSources for Dir {
    async fn sync(
        &self,
        name: &str,
        _attrs: &BTreeMap<String, String>,
        _progress: &VertexProgress,
    ) -> Result<PathBuf, BoxError> {
        assert_eq!(name, "context");
        Ok(self.0.clone())
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

fn named(name: &str) -> pb::OpMetadata {
    pb::OpMetadata {
        description: [("llb.customname".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

/// FROM busybox; COPY app.txt /app.txt (from local "context"); RUN `run`.
fn definition(run: &str) -> pb::Definition {
    let mut b = DefinitionBuilder::new();
    let image = b
        .add_with_metadata(
            pb::Op {
                op: Some(pb::op::Op::Source(pb::SourceOp {
                    identifier: "docker-image://127.0.0.1:5000/busybox:latest".into(),
                    attrs: Default::default(),
                })),
                ..Default::default()
            },
            &[],
            named("[1/3] FROM 127.0.0.1:5000/busybox:latest"),
        )
        .unwrap();
    let local = b
        .add(
            pb::Op {
                op: Some(pb::op::Op::Source(pb::SourceOp {
                    identifier: "local://context".into(),
                    attrs: Default::default(),
                })),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
    let copy = b
        .add_with_metadata(
            pb::Op {
                op: Some(pb::op::Op::File(pb::FileOp {
                    actions: vec![pb::FileAction {
                        input: 0,
                        secondary_input: 1,
                        output: 0,
                        action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                            src: "/app.txt".into(),
                            dest: "/app.txt".into(),
                            mode: -1,
                            timestamp: -1,
                            ..Default::default()
                        })),
                    }],
                })),
                ..Default::default()
            },
            &[OutputRef::new(image, 0), OutputRef::new(local, 0)],
            named("[2/3] COPY app.txt /app.txt"),
        )
        .unwrap();
    let exec = b
        .add_with_metadata(
            pb::Op {
                op: Some(pb::op::Op::Exec(pb::ExecOp {
                    meta: Some(pb::Meta {
                        args: vec!["/bin/sh".into(), "-c".into(), run.into()],
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
            &[OutputRef::new(copy, 0)],
            named(&format!("[3/3] RUN {run}")),
        )
        .unwrap();
    b.build(Some(OutputRef::new(exec, 0)))
}

/// Solves and returns (vertex name → cache-miss reason) and the stats.
async fn solve(
    solver: &Solver,
    context: &Path,
    run: &str,
) -> (BTreeMap<String, String>, kiln_solver::SolveStats) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let result = solver
        .solve(
            &definition(run),
            Arc::new(Dir(context.to_path_buf())),
            ProgressWriter::new(tx),
            SolveOptions::default(),
        )
        .await
        .unwrap();
    let stats = result.stats.clone();
    drop(result);
    let mut names = BTreeMap::new();
    let mut reasons = BTreeMap::new();
    while let Ok(message) = rx.try_recv() {
        for v in message.vertexes {
            names.insert(v.digest, v.name);
        }
        for log in message.logs {
            let text = String::from_utf8_lossy(&log.msg).to_string();
            if let Some(reason) = text.strip_prefix("kiln: cache miss: ") {
                reasons.insert(log.vertex, reason.trim_end().to_string());
            }
        }
    }
    let named = reasons
        .into_iter()
        .map(|(digest, reason)| (names[&digest].clone(), reason))
        .collect();
    (named, stats)
}

#[tokio::test]
async fn cache_misses_name_what_changed() {
    let root = tempfile::tempdir().unwrap();
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("app.txt"), "one").unwrap();
    std::fs::write(context.path().join("other.txt"), "x").unwrap();
    let solver = solver(root.path());
    let copy = "[2/3] COPY app.txt /app.txt";
    let run = "[3/3] RUN cat /app.txt > /out";

    let (first, _) = solve(&solver, context.path(), "cat /app.txt > /out").await;
    assert_eq!(first[copy], "first build");
    assert_eq!(first[run], "first build");

    // An unrelated file: the COPY and the RUN stay cached.
    std::fs::write(context.path().join("other.txt"), "y").unwrap();
    let (unrelated, _) = solve(&solver, context.path(), "cat /app.txt > /out").await;
    assert!(!unrelated.contains_key(copy), "{unrelated:?}");
    assert!(!unrelated.contains_key(run), "{unrelated:?}");

    // The copied file: the COPY names it, the RUN names its input.
    std::fs::write(context.path().join("app.txt"), "two").unwrap();
    let (changed, _) = solve(&solver, context.path(), "cat /app.txt > /out").await;
    assert_eq!(changed[copy], "file changed: app.txt");
    assert_eq!(changed[run], format!("input 0 changed ({copy})"));

    // The RUN text.
    let (edited, _) = solve(&solver, context.path(), "cat /app.txt > /out2").await;
    assert!(!edited.contains_key(copy), "{edited:?}");
    assert_eq!(
        edited["[3/3] RUN cat /app.txt > /out2"],
        "instruction changed"
    );
}
