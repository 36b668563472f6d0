//! The client's containerd as a session content store: what `kiln build` serves over the
//! session so that a daemon's `oci`/`docker` exporter with `tar=false` writes the image
//! straight into containerd, sending only the blobs containerd lacks (reference §5.6, §5.11).
//!
//! [`ExportStore`] serves `containerd.services.content.v1.Content` for the store id `export`
//! (gRPC metadata `buildkit-attachable-store-id`) and forwards each call to containerd in the
//! client's namespace: `Info` answers from containerd (so the daemon learns what is present),
//! `Write` streams into containerd under a lease, `Read`, `Status` and `Abort` go through.
//! `Update`, `List`, `ListStatuses` and `Delete` are refused: a daemon has no business
//! relabelling, listing or deleting the client's content. Both ends use the same wire types,
//! so messages are re-encoded between the session's generated types and containerd's.
//!
//! It counts what crossed ([`LandingStats`]). [`ExportStore::finish`] then sets the gc
//! reference labels, points the image records at the exported manifest and drops the lease.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use containerd_client::services::v1 as containerd_api;
use futures::{Stream, StreamExt};
use kiln_proto::containerd::services::content::v1 as session_api;
use kiln_proto::containerd::services::content::v1::content_server::{Content, ContentServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::client::Containerd;
use crate::error::Result;
use crate::import::{set_gc_labels, BlobSource, ImportedImage};
use crate::oci::{Descriptor, Platform};

/// gRPC metadata naming the session content store a call is for.
pub const STORE_ID_HEADER: &str = "buildkit-attachable-store-id";
/// The store id the `oci`/`docker` exporters write to with `tar=false`.
pub const EXPORT_STORE_ID: &str = "export";

/// What crossed the session into containerd, and what did not need to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LandingStats {
    /// Blobs written into containerd (committed).
    pub blobs_sent: u64,
    /// Content bytes received over the session (`Write` data).
    pub bytes_sent: u64,
    /// Blobs the daemon found present (`Info` hit or `AlreadyExists`) and did not send.
    pub blobs_skipped: u64,
    /// Total size of the skipped blobs.
    pub bytes_skipped: u64,
    /// Calls the daemon made on the store (0 means it never used it).
    pub calls: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent: HashMap<String, u64>,
    present: HashMap<String, u64>,
    bytes_received: u64,
    calls: u64,
}

#[derive(Debug)]
struct Inner {
    containerd: Containerd,
    namespace: String,
    lease: String,
    counters: Mutex<Counters>,
}

impl Inner {
    fn count(&self, update: impl FnOnce(&mut Counters)) {
        match self.counters.lock() {
            Ok(mut counters) => update(&mut counters),
            Err(poisoned) => update(&mut poisoned.into_inner()),
        }
    }

    /// A blob containerd already has: keep it under our lease until an image references it.
    async fn present(&self, digest: &str, size: u64) {
        if let Err(error) = self
            .containerd
            .lease_content(&self.namespace, &self.lease, digest)
            .await
        {
            warn!(%error, digest, "failed to add a present blob to the landing lease");
        }
        self.count(|c| {
            c.present.insert(digest.to_string(), size);
        });
    }

    fn request<T>(&self, message: T, leased: bool) -> std::result::Result<Request<T>, Status> {
        self.containerd
            .request(
                &self.namespace,
                leased.then_some(self.lease.as_str()),
                message,
            )
            .map_err(|error| Status::internal(error.to_string()))
    }
}

/// The client's containerd namespace served as the session content store `export`.
///
/// Cheap to clone; every clone shares the lease and the counters.
#[derive(Debug, Clone)]
pub struct ExportStore {
    inner: Arc<Inner>,
}

impl ExportStore {
    /// Takes a lease in `namespace` under which everything the daemon writes is kept until
    /// [`ExportStore::finish`] (or [`ExportStore::abandon`]).
    pub async fn open(containerd: &Containerd, namespace: &str) -> Result<ExportStore> {
        let lease = containerd.create_lease(namespace, "landing").await?;
        Ok(ExportStore {
            inner: Arc::new(Inner {
                containerd: containerd.clone(),
                namespace: namespace.to_string(),
                lease,
                counters: Mutex::new(Counters::default()),
            }),
        })
    }

