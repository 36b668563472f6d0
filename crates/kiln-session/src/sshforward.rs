//! `moby.sshforward.v1.SSH`: SSH agent forwarding over the session.
//!
//! The client end forwards each `ForwardAgent` stream to the agent socket
//! configured for the id in the request metadata `buildkit.ssh.id` (default
//! `default`): one unix connection per stream, bytes piped both ways. The
//! daemon end ([`check_agent`], [`forward_agent`]) is used by the executor,
//! which accepts connections on a socket inside the build container and
//! forwards each one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kiln_proto::moby::sshforward::v1::ssh_client::SshClient;
use kiln_proto::moby::sshforward::v1::ssh_server::Ssh;
use kiln_proto::moby::sshforward::v1::{BytesMessage, CheckAgentRequest, CheckAgentResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{metadata, Error, MAX_MESSAGE_SIZE};

/// Full names of the methods, as advertised in the session headers.
pub const METHODS: [&str; 2] = [
    "/moby.sshforward.v1.SSH/CheckAgent",
    "/moby.sshforward.v1.SSH/ForwardAgent",
];

/// Request metadata naming the agent a `ForwardAgent` stream is for.
pub const KEY_SSH_ID: &str = "buildkit.ssh.id";

/// The agent id used when none is named.
pub const DEFAULT_ID: &str = "default";

const CHUNK: usize = 32 * 1024;

/// The client end: agent sockets by id.
#[derive(Debug, Clone, Default)]
pub(crate) struct SshService {
    pub(crate) agents: Arc<HashMap<String, PathBuf>>,
}

impl SshService {
    fn socket(&self, id: &str) -> Result<&PathBuf, tonic::Status> {
        let id = if id.is_empty() { DEFAULT_ID } else { id };
        self.agents
            .get(id)
            .ok_or_else(|| tonic::Status::not_found(format!("unset ssh forward key {id}")))
    }
}

#[tonic::async_trait]
impl Ssh for SshService {
    async fn check_agent(
        &self,
        request: tonic::Request<CheckAgentRequest>,
    ) -> Result<tonic::Response<CheckAgentResponse>, tonic::Status> {
        self.socket(&request.into_inner().id)?;
        Ok(tonic::Response::new(CheckAgentResponse {}))
    }

    type ForwardAgentStream = ReceiverStream<Result<BytesMessage, tonic::Status>>;

    async fn forward_agent(
        &self,
        request: tonic::Request<tonic::Streaming<BytesMessage>>,
    ) -> Result<tonic::Response<Self::ForwardAgentStream>, tonic::Status> {
        let id = metadata::first_value(request.metadata(), KEY_SSH_ID).unwrap_or_default();
        let socket = self.socket(&id)?.clone();
        let conn = UnixStream::connect(&socket).await.map_err(|e| {
            tonic::Status::unavailable(format!(
                "failed to connect to ssh agent {}: {e}",
                socket.display()
            ))
        })?;
        let (reader, writer) = conn.into_split();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        // Daemon → agent; the daemon's CloseSend closes our side of the agent
        // connection, which ends the agent → daemon direction too.
        tokio::spawn(async move {
            let mut writer = writer;
            while let Some(Ok(message)) = inbound.next().await {
                if writer.write_all(&message.data).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        tokio::spawn(async move {
            let mut reader = reader;
            let mut buf = vec![0u8; CHUNK];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let message = BytesMessage {
                            data: buf[..n].to_vec(),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// The daemon end: whether the client forwards agent `id`. `Ok(false)` when it
/// does not (`NotFound`, or a client without the SSH service).
pub async fn check_agent(channel: Channel, id: &str) -> Result<bool, Error> {
    let mut client = SshClient::new(channel);
    match client
        .check_agent(CheckAgentRequest { id: id.to_string() })
        .await
    {
        Ok(_) => Ok(true),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::Unimplemented
            ) =>
        {
            Ok(false)
        }
        Err(status) => Err(Error::Rpc {
            method: METHODS[0],
            status,
        }),
    }
}

/// The daemon end: forwards one agent connection `conn` (made inside the
/// build container) to the client's agent `id`, until either side closes.
pub async fn forward_agent<C>(channel: Channel, id: &str, conn: C) -> Result<(), Error>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(conn);
    let (tx, rx) = mpsc::channel::<BytesMessage>(8);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    metadata::insert_value(request.metadata_mut(), KEY_SSH_ID, id)?;
    let mut client = SshClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // Container → client. Dropping `tx` at EOF is the CloseSend.
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = BytesMessage {
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let rpc = |status| Error::Rpc {
        method: METHODS[1],
        status,
    };
    let result = async {
        let mut inbound = client
            .forward_agent(request)
            .await
            .map_err(rpc)?
            .into_inner();
        while let Some(message) = inbound.message().await.map_err(rpc)? {
            if writer.write_all(&message.data).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
        Ok(())
    }
    .await;
    upstream.abort();
    result
}
