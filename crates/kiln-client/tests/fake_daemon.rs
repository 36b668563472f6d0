//! The client against an in-process Control server on a unix socket (h2c):
//! ping, and a solve that the daemon fails (structured error, progress
//! forwarded, session opened and closed).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::moby::buildkit::v1::control_server::{Control, ControlServer};
use kiln_proto::moby::buildkit::v1::types::WorkerRecord;
use kiln_proto::moby::buildkit::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct Fake {
    solve_requests: Arc<Mutex<Vec<SolveRequest>>>,
    session_headers: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl Control for Fake {
    async fn disk_usage(
        &self,
        _: Request<DiskUsageRequest>,
    ) -> Result<Response<DiskUsageResponse>, Status> {
        Err(Status::unimplemented("disk usage"))
    }
    type PruneStream = BoxStream<UsageRecord>;
    async fn prune(&self, _: Request<PruneRequest>) -> Result<Response<Self::PruneStream>, Status> {
        Err(Status::unimplemented("prune"))
    }
    async fn solve(
        &self,
        request: Request<SolveRequest>,
    ) -> Result<Response<SolveResponse>, Status> {
        self.solve_requests
            .lock()
            .unwrap()
            .push(request.into_inner());
        Err(Status::unknown(
            "failed to compute cache key: \"/missing\": not found",
        ))
    }
    type StatusStream = BoxStream<StatusResponse>;
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        let vertex = Vertex {
            digest: format!("sha256:{}", request.into_inner().r#ref),
            name: "[internal] load build definition from Dockerfile".into(),
            ..Default::default()
        };
        let stream = tokio_stream::iter(vec![Ok(StatusResponse {
            vertexes: vec![vertex],
            ..Default::default()
        })]);
        Ok(Response::new(Box::pin(stream)))
    }
    type SessionStream = BoxStream<BytesMessage>;
    async fn session(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let id = request
            .metadata()
            .get("x-docker-expose-session-uuid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.session_headers.lock().unwrap().push(id);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<BytesMessage, Status>>(1);
        // Keep the outbound side open until the client closes its side.
        tokio::spawn(async move {
            while let Some(Ok(_)) = inbound.next().await {}
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let mut record = WorkerRecord {
            id: "fake0".into(),
            ..Default::default()
        };
        record.labels.insert(
            "org.mobyproject.buildkit.worker.executor".into(),
            "oci".into(),
        );
        Ok(Response::new(ListWorkersResponse {
            record: vec![record],
        }))
    }
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Err(Status::unimplemented("info"))
    }
}

async fn start(
    dir: &std::path::Path,
) -> (
    String,
    Arc<Mutex<Vec<SolveRequest>>>,
    Arc<Mutex<Vec<String>>>,
) {
    let path = dir.join("kilnd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = Fake::default();
    let (requests, sessions) = (fake.solve_requests.clone(), fake.session_headers.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(fake))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    (format!("unix://{}", path.display()), requests, sessions)
}

#[tokio::test]
async fn ping_lists_workers_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (address, _, _) = start(dir.path()).await;
    let workers = kiln_client::ping_address(&address, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].id, "fake0");
    assert_eq!(
        workers[0].labels["org.mobyproject.buildkit.worker.executor"],
        "oci"
    );
}

#[tokio::test]
async fn failed_solve_keeps_the_daemon_message() {
    let dir = tempfile::tempdir().unwrap();
    let (address, requests, sessions) = start(dir.path()).await;
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), "FROM scratch\n").unwrap();

    let client = kiln_client::connect(&address, Duration::from_secs(5))
        .await
        .unwrap();
    let mut exporter_attrs = std::collections::BTreeMap::new();
    exporter_attrs.insert(
        "name".to_string(),
        "docker.io/library/foo:latest".to_string(),
    );
    let mut options = kiln_client::SolveOptions {
        frontend: "dockerfile.v0".into(),
        exporters: vec![("docker".into(), exporter_attrs.clone())],
        output_file: Some(dir.path().join("out.tar")),
        shared_key: "key".into(),
        ..Default::default()
    };
    options
        .frontend_attrs
        .insert("filename".into(), "Dockerfile".into());
    options
        .locals
        .insert("context".into(), context.path().to_path_buf());
    options
        .locals
        .insert("dockerfile".into(), context.path().to_path_buf());

    let (tx, mut rx) = mpsc::channel(16);
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        kiln_client::solve(client, options, tx),
    )
    .await
    .expect("solve must not hang")
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "failed to solve: failed to compute cache key: \"/missing\": not found"
    );
    assert_eq!(err.status().unwrap().code(), tonic::Code::Unknown);

    // The status stream was forwarded, for the same ref as the solve.
    let status = rx.recv().await.expect("one status message");
    assert!(
        rx.recv().await.is_none(),
        "channel closed after the stream ended"
    );
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        status.vertexes[0].digest,
        format!("sha256:{}", request.r#ref)
    );

    // The solve request carries the session, the frontend and both exporter forms.
    assert_eq!(*sessions.lock().unwrap(), vec![request.session.clone()]);
    assert_eq!(request.frontend, "dockerfile.v0");
    assert_eq!(request.frontend_attrs["filename"], "Dockerfile");
    assert_eq!(request.exporters.len(), 1);
    assert_eq!(request.exporters[0].r#type, "docker");
    assert_eq!(request.exporter_deprecated, "docker");
    assert_eq!(request.exporter_attrs_deprecated, exporter_attrs);
}