    /// The gRPC service to serve over the session.
    pub fn service(&self) -> ContentServer<ExportStore> {
        ContentServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// What crossed so far.
    pub fn stats(&self) -> LandingStats {
        let mut stats = LandingStats::default();
        self.inner.count(|c| {
            stats.blobs_sent = c.sent.len() as u64;
            stats.bytes_sent = c.bytes_received;
            let skipped = c.present.iter().filter(|(d, _)| !c.sent.contains_key(*d));
            for (_, size) in skipped {
                stats.blobs_skipped += 1;
                stats.bytes_skipped += size;
            }
            stats.calls = c.calls;
        });
        stats
    }

    /// Whether containerd has blob `digest` (e.g. the manifest the exporter reported).
    pub async fn has_blob(&self, digest: &str) -> Result<bool> {
        Ok(self
            .inner
            .containerd
            .content_info(&self.inner.namespace, digest)
            .await?
            .is_some())
    }

    /// Sets the gc labels from `target` down (of an index, only the manifests for one of
    /// `platforms`), points every name in `names` at `target`, and drops the lease. The blobs must all be present.
    pub async fn finish(
        self,
        target: &Descriptor,
        names: &[String],
        platforms: &[Platform],
    ) -> Result<Vec<ImportedImage>> {
        let result = self.name(target, names, platforms).await;
        self.abandon().await;
        result
    }

    async fn name(
        &self,
        target: &Descriptor,
        names: &[String],
        platforms: &[Platform],
    ) -> Result<Vec<ImportedImage>> {
        let containerd = &self.inner.containerd;
        let namespace = self.inner.namespace.as_str();
        let small_blobs = HashMap::new();
        let blobs = BlobSource {
            containerd,
            namespace,
            small_blobs: &small_blobs,
        };
        set_gc_labels(&blobs, target, platforms, 0).await?;
        let target = Descriptor {
            platform: None,
            ..target.clone()
        };
        let mut images = Vec::new();
        for name in names {
            containerd.put_image(namespace, name, &target).await?;
            images.push(ImportedImage {
                name: name.clone(),
                target: target.clone(),
            });
        }
        Ok(images)
    }

    /// Drops the lease: what was written stays only if an image references it.
    pub async fn abandon(&self) {
        if let Err(error) = self
            .inner
            .containerd
            .delete_lease(&self.inner.namespace, &self.inner.lease)
            .await
        {
            warn!(%error, lease = self.inner.lease, "failed to delete the landing lease");
        }
    }

    fn check<T>(&self, request: &Request<T>) -> std::result::Result<(), Status> {
        self.inner.count(|c| c.calls += 1);
        let id = request
            .metadata()
            .get(STORE_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if id == EXPORT_STORE_ID {
            Ok(())
        } else {
            Err(Status::not_found(format!("content store {id:?} not found")))
        }
    }
}

/// Largest message accepted or sent (the session's limit).
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Re-encodes a message between two generated types of the same `.proto` message.
fn recode<A: prost::Message, B: prost::Message + Default>(
    message: &A,
) -> std::result::Result<B, Status> {
    B::decode(message.encode_to_vec().as_slice()).map_err(|error| {
        Status::internal(format!("failed to re-encode a content message: {error}"))
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Content for ExportStore {
    async fn info(
        &self,
        request: Request<session_api::InfoRequest>,
    ) -> std::result::Result<Response<session_api::InfoResponse>, Status> {
        self.check(&request)?;
        let digest = request.into_inner().digest;
        let info = self
            .inner
            .containerd
            .content_info(&self.inner.namespace, &digest)
            .await
            .map_err(|error| Status::unavailable(error.to_string()))?;
        match info {
            Some(info) => {
                self.inner
                    .present(&digest, u64::try_from(info.size).unwrap_or(0))
                    .await;
                Ok(Response::new(session_api::InfoResponse {
                    info: Some(recode(&info)?),
                }))
            }
            None => Err(Status::not_found(format!(
                "content digest {digest}: not found"
            ))),
        }
    }

    async fn update(
        &self,
        request: Request<session_api::UpdateRequest>,
    ) -> std::result::Result<Response<session_api::UpdateResponse>, Status> {
        self.check(&request)?;
        Err(Status::permission_denied(
            "the export content store does not let the daemon relabel the client's content",
        ))
    }

    type ListStream = BoxStream<session_api::ListContentResponse>;

    async fn list(
        &self,
        request: Request<session_api::ListContentRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        self.check(&request)?;
        Err(Status::permission_denied(
            "the export content store does not list the client's content",
        ))
    }

    async fn delete(
        &self,
        request: Request<session_api::DeleteContentRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        self.check(&request)?;
        Err(Status::permission_denied(
            "the export content store does not let the daemon delete the client's content",
        ))
    }

    type ReadStream = BoxStream<session_api::ReadContentResponse>;

    async fn read(
        &self,
        request: Request<session_api::ReadContentRequest>,
    ) -> std::result::Result<Response<Self::ReadStream>, Status> {
        self.check(&request)?;
        let message: containerd_api::ReadContentRequest = recode(request.get_ref())?;
        let request = self.inner.request(message, false)?;
        let upstream = self
            .inner
            .containerd
            .raw()
            .content()
            .read(request)
            .await?
            .into_inner();
        let stream = upstream.map(|item| item.and_then(|m| recode(&m)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(
        &self,
        request: Request<session_api::StatusRequest>,
    ) -> std::result::Result<Response<session_api::StatusResponse>, Status> {
        self.check(&request)?;
        let message: containerd_api::StatusRequest = recode(request.get_ref())?;
        let request = self.inner.request(message, false)?;
        let response = self
            .inner
            .containerd
            .raw()
            .content()
            .status(request)
            .await?
            .into_inner();
        Ok(Response::new(recode(&response)?))
    }

    async fn list_statuses(
        &self,
        request: Request<session_api::ListStatusesRequest>,
    ) -> std::result::Result<Response<session_api::ListStatusesResponse>, Status> {
        self.check(&request)?;
        Err(Status::permission_denied(
            "the export content store does not list the client's ingests",
        ))
    }

    type WriteStream = BoxStream<session_api::WriteContentResponse>;

    async fn write(
        &self,
        request: Request<Streaming<session_api::WriteContentRequest>>,
    ) -> std::result::Result<Response<Self::WriteStream>, Status> {
        self.check(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty content write stream"))?;
        let expected = first.expected.clone();
        let total = u64::try_from(first.total).unwrap_or(0);
        let (sender, receiver) = mpsc::channel::<containerd_api::WriteContentRequest>(2);
        let inner = self.inner.clone();
        inner.count(|c| c.bytes_received += first.data.len() as u64);
        sender
            .send(recode(&first)?)
            .await
            .map_err(|_| Status::internal("content write forwarder ended"))?;
        let forward_inner = inner.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        forward_inner.count(|c| c.bytes_received += message.data.len() as u64);
                        let Ok(message) = recode(&message) else {
                            break;
                        };
                        if sender.send(message).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(%status, "content write stream from the daemon ended");
                        break;
                    }
                }
            }
            // Dropping `sender` half-closes containerd's request stream.
        });
        let request = inner.request(ReceiverStream::new(receiver), true)?;
        let upstream = match inner.containerd.raw().content().write(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                if status.code() == Code::AlreadyExists && !expected.is_empty() {
                    inner.present(&expected, total).await;
                }
                return Err(status);
            }
        };
        let stream = futures::stream::unfold(
            (upstream, inner, expected, total),
            |(mut upstream, inner, expected, total)| async move {
                let item = match upstream.message().await {
                    Ok(Some(response)) => {
                        if response.action == containerd_api::WriteAction::Commit as i32 {
                            let digest = if response.digest.is_empty() {
                                expected.clone()
                            } else {
                                response.digest.clone()
                            };
                            inner.count(|c| {
                                c.sent.insert(digest, total);
                            });
                        }
                        recode(&response)
                    }
                    Ok(None) => return None,
                    Err(status) => {
                        if status.code() == Code::AlreadyExists && !expected.is_empty() {
                            inner.present(&expected, total).await;
                        }
                        Err(status)
                    }
                };
                Some((item, (upstream, inner, expected, total)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(
        &self,
        request: Request<session_api::AbortRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        self.check(&request)?;
        let message: containerd_api::AbortRequest = recode(request.get_ref())?;
        let request = self.inner.request(message, false)?;
        self.inner.containerd.raw().content().abort(request).await?;
        Ok(Response::new(()))
    }
}

/// Human-readable byte count (`1.2 KiB`, `512.3 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl LandingStats {
    /// One line saying what crossed, e.g. `sent 1 blob (1.2 KiB), skipped 3 blobs (512.3 MiB)
    /// already in containerd`.
    pub fn summary(&self) -> String {
        let blobs = |n: u64| if n == 1 { "blob" } else { "blobs" };
        format!(
            "sent {} {} ({}), skipped {} {} ({}) already in containerd",
            self.blobs_sent,
            blobs(self.blobs_sent),
            human_bytes(self.bytes_sent),
            self.blobs_skipped,
            blobs(self.blobs_skipped),
            human_bytes(self.bytes_skipped),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_like_sentences() {
        let stats = LandingStats {
            blobs_sent: 1,
            bytes_sent: 1229,
            blobs_skipped: 3,
            bytes_skipped: 537_182_208,
            calls: 7,
        };
        assert_eq!(
            stats.summary(),
            "sent 1 blob (1.2 KiB), skipped 3 blobs (512.3 MiB) already in containerd"
        );
        assert_eq!(human_bytes(12), "12 B");
    }

    #[test]
    fn recoding_keeps_every_field() {
        let message = session_api::WriteContentRequest {
            action: session_api::WriteAction::Commit as i32,
            r#ref: "r".into(),
            total: 5,
            expected: "sha256:ab".into(),
            offset: 3,
            data: vec![1, 2],
            labels: [("k".to_string(), "v".to_string())].into(),
        };
        let upstream: containerd_api::WriteContentRequest = recode(&message).unwrap();
        assert_eq!(upstream.action, containerd_api::WriteAction::Commit as i32);
        assert_eq!(upstream.expected, "sha256:ab");
        assert_eq!(upstream.offset, 3);
        assert_eq!(upstream.labels.get("k").map(String::as_str), Some("v"));
        let back: session_api::WriteContentRequest = recode(&upstream).unwrap();
        assert_eq!(back, message);
    }
}
