//! `moby.filesync.v1.FileSend`: exporter output streamed from the daemon to
//! the client.
//!
//! The daemon calls `FileSend.DiffCopy` with metadata
//! `buildkit-attachable-exporter-id: <index>` and `exporter-md-<k>: <v>`.
//! The same method carries two payloads (§5.6):
//!
//! - tarballs (`tar`, `docker`, `oci`): raw bytes in `BytesMessage` chunks of
//!   at most 3 MiB, then half-close and wait for the client to end the
//!   stream ([`send`]); the client writes them into its output file;
//! - the `local` exporter: fsutil `Packet`s with the daemon as the DiffCopy
//!   **sender** ([`send_dir`]) and the client as the receiver, merging into
//!   its output directory with its own uid/gid.
//!
//! The generated FileSend server decodes `BytesMessage` only, so the client
//! end is served by [`FileSendServer`], which picks the message type from
//! its target (a file or a directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use kiln_proto::fsutil::types::Packet;
use kiln_proto::moby::filesync::v1::file_send_client::FileSendClient;
use kiln_proto::moby::filesync::v1::BytesMessage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::transport::Channel;

use crate::filesync::send::{self, SendStats, WalkFilter};
use crate::filesync::{Differ, ReceiveOptions, TransferStats};
use crate::{metadata, Error, MAX_MESSAGE_SIZE};

/// Largest chunk put in one `BytesMessage`.
pub const CHUNK_SIZE: usize = 3 << 20;

const METHOD: &str = "/moby.filesync.v1.FileSend/DiffCopy";

/// The metadata key naming the exporter a FileSend call carries output of.
const EXPORTER_ID: &str = "buildkit-attachable-exporter-id";

fn exporter_request<T>(
    message: T,
    exporter_id: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<tonic::Request<T>, Error> {
    let mut request = tonic::Request::new(message);
    let md = request.metadata_mut();
    metadata::insert_value(md, EXPORTER_ID, exporter_id)?;
    for (key, value) in metadata {
        metadata::insert_value(md, &format!("exporter-md-{key}"), value)?;
    }
    Ok(request)
}

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
    let request = exporter_request(ReceiverStream::new(rx), exporter_id, metadata)?;

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

/// What [`send_dir`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirSendStats {
    /// Entries listed (STAT packets).
    pub entries: u64,
    /// Files whose content the client asked for.
    pub files_sent: u64,
    /// File content bytes sent.
    pub bytes_sent: u64,
}

#[derive(Default)]
struct DirCounters {
    files: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl SendStats for DirCounters {
    fn file_sent(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.files.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// The `local` exporter's transfer: sends the directory `root` to the
/// session's FileSend target as an fsutil DiffCopy **sender** (the client
/// receives and merges it into its output directory). With `clamp_mtime`
/// (Unix seconds, `SOURCE_DATE_EPOCH`) later modification times are sent as
/// that time.
pub async fn send_dir(
    channel: Channel,
    exporter_index: usize,
    metadata: &BTreeMap<String, String>,
    root: &Path,
    clamp_mtime: Option<i64>,
) -> Result<DirSendStats, Error> {
    let trees = [DirTree {
        prefix: None,
        root: root.to_path_buf(),
    }];
    send_dirs(channel, exporter_index, metadata, &trees, clamp_mtime).await
}

/// One tree of a [`send_dirs`] transfer.
#[derive(Debug, Clone)]
pub struct DirTree {
    /// The directory the tree is sent under (`linux_amd64`), or `None` for the top.
    pub prefix: Option<String>,
    /// The tree on disk.
    pub root: PathBuf,
}

/// [`send_dir`] of several trees in one transfer: the `local` exporter of a multi-platform
/// result, one prefix directory per platform (`platform-split`), or the trees merged at the
/// top without prefixes (a path in several trees is sent from the last).
pub async fn send_dirs(
    channel: Channel,
    exporter_index: usize,
    metadata: &BTreeMap<String, String>,
    trees: &[DirTree],
    clamp_mtime: Option<i64>,
) -> Result<DirSendStats, Error> {
    let walk_trees = trees.to_vec();
    let first = trees.first().map(|t| t.root.clone()).unwrap_or_default();
    let mut entries = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let mut walked = Vec::with_capacity(walk_trees.len());
        for tree in walk_trees {
            let entries = send::walk(&tree.root, &WalkFilter::default())?;
            walked.push((tree.prefix, tree.root, entries));
        }
        send::combine(walked)
    })
    .await
    .map_err(|join| Error::io("walk", &first, std::io::Error::other(join)))??;
    if let Some(epoch) = clamp_mtime {
        let limit = epoch.saturating_mul(1_000_000_000);
        for entry in &mut entries {
            entry.stat.mod_time = entry.stat.mod_time.min(limit);
        }
    }
    let listed = entries.len() as u64;

    let (tx, rx) = mpsc::channel::<Result<Packet, tonic::Status>>(16);
    // The sender half writes `Result`s (as a server would); a client
    // request stream carries plain packets.
    let outbound = ReceiverStream::new(rx).filter_map(|p| futures::future::ready(p.ok()));
    let request = exporter_request(outbound, &exporter_index.to_string(), metadata)?;
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let rpc = |status| Error::Rpc {
        method: METHOD,
        status,
    };
    grpc.ready().await.map_err(Error::Connect)?;
    let codec = tonic_prost::ProstCodec::<Packet, Packet>::default();
    let mut inbound = grpc
        .streaming(request, http::uri::PathAndQuery::from_static(METHOD), codec)
        .await
        .map_err(rpc)?
        .into_inner();
    let counters = DirCounters::default();
    let served = send::serve(entries, &mut inbound, &tx, &counters, METHOD).await;
    if let Err(error) = served {
        let _ = tx
            .send(Ok(Packet {
                r#type: kiln_proto::fsutil::types::PacketType::PacketErr as i32,
                data: crate::error_chain(&error).into_bytes(),
                ..Packet::default()
            }))
            .await;
        return Err(error);
    }
    // Half-close, then wait for the client to end the call: everything is
    // on its disk.
    drop(tx);
    while inbound.message().await.map_err(rpc)?.is_some() {}
    use std::sync::atomic::Ordering::Relaxed;
    Ok(DirSendStats {
        entries: listed,
        files_sent: counters.files.load(Relaxed),
        bytes_sent: counters.bytes.load(Relaxed),
    })
}

/// Counters the FileSend receiver updates.
pub(crate) trait ReceiveStats: Send + Sync {
    /// `bytes` more were written to the target.
    fn received(&self, bytes: u64);
}

/// Where the client end puts what FileSend brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSendTarget {
    /// Tarball bytes into this file (created/truncated).
    File(PathBuf),
    /// fsutil packets merged into this directory (the `local` exporter).
    Dir(PathBuf),
}

