//! Session content stores: containerd's `containerd.services.content.v1.Content` API served by
//! the client over the session and selected by the gRPC metadata `buildkit-attachable-store-id`
//! (reference §5.6). BuildKit's `oci`/`docker` exporters with `tar=false` write the image into
//! the store `export` this way.
//!
//! [`SessionContentStore`] is the daemon end. It speaks the protocol a containerd content
//! client speaks, so it works against any client serving the API (buildctl with a local OCI
//! layout, kiln landing into containerd): [`SessionContentStore::info`] asks whether a blob is
//! present, [`SessionContentStore::write`] opens an ingest with a `STAT`, streams `WRITE`s (a
//! few ahead of their responses; the server answers each in order) and a `COMMIT`, and takes
//! `AlreadyExists` at any point as "the store has it".

use kiln_proto::containerd::services::content::v1::content_client::ContentClient;
use kiln_proto::containerd::services::content::v1::{
    InfoRequest, WriteAction, WriteContentRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{metadata, Error, MAX_MESSAGE_SIZE};

/// gRPC metadata naming the content store a call is for.
pub const HEADER_STORE_ID: &str = "buildkit-attachable-store-id";

/// The store id the `oci`/`docker` exporters write to with `tar=false`.
pub const EXPORT_STORE: &str = "export";

/// The methods of the `Content` service, as advertised in the session headers.
pub const METHODS: [&str; 9] = [
    "/containerd.services.content.v1.Content/Info",
    "/containerd.services.content.v1.Content/Update",
    "/containerd.services.content.v1.Content/List",
    "/containerd.services.content.v1.Content/Delete",
    "/containerd.services.content.v1.Content/Read",
    "/containerd.services.content.v1.Content/Status",
    "/containerd.services.content.v1.Content/ListStatuses",
    "/containerd.services.content.v1.Content/Write",
    "/containerd.services.content.v1.Content/Abort",
];

/// Bytes per `WRITE` message (well under the session's 16 MiB message limit; large enough that
/// the round trips through the tunnel do not dominate).
pub const WRITE_CHUNK: usize = 4 << 20;

/// `WRITE` requests sent ahead of their responses (a containerd server answers each in order).
const WRITES_IN_FLIGHT: usize = 4;

const INFO: &str = "/containerd.services.content.v1.Content/Info";
const WRITE: &str = "/containerd.services.content.v1.Content/Write";

/// What [`SessionContentStore::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The blob was sent and committed: this many bytes crossed.
    Written(u64),
    /// The store already had the blob (it answered `AlreadyExists`); nothing more was sent.
    AlreadyExists,
}

/// The daemon's handle on one content store of a client session.
#[derive(Debug, Clone)]
pub struct SessionContentStore {
    client: ContentClient<Channel>,
    store_id: String,
}

impl SessionContentStore {
    /// The store `store_id` (e.g. [`EXPORT_STORE`]) of the session behind `channel`.
    pub fn new(channel: Channel, store_id: impl Into<String>) -> Self {
        let client = ContentClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        SessionContentStore {
            client,
            store_id: store_id.into(),
        }
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Error> {
        let mut request = tonic::Request::new(message);
        metadata::insert_value(request.metadata_mut(), HEADER_STORE_ID, &self.store_id)?;
        Ok(request)
    }

    /// The size of blob `digest` when the store has it, `None` when it answers `NotFound`.
    pub async fn info(&self, digest: &str) -> Result<Option<i64>, Error> {
        let request = self.request(InfoRequest {
            digest: digest.to_string(),
        })?;
        match self.client.clone().info(request).await {
            Ok(response) => Ok(Some(response.into_inner().info.map_or(0, |info| info.size))),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(Error::Rpc {
                method: INFO,
                status,
            }),
        }
    }

    /// Writes blob `digest` of `size` bytes, read from `reader`, under ingest ref `reference`.
    /// The store verifies size and digest on commit.
    pub async fn write(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        mut reader: impl AsyncRead + Unpin + Send,
    ) -> Result<WriteOutcome, Error> {
        let total = i64::try_from(size).unwrap_or(i64::MAX);
        let rpc = |status: tonic::Status| Error::Rpc {
            method: WRITE,
            status,
        };
        let (requests, receiver) = mpsc::channel::<WriteContentRequest>(2);
        // Queued before the call: a containerd server sends its headers only after the first
        // request arrived.
        requests
            .send(WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: reference.to_string(),
                total,
                expected: digest.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|_| Error::StreamEnded {
                context: "while opening a content write",
            })?;
        let request = self.request(ReceiverStream::new(receiver))?;
        let mut responses = match self.client.clone().write(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == tonic::Code::AlreadyExists => {
                return Ok(WriteOutcome::AlreadyExists)
            }
            Err(status) => return Err(rpc(status)),
        };
        // One response per request; AlreadyExists at any step means someone committed it.
        macro_rules! round_trip {
            () => {
                match responses.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        return Err(Error::StreamEnded {
                            context: "during a content write",
                        })
                    }
                    Err(status) if status.code() == tonic::Code::AlreadyExists => {
                        return Ok(WriteOutcome::AlreadyExists)
                    }
                    Err(status) => return Err(rpc(status)),
                }
            };
        }
        let stat = round_trip!();
        if stat.offset != 0 {
            // Only fresh refs are used, so a partial ingest is not ours to resume.
            tracing::debug!(
                reference,
                offset = stat.offset,
                "content store has a partial ingest; restarting it"
            );
        }
        let mut offset = 0i64;
        // Up to WRITES_IN_FLIGHT writes are sent before their responses are read, so the
        // tunnel's round trips overlap with reading the blob.
        let mut in_flight = 0usize;
        let mut buffer = vec![0u8; WRITE_CHUNK];
        loop {
            let mut filled = 0;
            while filled < buffer.len() {
                let n = reader
                    .read(&mut buffer[filled..])
                    .await
                    .map_err(|source| Error::ReadExport { source })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            requests
                .send(WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: reference.to_string(),
                    offset,
                    data: buffer[..filled].to_vec(),
                    ..Default::default()
                })
                .await
                .map_err(|_| Error::StreamEnded {
                    context: "during a content write",
                })?;
            in_flight += 1;
            if in_flight >= WRITES_IN_FLIGHT {
                round_trip!();
                in_flight -= 1;
            }
            offset += filled as i64;
        }
        while in_flight > 0 {
            round_trip!();
            in_flight -= 1;
        }
        requests
            .send(WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference.to_string(),
                total,
                offset,
                expected: digest.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|_| Error::StreamEnded {
                context: "during a content commit",
            })?;
        round_trip!();
        drop(requests);
        // Drain to the end of the response stream so the call completes cleanly.
        while let Ok(Some(_)) = responses.message().await {}
        Ok(WriteOutcome::Written(u64::try_from(offset).unwrap_or(0)))
    }
}
