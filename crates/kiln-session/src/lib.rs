//! BuildKit's session, both ends.
//!
//! A session is a gRPC connection running *backwards* inside the
//! `Control.Session` bidi stream: the stream of `BytesMessage` frames is a raw
//! byte pipe ([`tunnel`]), the client (CLI) runs an HTTP/2 gRPC **server** on
//! its end and the daemon is the gRPC **client** (h2c, prior knowledge, one
//! connection, authority `localhost`).
//!
//! - Daemon end: [`SessionManager`] turns an incoming `Control.Session` call
//!   into a registered [`Session`] (id, shared key, advertised methods and a
//!   [`tonic::transport::Channel`] over the tunnel), health-checks it and
//!   hands it out by id ([`SessionManager::get`]).
//! - Client end: [`client::SessionBuilder`] opens `Control.Session` and serves
//!   `moby.filesync.v1.FileSync` (fsutil DiffCopy sender of local dirs),
//!   `moby.filesync.v1.FileSend` (exporter output into a file, or the
//!   `local` exporter's files merged into a directory), optionally
//!   `moby.filesync.v1.Auth` (registry credentials from the docker config,
//!   [`auth`]) and `grpc.health.v1.Health` over it, plus `moby.buildkit.secrets.v1.Secrets`
//!   ([`secrets`]) and `moby.sshforward.v1.SSH` ([`sshforward`]) when the
//!   build was given secrets or SSH agents; the daemon ends of those two are
//!   [`secrets::get_secret`] and [`sshforward::forward_agent`].
//! - [`filesync::receive`] is the daemon's DiffCopy receiver that makes a
//!   destination directory match a client directory, fetching only changed
//!   files; [`filesend::send`] streams exporter bytes to the client and
//!   [`filesend::send_dir`] sends a directory to it (the same fsutil sender
//!   and receiver with the roles swapped);
//!   [`content::SessionContentStore`] writes blobs into a client's content store
//!   (`oci`/`docker` exporters with `tar=false`).
//!
//! Wire details follow `shared/reference/buildkit-and-nerdctl.md` §5.5–§5.7.

use std::path::PathBuf;
use std::time::Duration;

pub mod auth;
pub mod client;
pub mod content;
pub mod filesend;
pub mod filesync;
mod manager;
mod metadata;
pub mod patterns;
pub mod secrets;
pub mod sshforward;
pub mod stat;
mod tunnel;

pub use manager::{HealthConfig, Session, SessionManager};

/// Header carrying the session id.
pub const HEADER_SESSION_ID: &str = "x-docker-expose-session-uuid";
/// Header carrying the shared key.
pub const HEADER_SESSION_SHARED_KEY: &str = "x-docker-expose-session-sharedkey";
/// Header listing one served method per value.
pub const HEADER_SESSION_METHOD: &str = "x-docker-expose-session-grpc-method";
/// Optional header overriding the health-check timeout, in milliseconds.
pub const HEADER_HEALTH_TIMEOUT: &str = "x-buildkit-session-health-custom-timeout";

/// Largest gRPC message either end of the session accepts (§5.1).
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Errors of the session crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required session header is absent or not text.
    #[error("missing session header {name}")]
    MissingHeader {
        /// Header name.
        name: &'static str,
    },
    /// A session with this id is already registered.
    #[error("session {id} already exists")]
    SessionExists {
        /// Session id.
        id: String,
    },
    /// No session with this id connected in time.
    #[error("no active session for {id} after {timeout:?}")]
    SessionTimeout {
        /// Session id (prefix stripped).
        id: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Building the gRPC channel over the tunnel failed.
    #[error("failed to connect over the session tunnel")]
    Connect(#[source] tonic::transport::Error),
    /// The HTTP client for token requests could not be built.
    #[error("failed to create http client")]
    HttpClient {
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A gRPC call failed.
    #[error("{method} failed")]
    Rpc {
        /// Full method name.
        method: &'static str,
        /// Status returned.
        #[source]
        status: tonic::Status,
    },
    /// A metadata key or value cannot be sent as a gRPC header.
    #[error("invalid metadata {key}")]
    InvalidMetadata {
        /// Offending key.
        key: String,
    },
    /// A pattern does not compile.
    #[error("invalid pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// Pattern as given.
        pattern: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A path in the STAT stream is not clean and relative.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// Path as received.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The STAT stream is not in `ComparePath` order.
    #[error("changes out of order: {path:?} after {previous:?}")]
    OutOfOrder {
        /// Path as received.
        path: String,
        /// Path received before it.
        previous: String,
    },
    /// The parent of a path was not sent as a directory before it.
    #[error("changes out of order: parent of {path:?} not seen as a directory")]
    ParentMissing {
        /// Path as received.
        path: String,
    },
    /// A hardlink names a target that was not sent as a regular file.
    #[error("invalid hardlink {path:?} to {target:?}")]
    InvalidHardlink {
        /// Link path.
        path: String,
        /// Link target.
        target: String,
    },
    /// The peer sent a packet that does not fit the protocol state.
    #[error("unexpected {packet} packet {context}")]
    UnexpectedPacket {
        /// Packet kind.
        packet: &'static str,
        /// Where in the protocol it arrived.
        context: &'static str,
    },
    /// A REQ or DATA packet names an id that is not a requestable file.
    #[error("invalid file id {id}")]
    UnknownFileId {
        /// The id.
        id: u32,
    },
    /// The stream ended before the protocol finished.
    #[error("stream ended early {context}")]
    StreamEnded {
        /// Where in the protocol it ended.
        context: &'static str,
    },
    /// The peer reported an error (ERR packet).
    #[error("remote error: {message}")]
    Remote {
        /// Message sent by the peer.
        message: String,
    },
    /// A file system operation failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The local dir name is not exposed by this session.
    #[error("no access allowed to dir {name:?}")]
    UnknownDir {
        /// Requested dir name.
        name: String,
    },
    /// Reading the exporter output to send failed.
    #[error("failed to read exporter output")]
    ReadExport {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// FileSend was called but the session has no output file.
    #[error("no file send target configured")]
    NoFileSendTarget,
    /// Serving the session on the client end failed.
    #[error("failed to serve the session")]
    Serve(#[source] tonic::transport::Error),
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// The gRPC status a server-side failure is reported as.
    pub(crate) fn to_status(&self) -> tonic::Status {
        match self {
            Error::UnknownDir { .. } => tonic::Status::not_found(self.to_string()),
            Error::NoFileSendTarget => tonic::Status::failed_precondition(self.to_string()),
            Error::InvalidPattern { .. } | Error::InvalidMetadata { .. } => {
                tonic::Status::invalid_argument(self.to_string())
            }
            _ => tonic::Status::internal(error_chain(self)),
        }
    }
}

/// `outer: inner: ...` rendering of an error and its sources.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
