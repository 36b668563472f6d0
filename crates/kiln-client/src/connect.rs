//! Dialing a BuildKit-compatible daemon and pinging it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::types::WorkerRecord;
use kiln_proto::moby::buildkit::v1::ListWorkersRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::Error;

/// Largest gRPC message kiln sends or accepts, in both directions (BuildKit's limit, §5.1).
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// A parsed daemon address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `unix://<path>`: h2c over a unix socket.
    Unix(PathBuf),
    /// `tcp://host:port`: h2c, or HTTP/2 over TLS when [`ClientTls`] is set.
    Tcp(String),
}

/// buildctl's TLS flags (`--tlscacert`, `--tlscert`, `--tlskey`,
/// `--tlsservername`), used for `tcp://` addresses; unix sockets stay
/// plain. TLS is on as soon as one of them is given (as buildctl).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificate (PEM) the server's certificate must chain to; without
    /// it, the system bundle (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM), for daemons that require one (mutual TLS).
    pub cert: Option<PathBuf>,
    /// Key (PEM) of [`cert`](Self::cert).
    pub key: Option<PathBuf>,
    /// Name the server certificate must carry (default: the address' host).
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Whether any TLS flag was given.
    pub fn is_enabled(&self) -> bool {
        self.ca_cert.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.server_name.is_some()
    }

    fn config(&self, address: &str, host_port: &str) -> Result<ClientTlsConfig, Error> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| Error::TlsFile {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let ca = match &self.ca_cert {
            Some(path) => read("CA certificate", path)?,
            None => read("CA certificate", Path::new(SYSTEM_CA_BUNDLE))?,
        };
        let server_name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_of(host_port).to_string(),
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name(server_name);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(Error::TlsSettings {
                    address: address.to_string(),
                    reason: "--tlscert and --tlskey go together".to_string(),
                })
            }
        }
        Ok(config)
    }
}

/// The system's CA bundle (Debian's path), for TLS without `--tlscacert`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The host part of `host:port` (`[v6]:port` → `v6`).
fn host_of(host_port: &str) -> &str {
    if let Some(rest) = host_port.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host_port.rsplit_once(':') {
        Some((host, _)) => host,
        None => host_port,
    }
}

static CLIENT_TLS: OnceLock<ClientTls> = OnceLock::new();

/// Sets the TLS settings every later `tcp://` connection of this process
/// uses — buildctl's TLS flags are global flags too, and the CLI resolves
/// them once. Only the first call takes effect.
pub fn set_client_tls(tls: ClientTls) {
    let _ = CLIENT_TLS.set(tls);
}

impl Address {
    /// Parses `unix://<path>` or `tcp://host:port`; every other form is
    /// [`Error::UnsupportedScheme`].
    pub fn parse(address: &str) -> Result<Self, Error> {
        if let Some(path) = address.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(Error::InvalidAddress {
                    address: address.to_string(),
                    reason: "empty socket path",
                });
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(host_port) = address.strip_prefix("tcp://") {
            let host_port = host_port.trim_end_matches('/');
            if host_port.is_empty() || host_port.contains('/') {
                return Err(Error::InvalidAddress {
                    address: address.to_string(),
                    reason: "expected tcp://host:port",
                });
            }
            return Ok(Address::Tcp(host_port.to_string()));
        }
        Err(Error::UnsupportedScheme {
            address: address.to_string(),
        })
    }
}

/// Connects to the daemon at `address` (`unix://<path>` or `tcp://host:port`).
///
/// Connection setup (socket connect and HTTP/2 handshake) is bounded by
/// `timeout`; the returned client accepts and sends messages up to
/// [`MAX_MESSAGE_SIZE`].
pub async fn connect(address: &str, timeout: Duration) -> Result<ControlClient<Channel>, Error> {
    let channel = connect_channel(address, timeout).await?;
    Ok(ControlClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE))
}

/// The HTTP/2 channel to the daemon at `address`, for clients of other
/// services on the same socket (the gateway's `LLBBridge`).
pub async fn connect_channel(address: &str, timeout: Duration) -> Result<Channel, Error> {
    let parsed = Address::parse(address)?;
    let connecting = async {
        match parsed {
            Address::Unix(path) => {
                // The URI is only used for the `:authority` header; the connector ignores it.
                let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
                endpoint
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            }
            Address::Tcp(host_port) => {
                let tls = CLIENT_TLS.get().filter(|tls| tls.is_enabled());
                let scheme = if tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host_port}"))
                    .map_err(|source| Error::Connect {
                        address: address.to_string(),
                        source,
                    })?
                    .connect_timeout(timeout);
                if let Some(tls) = tls {
                    endpoint = endpoint
                        .tls_config(tls.config(address, &host_port)?)
                        .map_err(|e| Error::TlsSettings {
                            address: address.to_string(),
                            reason: crate::error_chain(&e),
                        })?;
                }
                endpoint.connect().await
            }
        }
        .map_err(|source| Error::Connect {
            address: address.to_string(),
            source,
        })
    };
    let channel = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| Error::ConnectTimeout {
            address: address.to_string(),
            timeout,
        })??;
    tracing::debug!(address, "connected to build daemon");
    Ok(channel)
}

