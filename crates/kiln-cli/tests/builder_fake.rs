//! `kiln builder prune|du` against an in-process fake Control server: the
//! prompt, the `Total:` line and the `du` table as the user sees them.

use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use kiln_proto::moby::buildkit::v1::control_server::{Control, ControlServer};
use kiln_proto::moby::buildkit::v1::types::WorkerRecord;
use kiln_proto::moby::buildkit::v1::*;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default, Clone)]
struct Fake {
    prunes: Arc<Mutex<Vec<bool>>>,
}

fn record(id: &str, size: i64, in_use: bool) -> UsageRecord {
    UsageRecord {
        id: id.into(),
        size,
        in_use,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Control for Fake {
    async fn disk_usage(
        &self,
        _: Request<DiskUsageRequest>,
    ) -> Result<Response<DiskUsageResponse>, Status> {
        Ok(Response::new(DiskUsageResponse {
            record: vec![
                record("rec-a", 1_500_000, true),
                record("rec-b", 2_000, false),
            ],
        }))
    }
    type PruneStream = BoxStream<UsageRecord>;
    async fn prune(
        &self,
        request: Request<PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        self.prunes.lock().unwrap().push(request.into_inner().all);
        let records = vec![
            Ok(record("rec-a", 1024, false)),
            Ok(record("rec-b", 512, false)),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(records))))
    }
    async fn solve(&self, _: Request<SolveRequest>) -> Result<Response<SolveResponse>, Status> {
        Err(Status::unimplemented("solve"))
    }
    type StatusStream = BoxStream<StatusResponse>;
    async fn status(
        &self,
        _: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        Err(Status::unimplemented("status"))
    }
    type SessionStream = BoxStream<BytesMessage>;
    async fn session(
        &self,
        _: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("session"))
    }
    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Ok(Response::new(ListWorkersResponse {
            record: vec![WorkerRecord {
                id: "fake".into(),
                ..Default::default()
            }],
        }))
    }
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Err(Status::unimplemented("info"))
    }
}

async fn kiln(args: Vec<String>, stdin: &'static str) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .env_remove("BUILDKIT_HOST")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_prompt_total_and_du_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = Fake::default();
    let prunes = fake.prunes.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(fake))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let host = format!("unix://{}", path.display());
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["builder".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(["--buildkit-host".to_string(), host.clone()]);
        v
    };

    // Declined: nothing pruned, nothing on stdout.
    let out = kiln(args(&["prune"]), "n\n").await;
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WARNING! This will remove any dangling build cache..\nAre you sure you want to continue? [y/N] "),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert!(prunes.lock().unwrap().is_empty());

    // Accepted with -a: the sum of the removed records.
    let out = kiln(args(&["prune", "-a"]), "y\n").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("remove all build cache.."));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Total:  1.5KiB\n");
    assert_eq!(*prunes.lock().unwrap(), vec![true]);

    // -f: no prompt.
    let out = kiln(args(&["prune", "-f"]), "").await;
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("WARNING"));
    assert_eq!(*prunes.lock().unwrap(), vec![true, false]);

    let out = kiln(args(&["du"]), "").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "ID    RECLAIMABLE SIZE  LAST ACCESSED");
    assert_eq!(lines[1], "rec-a false       1.5MB");
    assert_eq!(lines[2], "rec-b true        2kB");
    assert_eq!(lines[3], "Reclaimable: 2kB");
    assert_eq!(lines[4], "Total:       1.502MB");
}
