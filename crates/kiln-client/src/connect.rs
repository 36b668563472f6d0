//! Dialing a BuildKit-compatible daemon and pinging it.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::types::WorkerRecord;
use kiln_proto::moby::buildkit::v1::ListWorkersRequest;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Error;

/// Largest gRPC message kiln sends or accepts, in both directions (BuildKit's limit, §5.1).
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// A parsed daemon address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `unix://<path>`: h2c over a unix socket.
    Unix(PathBuf),
    /// `tcp://host:port`: plaintext h2c (kiln does not speak TLS yet).
    Tcp(String),
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
                let endpoint = Endpoint::from_shared(format!("http://{host_port}"))
                    .map_err(|source| Error::Connect {
                        address: address.to_string(),
                        source,
                    })?
                    .connect_timeout(timeout);
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