/// Pings the daemon the way nerdctl does (`buildctl debug workers`): one
/// `Control.ListWorkers` call; success means the daemon is alive. Returns the
/// worker records.
pub async fn ping(client: &mut ControlClient<Channel>) -> Result<Vec<WorkerRecord>, Error> {
    let response = client
        .list_workers(ListWorkersRequest::default())
        .await
        .map_err(|status| Error::Rpc {
            method: "ListWorkers",
            status,
        })?;
    Ok(response.into_inner().record)
}

/// Connects to `address` and pings it; the whole exchange is bounded by
/// `timeout` (nerdctl's discovery uses 5 s per candidate).
pub async fn ping_address(address: &str, timeout: Duration) -> Result<Vec<WorkerRecord>, Error> {
    let exchange = async {
        let mut client = connect(address, timeout).await?;
        ping(&mut client).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::PingTimeout {
            address: address.to_string(),
            timeout,
        })?
        .map_err(|e| explain_tls_rejection(address, e))
}

/// With TLS 1.3 the server checks the client certificate after the
/// client's side of the handshake is done, so a refused certificate shows
/// up as the first call failing with a bare transport error ("connection
/// closed", or the alert when it arrives first). Says what that means.
fn explain_tls_rejection(address: &str, err: Error) -> Error {
    let Some(tls) = CLIENT_TLS.get().filter(|tls| tls.is_enabled()) else {
        return err;
    };
    if !matches!(Address::parse(address), Ok(Address::Tcp(_))) {
        return err;
    }
    let Error::Rpc { status, .. } = &err else {
        return err;
    };
    let Some(mut cause) = std::error::Error::source(status) else {
        return err;
    };
    while let Some(next) = cause.source() {
        cause = next;
    }
    let hint = match &tls.cert {
        None => "it requires a client certificate: pass --tlscert and --tlskey".to_string(),
        Some(cert) => format!(
            "it did not accept the client certificate {}: is it signed by the CA the daemon trusts (its --tlscacert)?",
            cert.display()
        ),
    };
    Error::TlsRejected {
        address: address.to_string(),
        detail: cause.to_string(),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!(
            Address::parse("unix:///run/buildkit/buildkitd.sock").unwrap(),
            Address::Unix(PathBuf::from("/run/buildkit/buildkitd.sock"))
        );
        assert_eq!(
            Address::parse("tcp://127.0.0.1:1234").unwrap(),
            Address::Tcp("127.0.0.1:1234".into())
        );
    }

    #[test]
    fn tls_server_name_defaults_to_the_host() {
        assert_eq!(host_of("127.0.0.1:1234"), "127.0.0.1");
        assert_eq!(host_of("[::1]:1234"), "::1");
        assert_eq!(host_of("builder.example"), "builder.example");
        assert!(!ClientTls::default().is_enabled());
        let half = ClientTls {
            cert: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(half.is_enabled());
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let half = ClientTls {
            ca_cert: Some(ca),
            ..half
        };
        let err = half.config("tcp://h:1", "h:1").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid TLS settings for tcp://h:1: --tlscert and --tlskey go together"
        );
        let missing = ClientTls {
            ca_cert: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let err = missing.config("tcp://h:1", "h:1").unwrap_err().to_string();
        assert!(
            err.starts_with("failed to read the TLS CA certificate "),
            "{err}"
        );
    }

    #[test]
    fn rejects_other_schemes() {
        for address in [
            "npipe:////./pipe/buildkitd",
            "ssh://host",
            "/run/buildkit/buildkitd.sock",
            "docker-container://x",
        ] {
            let err = Address::parse(address).unwrap_err();
            assert!(
                err.to_string().starts_with("unsupported address scheme"),
                "{address}: {err}"
            );
        }
        assert!(matches!(
            Address::parse("unix://"),
            Err(Error::InvalidAddress { .. })
        ));
    }

    #[tokio::test]
    async fn connect_to_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix://{}/nothing.sock", dir.path().display());
        let err = connect(&address, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        let chain = crate::error_chain(&err);
        assert!(chain.contains("No such file or directory"), "{chain}");
    }

    #[tokio::test]
    async fn unsupported_scheme_from_connect() {
        let err = connect("fd://3", Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.to_string(), "unsupported address scheme: \"fd://3\"");
    }
}
