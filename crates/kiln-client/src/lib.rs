//! kiln's client of BuildKit's control API (`moby.buildkit.v1.Control`).
//!
//! - [`connect`] dials `unix://<path>` or `tcp://host:port` (h2c, 16 MiB
//!   messages) and returns the generated [`ControlClient`];
//!   [`ping`] is the liveness check nerdctl uses (`ListWorkers`).
//! - [`solve`] runs one build: opens the session tunnel (kiln-session), then
//!   `Control.Status` and `Control.Solve` concurrently, forwarding progress to a
//!   channel (see [`SolveOptions`]).
//! - [`disk_usage`] and [`prune`] are the build-cache administration calls
//!   (`kiln builder du` / `kiln builder prune`).
//! - [`progress`] models status messages as [`progress::ProgressEvent`]s and
//!   renders them as buildctl's `--progress=plain` text with
//!   [`progress::PlainPrinter`]; the caller owns the writer.
//!
//! Library code never prints; it logs with `tracing`.

mod connect;
pub mod progress;
mod solve;
mod usage;

use std::time::Duration;

pub use connect::{
    connect, connect_channel, ping, ping_address, set_client_tls, Address, ClientTls,
    MAX_MESSAGE_SIZE,
};
pub use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
pub use kiln_proto::moby::buildkit::v1::types::WorkerRecord;
pub use kiln_proto::moby::buildkit::v1::StatusResponse;
pub use kiln_proto::moby::buildkit::v1::UsageRecord;
pub use kiln_session::secrets::{SecretSource, MAX_SECRET_SIZE};
pub use solve::{new_ref, solve, SolveOptions, SolveOutcome};
pub use tonic::Code;
pub use usage::{disk_usage, prune};

/// Errors of the control-API client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is neither `unix://` nor `tcp://`.
    #[error("unsupported address scheme: {address:?}")]
    UnsupportedScheme {
        /// The address as given.
        address: String,
    },
    /// The address has a supported scheme but is malformed.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Connecting (socket or HTTP/2 handshake) failed.
    #[error("failed to connect to {address}")]
    Connect {
        /// The address dialed.
        address: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A TLS file given to the client could not be read.
    #[error("failed to read the TLS {what} {}", path.display())]
    TlsFile {
        /// Which file (`CA certificate`, `certificate`, `key`).
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS settings are incomplete or were refused by the transport.
    #[error("invalid TLS settings for {address}: {reason}")]
    TlsSettings {
        /// The address dialed.
        address: String,
        /// What is wrong.
        reason: String,
    },
    /// The daemon closed the TLS connection right after the handshake: it
    /// refused the client certificate (or its absence).
    #[error("the daemon at {address} refused the TLS connection ({detail}): {hint}")]
    TlsRejected {
        /// The address dialed.
        address: String,
        /// The transport's last word (`connection closed`, the TLS alert).
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// Connecting took longer than allowed.
    #[error("timed out after {timeout:?} connecting to {address}")]
    ConnectTimeout {
        /// The address dialed.
        address: String,
        /// The limit.
        timeout: Duration,
    },
    /// Connecting and pinging took longer than allowed.
    #[error("timed out after {timeout:?} pinging {address}")]
    PingTimeout {
        /// The address pinged.
        address: String,
        /// The limit.
        timeout: Duration,
    },
    /// A control-API call failed; the daemon's status message is kept.
    #[error("{method} failed: {}", status.message())]
    Rpc {
        /// The method called (`ListWorkers`, ...).
        method: &'static str,
        /// The gRPC status as received.
        status: tonic::Status,
    },
    /// The daemon rejected or failed the build; the message is the daemon's.
    #[error("failed to solve: {}", status.message())]
    Solve {
        /// The gRPC status as received (code, message, details).
        status: tonic::Status,
    },
    /// The session tunnel could not be opened.
    #[error("failed to start the session")]
    Session {
        /// The session error.
        #[source]
        source: kiln_session::Error,
    },
}

impl Error {
    /// The source lines the daemon's error points at (BuildKit's `errdefs.Source` details),
    /// to print above the error as buildctl does.
    pub fn source_excerpts(&self) -> Vec<kiln_llb::errdefs::Excerpt> {
        self.status()
            .map(|status| kiln_llb::errdefs::excerpts_in_status_details(status.details()))
            .unwrap_or_default()
    }

    /// The daemon's gRPC status, when the error came from an RPC.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Rpc { status, .. } | Error::Solve { status } => Some(status),
            _ => None,
        }
    }
}

/// Renders an error with its `source()` chain, `: `-separated (the form
/// the CLI and the discovery messages use).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some transports repeat their cause in their own message.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
