//! Daemon end of the session: `Control.Session` calls become registered
//! [`Session`]s whose gRPC client channel runs over the call's byte pipe.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use kiln_proto::moby::buildkit::v1::BytesMessage;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::tunnel::Tunnel;
use crate::{
    metadata, Error, HEADER_HEALTH_TIMEOUT, HEADER_SESSION_ID, HEADER_SESSION_METHOD,
    HEADER_SESSION_SHARED_KEY,
};

/// How the daemon health-checks session clients (§5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between checks.
    pub interval: Duration,
    /// Lower bound of a check's timeout; the timeout grows to 1.5× the last
    /// check's duration.
    pub min_timeout: Duration,
    /// Consecutive failures after which the session is dropped.
    pub failure_threshold: u32,
}

impl Default for HealthConfig {
    /// BuildKit's defaults: every 5 s, timeout ≥ 15 s, dropped after 2 failures.
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            min_timeout: Duration::from_secs(15),
            failure_threshold: 2,
        }
    }
}

/// A connected client session.
#[derive(Debug)]
pub struct Session {
    id: String,
    shared_key: String,
    methods: Vec<String>,
    channel: Channel,
    closed: CancellationToken,
}

impl Session {
    /// Session id (`x-docker-expose-session-uuid`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Shared key the client sent (may be empty).
    pub fn shared_key(&self) -> &str {
        &self.shared_key
    }

    /// Full method names the client serves (`/svc/Method`).
    pub fn methods(&self) -> &[String] {
        &self.methods
    }

    /// A gRPC channel to the client's services over the tunnel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Whether the client advertised `method` (case-insensitive).
    pub fn supports(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }

    /// Whether the session has ended (stream closed or health checks failed).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }
}

#[derive(Debug)]
struct Inner {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Bumped on every registration so `get` can wait without polling.
    generation: watch::Sender<u64>,
    health: HealthConfig,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // A poisoned map is still a consistent map: entries are only inserted
        // or removed whole.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remove(&self, session: &Arc<Session>) {
        let mut sessions = self.lock();
        if sessions
            .get(&session.id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.id);
            tracing::debug!(session = %session.id, "session removed");
        }
    }
}

/// Registry of connected sessions, shared by the daemon's Control service.
#[derive(Debug, Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

impl Default for SessionManager {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionManager {
    /// A manager with BuildKit's default health checking.
    pub fn new() -> Self {
        Self::with_health(HealthConfig::default())
    }

    /// A manager with the given health checking.
    pub fn with_health(health: HealthConfig) -> Self {
        SessionManager {
            inner: Arc::new(Inner {
                sessions: Mutex::new(HashMap::new()),
                generation: watch::channel(0).0,
                health,
            }),
        }
    }

    /// Serves one `Control.Session` call: reads the session headers, builds
    /// a gRPC client over the stream and registers the session. The returned
    /// stream is the RPC's response; the session is removed when it ends or
    /// is dropped.
    pub async fn handle(
        &self,
        metadata: &MetadataMap,
        inbound: tonic::Streaming<BytesMessage>,
    ) -> Result<impl Stream<Item = Result<BytesMessage, tonic::Status>> + Send + 'static, Error>
    {
        let id = metadata::first_value(metadata, HEADER_SESSION_ID)
            .filter(|id| !id.is_empty())
            .ok_or(Error::MissingHeader {
                name: HEADER_SESSION_ID,
            })?;
        let shared_key =
            metadata::first_value(metadata, HEADER_SESSION_SHARED_KEY).unwrap_or_default();
        let methods = metadata::read_values(metadata, HEADER_SESSION_METHOD);
        let health = match metadata::first_value(metadata, HEADER_HEALTH_TIMEOUT)
            .and_then(|ms| ms.parse::<u64>().ok())
        {
            // Custom timeout: interval = timeout = max(ms, 1 s), one strike.
            Some(ms) => {
                let timeout = Duration::from_millis(ms).max(Duration::from_secs(1));
                HealthConfig {
                    interval: timeout,
                    min_timeout: timeout,
                    failure_threshold: 1,
                }
            }
            None => self.inner.health,
        };
        if self.inner.lock().contains_key(&id) {
            return Err(Error::SessionExists { id });
        }

        let (out_tx, out_rx) = mpsc::channel::<BytesMessage>(32);
        let tunnel = Tunnel::new(Box::pin(inbound), out_tx, None);
        let channel = connect_over(tunnel).await?;

        let closed = CancellationToken::new();
        let session = Arc::new(Session {
            id: id.clone(),
            shared_key,
            methods,
            channel: channel.clone(),
            closed: closed.clone(),
        });
        {
            let mut sessions = self.inner.lock();
            if sessions.contains_key(&id) {
                return Err(Error::SessionExists { id });
            }
            sessions.insert(id.clone(), session.clone());
        }
        self.inner.generation.send_modify(|g| *g += 1);
        tracing::debug!(session = %id, methods = ?session.methods, "session registered");

        tokio::spawn(health_loop(
            channel,
            health,
            Arc::downgrade(&self.inner),
            Arc::downgrade(&session),
            closed.clone(),
        ));

        let guard = SessionGuard {
            manager: self.inner.clone(),
            session,
        };
        let outbound = ReceiverStream::new(out_rx)
            .map(Ok)
            .take_until(closed.cancelled_owned());
        Ok(Outbound {
            inner: Box::pin(outbound),
            guard,
        })
    }

