//! `moby.filesync.v1.FileSend`: exporter output (tar, docker, oci archives)
//! streamed from the daemon to a file on the client.
//!
//! The daemon calls `FileSend.DiffCopy` with metadata
//! `buildkit-attachable-exporter-id: <index>` and `exporter-md-<k>: <v>`,
//! sends raw bytes in `BytesMessage` chunks of at most 3 MiB, half-closes and
//! waits for the client to end the stream ([`send`]). The client writes the
//! bytes into its configured output file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_proto::moby::filesync::v1::file_send_client::FileSendClient;
use kiln_proto::moby::filesync::v1::file_send_server::FileSend;
use kiln_proto::moby::filesync::v1::BytesMessage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{metadata, Error, MAX_MESSAGE_SIZE};

/// Largest chunk put in one `BytesMessage`.
pub const CHUNK_SIZE: usize = 3 << 20;

const METHOD: &str = "/moby.filesync.v1.FileSend/DiffCopy";

/// The metadata key naming the exporter a FileSend call carries output of.
const EXPORTER_ID: &str = "buildkit-attachable-exporter-id";

/// Streams everything `reader` yields to the session's FileSend target and
/// returns the number of bytes sent. A client answering `AlreadyExists`
/// ("target exists, skip") counts as success.
pub async fn send(
    channel: Channel,
    exporter_index: usize,
    metadata: &BTreeMap<String, String>,
    reader: impl AsyncRead + Unpin + Send,
) -> Result<u64, Error> {
    send_to(channel, &exporter_index.to_string(), metadata, reader).await
}

/// [`send`] with any exporter id: kiln sends cache exports as `cache-<n>`
/// so the client can route them to their own target
/// ([`SessionBuilder::file_send_target`](crate::client::SessionBuilder::file_send_target)).
pub async fn send_to(
    channel: Channel,
    exporter_id: &str,
    metadata: &BTreeMap<String, String>,
    mut reader: impl AsyncRead + Unpin + Send,
) -> Result<u64, Error> {
    let (tx, rx) = mpsc::channel::<BytesMessage>(2);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let md = request.metadata_mut();
    metadata::insert_value(md, EXPORTER_ID, exporter_id)?;
    for (key, value) in metadata {
        metadata::insert_value(md, &format!("exporter-md-{key}"), value)?;
    }

    let producer = async move {
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let mut filled = 0;
            while filled < buf.len() {
                let n = reader
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|source| Error::ReadExport { source })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                // Dropping `tx` half-closes the request stream.
                return Ok(total);
            }
            buf.truncate(filled);
            tx.send(BytesMessage { data: buf })
                .await
                .map_err(|_| Error::StreamEnded {
                    context: "while sending exporter output",
                })?;
            total += filled as u64;
        }
    };

    let mut client = FileSendClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let consumer = async move {
        let rpc = |status| Error::Rpc {
            method: METHOD,
            status,
        };
        let mut inbound = client.diff_copy(request).await.map_err(rpc)?.into_inner();
        while inbound.message().await.map_err(rpc)?.is_some() {}
        Ok::<(), Error>(())
    };

    let (sent, finished) = tokio::join!(producer, consumer);
    match finished {
        Err(Error::Rpc { status, .. }) if status.code() == tonic::Code::AlreadyExists => {
            tracing::debug!("file send target exists, skipped");
            Ok(0)
        }
        // The call's own error explains a failed send better.
        Err(error) => Err(error),
        Ok(()) => sent,
    }
}

/// Counters the FileSend receiver updates.
pub(crate) trait ReceiveStats: Send + Sync {
    /// `bytes` more were written to the target.
    fn received(&self, bytes: u64);
}

/// The client end: writes received bytes into `targets[exporter id]`, else
/// into `target`.
pub(crate) struct FileSendService {
    pub(crate) target: Option<PathBuf>,
    pub(crate) targets: Arc<std::collections::HashMap<String, PathBuf>>,
    pub(crate) stats: Arc<dyn ReceiveStats>,
}

#[tonic::async_trait]
impl FileSend for FileSendService {
    type DiffCopyStream = ReceiverStream<Result<BytesMessage, tonic::Status>>;

    async fn diff_copy(
        &self,
        request: tonic::Request<tonic::Streaming<BytesMessage>>,
    ) -> Result<tonic::Response<Self::DiffCopyStream>, tonic::Status> {
        let routed = request
            .metadata()
            .get(EXPORTER_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|id| self.targets.get(id))
            .cloned();
        let target = routed
            .or_else(|| self.target.clone())
            .ok_or_else(|| Error::NoFileSendTarget.to_status())?;
        let mut file = tokio::fs::File::create(&target)
            .await
            .map_err(|source| Error::io("create", &target, source).to_status())?;
        let mut inbound = request.into_inner();
        let stats = self.stats.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let result = async {
                while let Some(message) = inbound.message().await.map_err(|status| Error::Rpc {
                    method: METHOD,
                    status,
                })? {
                    file.write_all(&message.data)
                        .await
                        .map_err(|source| Error::io("write", &target, source))?;
                    stats.received(message.data.len() as u64);
                }
                file.flush()
                    .await
                    .map_err(|source| Error::io("write", &target, source))?;
                file.sync_all()
                    .await
                    .map_err(|source| Error::io("sync", &target, source))
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(error = %crate::error_chain(&error), "file send receive failed");
                let _ = tx.send(Err(error.to_status())).await;
            }
            // Dropping `tx` ends the response: the daemon's signal that all
            // bytes are on disk.
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}