/// The client end of FileSend: a hand-written server, because the message
/// type of `DiffCopy` depends on the target (`BytesMessage` into a file,
/// fsutil `Packet` into a directory).
///
/// A call whose exporter id is in `targets` goes there, others to `target`.
#[derive(Clone)]
pub(crate) struct FileSendServer {
    target: Option<FileSendTarget>,
    targets: Arc<std::collections::HashMap<String, FileSendTarget>>,
    stats: Arc<dyn ReceiveStats>,
}

impl FileSendServer {
    pub(crate) fn new(
        target: Option<FileSendTarget>,
        targets: std::collections::HashMap<String, FileSendTarget>,
        stats: Arc<dyn ReceiveStats>,
    ) -> Self {
        FileSendServer {
            target,
            targets: Arc::new(targets),
            stats,
        }
    }
}

impl tonic::server::NamedService for FileSendServer {
    const NAME: &'static str = "moby.filesync.v1.FileSend";
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

impl<B> tower::Service<http::Request<B>> for FileSendServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != METHOD {
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented("unknown FileSend method").into_http())
            });
        }
        let routed = request
            .headers()
            .get(EXPORTER_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(|id| self.targets.get(id))
            .cloned();
        let target = routed.or_else(|| self.target.clone());
        let stats = self.stats.clone();
        Box::pin(async move {
            let response = match target {
                Some(FileSendTarget::Dir(dir)) => {
                    let codec = tonic_prost::ProstCodec::<Packet, Packet>::default();
                    tonic::server::Grpc::new(codec)
                        .apply_max_message_size_config(
                            Some(MAX_MESSAGE_SIZE),
                            Some(MAX_MESSAGE_SIZE),
                        )
                        .streaming(DirReceiver { dir }, request)
                        .await
                }
                file => {
                    let codec = tonic_prost::ProstCodec::<BytesMessage, BytesMessage>::default();
                    let target = match file {
                        Some(FileSendTarget::File(path)) => Some(path),
                        _ => None,
                    };
                    tonic::server::Grpc::new(codec)
                        .apply_max_message_size_config(
                            Some(MAX_MESSAGE_SIZE),
                            Some(MAX_MESSAGE_SIZE),
                        )
                        .streaming(FileReceiver { target, stats }, request)
                        .await
                }
            };
            Ok(response)
        })
    }
}

/// `DiffCopy` of packets into a directory: the fsutil receiver in merge
/// mode, owner forced to this process's uid/gid.
struct DirReceiver {
    dir: PathBuf,
}

impl tonic::server::StreamingService<Packet> for DirReceiver {
    type Response = Packet;
    type ResponseStream = ResponseStream<Packet>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Packet>>) -> Self::Future {
        let options = ReceiveOptions {
            dest: self.dir.clone(),
            differ: Differ::Metadata,
            merge: true,
            owner: (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            ),
            method: METHOD,
        };
        Box::pin(async move {
            let inbound = request.into_inner();
            let (tx, rx) = mpsc::channel::<Packet>(64);
            tokio::spawn(async move {
                let dest = options.dest.clone();
                match crate::filesync::receive_packets(inbound, tx, options).await {
                    Ok(TransferStats {
                        files_requested,
                        bytes_received,
                    }) => tracing::debug!(
                        dest = %dest.display(),
                        files_requested,
                        bytes_received,
                        "local export received"
                    ),
                    Err(error) => tracing::warn!(
                        dest = %dest.display(),
                        error = %crate::error_chain(&error),
                        "local export receive failed"
                    ),
                }
            });
            let stream: ResponseStream<Packet> = Box::pin(ReceiverStream::new(rx).map(Ok));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// `DiffCopy` of raw bytes into a file.
struct FileReceiver {
    target: Option<PathBuf>,
    stats: Arc<dyn ReceiveStats>,
}

impl tonic::server::StreamingService<BytesMessage> for FileReceiver {
    type Response = BytesMessage;
    type ResponseStream = ResponseStream<BytesMessage>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<BytesMessage>>) -> Self::Future {
        let target = self.target.clone();
        let stats = self.stats.clone();
        Box::pin(async move {
            let target = target.ok_or_else(|| Error::NoFileSendTarget.to_status())?;
            let mut file = tokio::fs::File::create(&target)
                .await
                .map_err(|source| Error::io("create", &target, source).to_status())?;
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let result = async {
                    while let Some(message) =
                        inbound.message().await.map_err(|status| Error::Rpc {
                            method: METHOD,
                            status,
                        })?
                    {
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
            let stream: ResponseStream<BytesMessage> = Box::pin(ReceiverStream::new(rx));
            Ok(tonic::Response::new(stream))
        })
    }
}