    /// Waits up to `timeout` for session `id` (an optional `prefix:` is
    /// stripped) to connect.
    pub async fn get(&self, id: &str, timeout: Duration) -> Result<Arc<Session>, Error> {
        let id = match id.split_once(':') {
            Some((_, rest)) if !rest.is_empty() => rest,
            _ => id,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before looking so a registration in between is not missed.
        let mut changes = self.inner.generation.subscribe();
        loop {
            if let Some(session) = self.inner.lock().get(id) {
                return Ok(session.clone());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives as long as `self`; treat closure as timeout.
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::SessionTimeout {
                        id: id.to_string(),
                        timeout,
                    })
                }
            }
        }
    }

    /// Ids of the sessions connected now.
    pub fn session_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.inner.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// A gRPC client channel whose one and only connection is the tunnel
/// (h2c with prior knowledge, authority `localhost`).
async fn connect_over(tunnel: Tunnel) -> Result<Channel, Error> {
    let slot = Arc::new(Mutex::new(Some(tunnel)));
    let connector = tower::service_fn(move |_: Uri| {
        let taken = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        async move {
            taken.map(TokioIo::new).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "session tunnel allows only one connection",
                )
            })
        }
    });
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .map_err(Error::Connect)
}

async fn health_loop(
    channel: Channel,
    config: HealthConfig,
    manager: Weak<Inner>,
    session: Weak<Session>,
    closed: CancellationToken,
) {
    let mut client = HealthClient::new(channel);
    let mut last = Duration::ZERO;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = closed.cancelled() => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
        let timeout = config.min_timeout.max(last.mul_f64(1.5));
        let started = Instant::now();
        let check = tokio::time::timeout(timeout, client.check(HealthCheckRequest::default()));
        let outcome = tokio::select! {
            _ = closed.cancelled() => return,
            outcome = check => outcome,
        };
        last = started.elapsed();
        let failure = match outcome {
            Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => None,
            Ok(Ok(response)) => Some(format!("status {}", response.get_ref().status)),
            Ok(Err(status)) => Some(status.to_string()),
            Err(_) => Some(format!("no answer within {timeout:?}")),
        };
        match failure {
            None => failures = 0,
            Some(reason) => {
                failures += 1;
                tracing::warn!(%reason, failures, "session health check failed");
                if failures >= config.failure_threshold {
                    closed.cancel();
                    if let (Some(manager), Some(session)) = (manager.upgrade(), session.upgrade()) {
                        manager.remove(&session);
                    }
                    return;
                }
            }
        }
    }
}

/// Removes the session when the response stream goes away.
struct SessionGuard {
    manager: Arc<Inner>,
    session: Arc<Session>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.session.closed.cancel();
        self.manager.remove(&self.session);
    }
}

type BoxStream = std::pin::Pin<Box<dyn Stream<Item = Result<BytesMessage, tonic::Status>> + Send>>;

struct Outbound {
    inner: BoxStream,
    guard: SessionGuard,
}

impl Stream for Outbound {
    type Item = Result<BytesMessage, tonic::Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        if let std::task::Poll::Ready(None) = next {
            self.guard.session.closed.cancel();
            self.guard.manager.remove(&self.guard.session);
        }
        next
    }
}
