//! Client end of the session: opens `Control.Session` and serves the
//! session services over it (the CLI is the gRPC *server* here).
//!
//! ```no_run
//! # async fn demo(control: kiln_proto::moby::buildkit::v1::control_client::ControlClient<tonic::transport::Channel>) -> Result<(), kiln_session::Error> {
//! use kiln_session::client::SessionBuilder;
//! let session = SessionBuilder::new("shared-key")
//!     .local_dir("context", "/src")
//!     .file_send_path("/tmp/out.tar");
//! let session_id = session.id().to_string();
//! let handle = session.run(control).await?;
//! // ... Control.Solve { session: session_id, .. } ...
//! handle.close().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use kiln_proto::moby::buildkit::secrets::v1::secrets_server::SecretsServer;
use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::BytesMessage;
use kiln_proto::moby::filesync::v1::file_sync_server::FileSyncServer;
use kiln_proto::moby::sshforward::v1::ssh_server::SshServer;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Server};

use crate::auth::{AuthService, DockerConfig};
use crate::filesend::{FileSendServer, FileSendTarget, ReceiveStats};
use crate::filesync::{FileSyncService, SendStats};
use crate::secrets::{SecretSource, SecretsService};
use crate::sshforward::SshService;
use crate::tunnel::Tunnel;
use crate::{
    metadata, Error, HEADER_SESSION_ID, HEADER_SESSION_METHOD, HEADER_SESSION_SHARED_KEY,
    MAX_MESSAGE_SIZE,
};

/// The methods every session built here serves, as advertised in
/// `x-docker-expose-session-grpc-method`; the Secrets and SSH methods are
/// added when secrets or agents are configured, [`crate::auth::METHODS`]
/// with [`SessionBuilder::registry_auth`].
pub const METHODS: [&str; 4] = [
    "/moby.filesync.v1.FileSync/DiffCopy",
    "/moby.filesync.v1.FileSync/TarStream",
    "/moby.filesync.v1.FileSend/DiffCopy",
    "/grpc.health.v1.Health/Check",
];

/// Configures and starts a client session.
#[derive(Debug, Clone)]
pub struct SessionBuilder {
    id: String,
    shared_key: String,
    dirs: HashMap<String, PathBuf>,
    file_send: Option<FileSendTarget>,
    file_send_targets: HashMap<String, FileSendTarget>,
    registry_auth: Option<DockerConfig>,
    secrets: HashMap<String, SecretSource>,
    ssh_agents: HashMap<String, PathBuf>,
    services: ExtraServices,
}

/// Session services served besides the built-in ones (e.g. a content store), with the method
/// names to advertise for them. Cloneable, so it can travel inside solve options.
#[derive(Debug, Clone, Default)]
pub struct ExtraServices {
    routes: tonic::service::RoutesBuilder,
    methods: Vec<String>,
}

impl ExtraServices {
    /// Adds a generated gRPC server (`FooServer::new(..)`) advertising `methods`
    /// (`/<package>.<Service>/<Method>`).
    pub fn add<S>(&mut self, service: S, methods: &[&str]) -> &mut Self
    where
        S: tower::Service<
                tonic::codegen::http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
                Response = tonic::codegen::http::Response<tonic::body::Body>,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.methods.extend(methods.iter().map(|m| m.to_string()));
        self
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }
}

