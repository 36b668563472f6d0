//! End to end: a real tonic Control server (a stub whose `Session` hands the
//! stream to `SessionManager::handle`) on a unix socket, a `SessionBuilder`
//! client connected to it, and the daemon-side calls going back through the
//! tunnel.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures::Stream;
use hyper_util::rt::TokioIo;
use kiln_proto::moby::buildkit::v1 as control;
use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::control_server::{Control, ControlServer};
use kiln_session::client::SessionBuilder;
use kiln_session::filesync::{self, Differ, ReceiveRequest};
use kiln_session::{filesend, Error, HealthConfig, SessionManager};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

struct ControlStub {
    manager: SessionManager,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlStub {
    async fn disk_usage(
        &self,
        _: Request<control::DiskUsageRequest>,
    ) -> Result<Response<control::DiskUsageResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    type PruneStream = BoxStream<control::UsageRecord>;
    async fn prune(
        &self,
        _: Request<control::PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn solve(
        &self,
        _: Request<control::SolveRequest>,
    ) -> Result<Response<control::SolveResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    type StatusStream = BoxStream<control::StatusResponse>;
    async fn status(
        &self,
        _: Request<control::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        Err(Status::unimplemented("stub"))
    }
    type SessionStream = BoxStream<control::BytesMessage>;
    async fn session(
        &self,
        request: Request<tonic::Streaming<control::BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let metadata = request.metadata().clone();
        let stream = self
            .manager
            .handle(&metadata, request.into_inner())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Box::pin(stream)))
    }
    async fn list_workers(
        &self,
        _: Request<control::ListWorkersRequest>,
    ) -> Result<Response<control::ListWorkersResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
    async fn info(
        &self,
        _: Request<control::InfoRequest>,
    ) -> Result<Response<control::InfoResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

/// Starts the stub daemon on `<dir>/kilnd.sock` and returns a client of it.
async fn start_daemon(dir: &Path, manager: SessionManager) -> ControlClient<Channel> {
    let socket = dir.join("kilnd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(ControlServer::new(ControlStub { manager }))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    ControlClient::new(channel)
}

fn set_mtime(path: &Path, secs: u64) {
    let time = SystemTime::UNIX_EPOCH + Duration::new(secs, 123_456_789);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

/// The context dir of the test.
fn make_context(root: &Path) {
    fs::create_dir_all(root.join("src/lib")).unwrap();
    fs::create_dir_all(root.join("secret")).unwrap();
    fs::write(root.join("Dockerfile"), "FROM scratch\n").unwrap();
    fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
    fs::write(root.join("src/lib/mod.rs"), "pub mod x;\n").unwrap();
    fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("build.log"), "noise").unwrap();
    fs::write(root.join("keep.log"), "kept").unwrap();
    fs::write(root.join("secret/token"), "hunter2").unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("link")).unwrap();
    fs::hard_link(root.join("Dockerfile"), root.join("hard")).unwrap();
    for file in [
        "Dockerfile",
        "src/main.rs",
        "src/lib/mod.rs",
        "run.sh",
        "keep.log",
    ] {
        set_mtime(&root.join(file), 1_600_000_000);
    }
}

/// Relative paths under `root`, sorted.
fn tree(root: &Path) -> Vec<String> {
    fn visit(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                visit(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    visit(root, root, &mut out);
    out.sort();
    out
}

fn context_request(dest: PathBuf) -> ReceiveRequest {
    ReceiveRequest {
        dir_name: "context".into(),
        dest,
        exclude_patterns: vec!["*.log".into(), "!keep.log".into(), "secret".into()],
        ..ReceiveRequest::default()
    }
}

#[tokio::test]
async fn receive_and_send_through_the_session() {
    let temp = tempfile::tempdir().unwrap();
    let context = temp.path().join("context");
    let dest = temp.path().join("dest");
    let out = temp.path().join("out.tar");
    make_context(&context);
    // Stale content the sender does not list must go.
    fs::create_dir_all(dest.join("old/deeper")).unwrap();
    fs::write(dest.join("stale.txt"), "stale").unwrap();
    fs::write(dest.join("old/deeper/x"), "x").unwrap();
    // Symlinks in dest where the sender has a dir and a file must be
    // replaced, never written through.
    let outside = temp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "original").unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("src")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), dest.join("keep.log")).unwrap();

