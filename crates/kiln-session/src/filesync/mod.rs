//! `moby.filesync.v1.FileSync` over the session: the fsutil DiffCopy
//! protocol (§5.7).
//!
//! The client end is the **sender** (it serves `FileSync.DiffCopy` for the
//! directories it exposes, see [`crate::client::SessionBuilder::local_dir`]);
//! the daemon end is the **receiver** ([`receive`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_proto::fsutil::types::{Packet, PacketType};
use kiln_proto::moby::filesync::v1::file_sync_server::FileSync;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{metadata, Error};

mod receive;
pub(crate) mod send;

pub use receive::receive;
pub(crate) use receive::{receive_packets, ReceiveOptions};
pub(crate) use send::SendStats;

/// How the receiver decides which files to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Differ {
    /// Fetch files whose size, mtime or mode differ from the destination's
    /// (fsutil's default).
    #[default]
    Metadata,
    /// Fetch every regular file.
    None,
}

/// What to pull and where (`local` source attrs).
#[derive(Debug, Clone, Default)]
pub struct ReceiveRequest {
    /// Name the client exposes the directory under (`context`, `dockerfile`, ...).
    pub dir_name: String,
    /// Destination directory, made to match the client's.
    pub dest: PathBuf,
    /// Only these paths (and their parents) when non-empty.
    pub include_patterns: Vec<String>,
    /// `.dockerignore`-style exclusions.
    pub exclude_patterns: Vec<String>,
    /// Paths (followed through symlinks) to include.
    pub followpaths: Vec<String>,
    /// Which files to fetch.
    pub differ: Differ,
}

/// What one [`receive`] transferred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Files requested from the sender (REQ packets).
    pub files_requested: u64,
    /// File content bytes received.
    pub bytes_received: u64,
}

/// The sender side service served by the client end.
pub(crate) struct FileSyncService {
    pub(crate) dirs: Arc<HashMap<String, PathBuf>>,
    pub(crate) stats: Arc<dyn SendStats>,
}

type PacketStream = ReceiverStream<Result<Packet, tonic::Status>>;

#[tonic::async_trait]
impl FileSync for FileSyncService {
    type DiffCopyStream = PacketStream;

    async fn diff_copy(
        &self,
        request: tonic::Request<tonic::Streaming<Packet>>,
    ) -> Result<tonic::Response<Self::DiffCopyStream>, tonic::Status> {
        let md = request.metadata();
        let dir_name = metadata::read_values(md, "dir-name")
            .into_iter()
            .next()
            .unwrap_or_default();
        let root = self.dirs.get(&dir_name).cloned().ok_or_else(|| {
            Error::UnknownDir {
                name: dir_name.clone(),
            }
            .to_status()
        })?;
        let includes = metadata::read_values(md, "include-patterns");
        let excludes = metadata::read_values(md, "exclude-patterns");
        let followpaths = metadata::read_values(md, "followpaths");
        let entries = tokio::task::spawn_blocking(move || {
            let filter = send::WalkFilter::new(&root, &includes, &excludes, &followpaths)?;
            send::walk(&root, &filter)
        })
        .await
        .map_err(|join| tonic::Status::internal(format!("walk task failed: {join}")))?
        .map_err(|error| error.to_status())?;
        tracing::debug!(dir = %dir_name, entries = entries.len(), "sending local dir");

        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let method = "/moby.filesync.v1.FileSync/DiffCopy";
            if let Err(error) =
                send::serve(entries, &mut inbound, &tx, stats.as_ref(), method).await
            {
                tracing::warn!(dir = %dir_name, error = %crate::error_chain(&error), "filesync send failed");
                let _ = tx
                    .send(Ok(Packet {
                        r#type: PacketType::PacketErr as i32,
                        data: crate::error_chain(&error).into_bytes(),
                        ..Packet::default()
                    }))
                    .await;
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    type TarStreamStream = PacketStream;

    async fn tar_stream(
        &self,
        _request: tonic::Request<tonic::Streaming<Packet>>,
    ) -> Result<tonic::Response<Self::TarStreamStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "FileSync.TarStream is not supported",
        ))
    }
}