impl SessionBuilder {
    /// A session with a random 25-character id and the given shared key.
    pub fn new(shared_key: impl Into<String>) -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::thread_rng();
        let id = (0..25)
            .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
            .collect();
        SessionBuilder {
            id,
            shared_key: shared_key.into(),
            dirs: HashMap::new(),
            file_send: None,
            file_send_targets: HashMap::new(),
            registry_auth: None,
            secrets: HashMap::new(),
            ssh_agents: HashMap::new(),
            services: ExtraServices::default(),
        }
    }

    /// The session id (what `SolveRequest.Session` names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Exposes `path` to FileSync under dir-name `name`.
    pub fn local_dir(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.dirs.insert(name.into(), path.into());
        self
    }

    /// Writes bytes received over FileSend into `path` (created/truncated).
    pub fn file_send_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.file_send = Some(FileSendTarget::File(path.into()));
        self
    }

    /// Receives the `local` exporter's files over FileSend into `dir`
    /// (created when missing; merged, existing files not listed are kept;
    /// owned by this process's uid/gid).
    pub fn file_send_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.file_send = Some(FileSendTarget::Dir(dir.into()));
        self
    }

    /// Writes bytes received over FileSend for exporter id `exporter_id`
    /// (the `buildkit-attachable-exporter-id` metadata) into `path` instead
    /// of the default target.
    pub fn file_send_target(
        mut self,
        exporter_id: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> Self {
        self.file_send_targets
            .insert(exporter_id.into(), FileSendTarget::File(path.into()));
        self
    }

    /// Serves `moby.filesync.v1.Auth` from `config`: the daemon asks it for registry
    /// credentials and tokens (as buildctl, which always attaches it).
    pub fn registry_auth(mut self, config: DockerConfig) -> Self {
        self.registry_auth = Some(config);
        self
    }

    /// Also serves `services` over the session (and advertises their methods).
    pub fn services(mut self, services: ExtraServices) -> Self {
        self.services = services;
        self
    }

    /// Serves secret `id` from `source` over `moby.buildkit.secrets.v1.Secrets`.
    pub fn secret(mut self, id: impl Into<String>, source: SecretSource) -> Self {
        self.secrets.insert(id.into(), source);
        self
    }

    /// Forwards agent `id` to the unix socket `socket` over
    /// `moby.sshforward.v1.SSH`.
    pub fn ssh_agent(mut self, id: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        self.ssh_agents.insert(id.into(), socket.into());
        self
    }

    /// Opens `Control.Session` on `control` and serves the session services
    /// over it until [`SessionHandle::close`] or the daemon ends it.
    pub async fn run(self, mut control: ControlClient<Channel>) -> Result<SessionHandle, Error> {
        let (out_tx, out_rx) = mpsc::channel::<BytesMessage>(32);
        let close = CancellationToken::new();
        // Cancelling `close` ends the request stream: CloseSend.
        let outbound = ReceiverStream::new(out_rx).take_until(close.clone().cancelled_owned());
        let mut request = tonic::Request::new(outbound);
        let md = request.metadata_mut();
        metadata::insert_value(md, HEADER_SESSION_ID, &self.id)?;
        metadata::insert_value(md, HEADER_SESSION_SHARED_KEY, &self.shared_key)?;
        let auth = self.registry_auth.map(AuthService::new).transpose()?;
        let mut methods: Vec<String> = METHODS.iter().map(|m| m.to_string()).collect();
        if auth.is_some() {
            methods.extend(crate::auth::METHODS.iter().map(|m| m.to_string()));
        }
        if !self.secrets.is_empty() {
            methods.push(crate::secrets::METHOD.to_string());
        }
        if !self.ssh_agents.is_empty() {
            methods.extend(crate::sshforward::METHODS.iter().map(|m| m.to_string()));
        }
        methods.extend(self.services.methods.iter().cloned());
        metadata::append_values(md, HEADER_SESSION_METHOD, &methods)?;

        let inbound = control
            .session(request)
            .await
            .map_err(|status| Error::Rpc {
                method: "/moby.buildkit.v1.Control/Session",
                status,
            })?
            .into_inner();

        let ended = CancellationToken::new();
        let tunnel = Tunnel::new(Box::pin(inbound), out_tx, Some(ended.clone().drop_guard()));
        let counters = Arc::new(Counters::default());
        let filesync = FileSyncService {
            dirs: Arc::new(self.dirs),
            stats: counters.clone(),
        };
        let filesend =
            FileSendServer::new(self.file_send, self.file_send_targets, counters.clone());
        let secrets = SecretsService {
            sources: Arc::new(self.secrets),
        };
        let ssh = SshService {
            agents: Arc::new(self.ssh_agents),
        };
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = Server::builder()
            .add_routes(self.services.routes.routes())
            .add_service(
                FileSyncServer::new(filesync)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(filesend)
            .add_optional_service(auth.map(AuthService::into_server))
            .add_service(
                SecretsServer::new(secrets)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(SshServer::new(ssh))
            .add_service(health)
            .serve_with_incoming(tokio_stream::once(Ok::<_, io::Error>(tunnel)));
        // With a stream of one connection the server future returns once it
        // has accepted it; the connection itself runs on its own task and
        // drops the tunnel (firing `ended`) when it is over.
        let server = tokio::spawn(server);
        tracing::debug!(session = %self.id, "session started");
        Ok(SessionHandle {
            id: self.id,
            close,
            ended,
            server: Some(server),
            counters,
        })
    }
}

/// What went over a session so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// File content bytes sent over FileSync.
    pub filesync_bytes_sent: u64,
    /// Files whose content was sent over FileSync.
    pub filesync_files_sent: u64,
    /// Bytes received over FileSend.
    pub filesend_bytes_received: u64,
}

#[derive(Debug, Default)]
struct Counters {
    filesync_bytes_sent: AtomicU64,
    filesync_files_sent: AtomicU64,
    filesend_bytes_received: AtomicU64,
}

impl SendStats for Counters {
    fn file_sent(&self, bytes: u64) {
        self.filesync_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.filesync_files_sent.fetch_add(1, Ordering::Relaxed);
    }
}

impl ReceiveStats for Counters {
    fn received(&self, bytes: u64) {
        self.filesend_bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A running client session. Dropping it closes the session without waiting.
#[derive(Debug)]
pub struct SessionHandle {
    id: String,
    close: CancellationToken,
    ended: CancellationToken,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    counters: Arc<Counters>,
}

impl SessionHandle {
    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Counters of what went over the session.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            filesync_bytes_sent: self.counters.filesync_bytes_sent.load(Ordering::Relaxed),
            filesync_files_sent: self.counters.filesync_files_sent.load(Ordering::Relaxed),
            filesend_bytes_received: self
                .counters
                .filesend_bytes_received
                .load(Ordering::Relaxed),
        }
    }

    /// Whether the session's connection has ended.
    pub fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Resolves when the session's connection has ended (after
    /// [`close`](Self::close) or when the daemon drops the session).
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Closes the session: CloseSend, then drain until the daemon ends the
    /// stream and the connection is gone.
    pub async fn close(mut self) -> Result<(), Error> {
        self.close.cancel();
        self.ended.cancelled().await;
        if let Some(server) = self.server.take() {
            match server.await {
                Ok(result) => result.map_err(Error::Serve)?,
                Err(join) => tracing::warn!(error = %join, "session server task failed"),
            }
        }
        tracing::debug!(session = %self.id, "session closed");
        Ok(())
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.close.cancel();
    }
}