    // Frequent health checks: they run over the tunnel during the test and
    // must keep passing.
    let manager = SessionManager::with_health(HealthConfig {
        interval: Duration::from_millis(50),
        min_timeout: Duration::from_secs(2),
        failure_threshold: 1,
    });
    let control = start_daemon(temp.path(), manager.clone()).await;
    let builder = SessionBuilder::new("shared-key")
        .local_dir("context", &context)
        .file_send_path(&out);
    let id = builder.id().to_string();
    assert_eq!(id.len(), 25);
    let handle = builder.run(control).await.unwrap();

    let session = manager
        .get(&format!("ctx:{id}"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(session.id(), id);
    assert_eq!(session.shared_key(), "shared-key");
    assert!(session.supports("/moby.filesync.v1.FileSync/diffcopy"));
    assert!(session.supports("/moby.filesync.v1.FileSend/diffcopy"));
    assert!(!session.supports("/moby.sshforward.v1.SSH/ForwardAgent"));

    // First transfer: everything but the hardlink's content.
    let stats = filesync::receive(session.channel(), context_request(dest.clone()))
        .await
        .unwrap();
    assert_eq!(
        tree(&dest),
        [
            "Dockerfile",
            "hard",
            "keep.log",
            "link",
            "run.sh",
            "src",
            "src/lib",
            "src/lib/mod.rs",
            "src/main.rs",
        ]
    );
    assert_eq!(stats.files_requested, 5);
    let expected_bytes: u64 = [
        "Dockerfile",
        "src/main.rs",
        "src/lib/mod.rs",
        "run.sh",
        "keep.log",
    ]
    .iter()
    .map(|f| fs::metadata(context.join(f)).unwrap().len())
    .sum();
    assert_eq!(stats.bytes_received, expected_bytes);
    assert_eq!(
        fs::read_to_string(dest.join("src/main.rs")).unwrap(),
        "fn main() {}\n"
    );
    assert_eq!(fs::read_to_string(dest.join("keep.log")).unwrap(), "kept");
    assert!(fs::symlink_metadata(dest.join("src")).unwrap().is_dir());
    assert!(fs::symlink_metadata(dest.join("keep.log"))
        .unwrap()
        .is_file());
    assert_eq!(tree(&outside), ["victim"]);
    assert_eq!(
        fs::read_to_string(outside.join("victim")).unwrap(),
        "original"
    );
    assert_eq!(
        fs::read_link(dest.join("link")).unwrap(),
        PathBuf::from("src/main.rs")
    );
    let dockerfile = fs::metadata(dest.join("Dockerfile")).unwrap();
    let hard = fs::metadata(dest.join("hard")).unwrap();
    assert_eq!(
        dockerfile.ino(),
        hard.ino(),
        "hard must be a hardlink of Dockerfile"
    );
    let script = fs::metadata(dest.join("run.sh")).unwrap();
    assert_eq!(script.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        (script.mtime(), script.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!((script.uid(), script.gid()), (0, 0));
    let client_stats = handle.stats();
    assert_eq!(client_stats.filesync_files_sent, 5);
    assert_eq!(client_stats.filesync_bytes_sent, expected_bytes);

    // Unchanged: nothing is requested.
    let again = filesync::receive(session.channel(), context_request(dest.clone()))
        .await
        .unwrap();
    assert_eq!(again.files_requested, 0);
    assert_eq!(again.bytes_received, 0);

    // One file changed: only it is requested.
    fs::write(
        context.join("src/main.rs"),
        "fn main() { println!(\"x\"); }\n",
    )
    .unwrap();
    let changed = filesync::receive(session.channel(), context_request(dest.clone()))
        .await
        .unwrap();
    assert_eq!(changed.files_requested, 1);
    assert_eq!(
        fs::read_to_string(dest.join("src/main.rs")).unwrap(),
        "fn main() { println!(\"x\"); }\n"
    );
    assert_eq!(handle.stats().filesync_files_sent, 6);

    // A full copy with the None differ requests every file again.
    let all = filesync::receive(
        session.channel(),
        ReceiveRequest {
            differ: Differ::None,
            ..context_request(dest.clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(all.files_requested, 5);

    // FileSend: 10 MiB of exporter output lands in the client's file.
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let metadata = BTreeMap::from([(
        "containerimage.digest".to_string(),
        "sha256:0123".to_string(),
    )]);
    let sent = filesend::send(session.channel(), 0, &metadata, &data[..])
        .await
        .unwrap();
    assert_eq!(sent, data.len() as u64);
    assert_eq!(fs::read(&out).unwrap(), data);
    assert_eq!(handle.stats().filesend_bytes_received, data.len() as u64);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!session.is_closed(), "healthy session was dropped");

    // Closing ends the session on the daemon side too.
    tokio::time::timeout(Duration::from_secs(10), handle.close())
        .await
        .expect("close drains in time")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), session.closed())
        .await
        .expect("daemon sees the session end");
    assert!(manager.session_ids().is_empty());
}

#[tokio::test]
async fn get_times_out_for_an_unknown_session() {
    let manager = SessionManager::new();
    let error = manager
        .get("prefix:nosuchsession", Duration::from_millis(100))
        .await
        .unwrap_err();
    match &error {
        Error::SessionTimeout { id, timeout } => {
            assert_eq!(id, "nosuchsession");
            assert_eq!(*timeout, Duration::from_millis(100));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(error.to_string().contains("nosuchsession"), "{error}");
}

#[tokio::test]
async fn unknown_dir_and_missing_file_send_target_are_reported() {
    let temp = tempfile::tempdir().unwrap();
    let manager = SessionManager::new();
    let control = start_daemon(temp.path(), manager.clone()).await;
    let builder = SessionBuilder::new("");
    let id = builder.id().to_string();
    let handle = builder.run(control).await.unwrap();
    let session = manager.get(&id, Duration::from_secs(5)).await.unwrap();

    let error = filesync::receive(
        session.channel(),
        ReceiveRequest {
            dir_name: "nope".into(),
            dest: temp.path().join("dest"),
            ..ReceiveRequest::default()
        },
    )
    .await
    .unwrap_err();
    match error {
        Error::Rpc { status, .. } => {
            assert_eq!(status.code(), tonic::Code::NotFound);
            assert_eq!(status.message(), "no access allowed to dir \"nope\"");
        }
        other => panic!("unexpected error {other:?}"),
    }

    let error = filesend::send(session.channel(), 0, &BTreeMap::new(), &b"data"[..])
        .await
        .unwrap_err();
    match error {
        Error::Rpc { status, .. } => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(status.message().contains("no file send target"), "{status}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    handle.close().await.unwrap();
}

#[tokio::test]
async fn a_client_that_fails_health_checks_is_dropped() {
    let temp = tempfile::tempdir().unwrap();
    let manager = SessionManager::with_health(HealthConfig {
        interval: Duration::from_millis(50),
        min_timeout: Duration::from_millis(200),
        failure_threshold: 2,
    });
    let mut control = start_daemon(temp.path(), manager.clone()).await;

    // A client that opens the session but never serves anything on it.
    let (_tx, rx) = tokio::sync::mpsc::channel::<control::BytesMessage>(1);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(kiln_session::HEADER_SESSION_ID, "silent".parse().unwrap());
    let mut inbound = control.session(request).await.unwrap().into_inner();
    let session = manager.get("silent", Duration::from_secs(5)).await.unwrap();

    tokio::time::timeout(Duration::from_secs(10), session.closed())
        .await
        .expect("session dropped after failed health checks");
    // The daemon ends the Session stream (after the HTTP/2 preface it wrote).
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while inbound.message().await.ok().flatten().is_some() {}
    })
    .await;
    assert!(drained.is_ok(), "session stream did not end");
    assert!(manager
        .get("silent", Duration::from_millis(10))
        .await
        .is_err());
}

#[tokio::test]
async fn secrets_and_ssh_agents_through_the_tunnel() {
    use kiln_session::secrets::{self, SecretSource};
    use kiln_session::sshforward;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let temp = tempfile::tempdir().unwrap();
    let secret_file = temp.path().join("token");
    fs::write(&secret_file, b"s3cr3t").unwrap();
    // A stand-in agent: answers every request with "re:" + the request.
    let agent_path = temp.path().join("agent.sock");
    let agent = UnixListener::bind(&agent_path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = agent.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut reply = b"re:".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    if conn.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let manager = SessionManager::new();
    let control = start_daemon(temp.path(), manager.clone()).await;
    let builder = SessionBuilder::new("")
        .secret("token", SecretSource::File(secret_file))
        .ssh_agent("default", &agent_path);
    let id = builder.id().to_string();
    let handle = builder.run(control).await.unwrap();
    let session = manager.get(&id, Duration::from_secs(5)).await.unwrap();
    assert!(session.supports(secrets::METHOD));
    assert!(session.supports(sshforward::METHODS[1]));

    assert_eq!(
        secrets::get_secret(session.channel(), "token")
            .await
            .unwrap(),
        Some(b"s3cr3t".to_vec())
    );
    assert_eq!(
        secrets::get_secret(session.channel(), "other")
            .await
            .unwrap(),
        None
    );
    assert!(sshforward::check_agent(session.channel(), "default")
        .await
        .unwrap());
    assert!(!sshforward::check_agent(session.channel(), "deploy")
        .await
        .unwrap());

    // One forwarded connection: what the container writes reaches the agent, its answer
    // comes back, and closing the container side ends the stream.
    let (mut container, daemon_side) = UnixStream::pair().unwrap();
    let forward = tokio::spawn(sshforward::forward_agent(
        session.channel(),
        "default",
        daemon_side,
    ));
    container.write_all(b"hello").await.unwrap();
    let mut reply = [0u8; 8];
    container.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"re:hello");
    drop(container);
    tokio::time::timeout(Duration::from_secs(5), forward)
        .await
        .expect("forwarding ends when the container closes its side")
        .unwrap()
        .unwrap();
    handle.close().await.unwrap();
}

#[tokio::test]
async fn local_export_is_merged_into_the_client_dir() {
    let temp = tempfile::tempdir().unwrap();
    let result = temp.path().join("result");
    make_context(&result);
    let out = temp.path().join("out");
    let outside = temp.path().join("outside");
    fs::create_dir_all(&out).unwrap();
    fs::create_dir_all(&outside).unwrap();
    // Merge keeps what the result does not list; a symlink where the result
    // has a directory is replaced, never written through.
    fs::write(out.join("mine.txt"), "mine").unwrap();
    std::os::unix::fs::symlink(&outside, out.join("src")).unwrap();

    let manager = SessionManager::new();
    let control = start_daemon(temp.path(), manager.clone()).await;
    let builder = SessionBuilder::new("").file_send_dir(&out);
    let id = builder.id().to_string();
    let handle = builder.run(control).await.unwrap();
    let session = manager.get(&id, Duration::from_secs(5)).await.unwrap();

    let md: BTreeMap<String, String> = BTreeMap::new();
    let stats = filesend::send_dir(session.channel(), 0, &md, &result, Some(1_000_000_000))
        .await
        .unwrap();
    assert_eq!(stats.files_sent, 7, "{stats:?}");
    let mut want = tree(&result);
    want.push("mine.txt".to_string());
    want.sort();
    assert_eq!(tree(&out), want);
    assert_eq!(tree(&outside), Vec::<String>::new());
    assert!(fs::symlink_metadata(out.join("src")).unwrap().is_dir());
    assert_eq!(
        fs::read(out.join("src/main.rs")).unwrap(),
        fs::read(result.join("src/main.rs")).unwrap()
    );
    assert_eq!(
        fs::read_link(out.join("link")).unwrap(),
        fs::read_link(result.join("link")).unwrap()
    );
    let run = fs::metadata(out.join("run.sh")).unwrap();
    assert_eq!(run.permissions().mode() & 0o7777, 0o755);
    assert_eq!(run.uid(), nix::unistd::getuid().as_raw());
    // Times later than the epoch were clamped to it.
    assert_eq!(run.mtime(), 1_000_000_000);
    assert_eq!(fs::read(out.join("mine.txt")).unwrap(), b"mine");

    // A second export of the same files transfers no content.
    let again = filesend::send_dir(session.channel(), 0, &md, &result, Some(1_000_000_000))
        .await
        .unwrap();
    assert_eq!(again.files_sent, 0, "{again:?}");
    handle.close().await.unwrap();
}
