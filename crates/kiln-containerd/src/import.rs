//! Importing an OCI-layout tar (what BuildKit's `docker` and `oci` exporters write) into
//! containerd's content store and image store.
//!
//! The tar is read once, front to back, on a blocking thread; each `blobs/sha256/<hex>` entry is
//! streamed into `Content.Write` as it comes (or skipped when containerd already has it), so
//! layers are never held in memory. Everything happens under a lease so containerd's garbage
//! collector keeps the blobs until the image records reference them through the gc labels set
//! at the end.

use std::collections::HashMap;
use std::io::Read;

use containerd_client::services::v1::{WriteAction, WriteContentRequest, WriteContentResponse};
use containerd_client::tonic::{Code, Streaming};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::client::{random_suffix, Containerd};
use crate::error::{rpc, Error, Result};
use crate::oci::{
    media_types, sha256_hex, Descriptor, ImageIndex, ImageManifest, Platform, ANNOTATION_IMAGE_NAME,
};

/// Size of the chunks read from the archive and sent in one `Content.Write` message.
const CHUNK_SIZE: usize = 1 << 20;
/// Blobs up to this size are also kept in memory while importing: manifests, indexes and
/// configs are walked afterwards without reading them back from containerd.
const KEEP_IN_MEMORY: u64 = 4 << 20;
/// Largest `index.json` / `manifest.json` accepted.
const MAX_JSON_FILE: u64 = 16 << 20;
/// Deepest index nesting walked.
const MAX_DEPTH: usize = 8;

/// Options of [`Containerd::import_archive`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Normalized image name to give the (first) image; `None` to take names from the archive.
    pub name: Option<String>,
    /// Platform whose manifests are kept from an index (the others are not referenced by gc
    /// labels, like containerd's importer with a platform matcher).
    pub platform: Platform,
    /// Further platforms whose manifests are kept too (a multi-platform build lands every
    /// platform it built, as nerdctl's import with all `--platform` values); `platform` stays
    /// the one unpacked.
    pub more_platforms: Vec<Platform>,
    /// Prefix of the name given to an image that has no name: `<prefix>@<manifest digest>`.
    /// nerdctl's load path uses the snapshotter name (`overlayfs@sha256:…`), see reference §1.5.
    pub digest_ref_prefix: String,
}

impl ImportOptions {
    /// Options naming unnamed images `<snapshotter>@<digest>` as nerdctl's load path does.
    pub fn new(name: Option<String>, platform: Platform, snapshotter: &str) -> Self {
        ImportOptions {
            name,
            platform,
            more_platforms: Vec::new(),
            digest_ref_prefix: snapshotter.to_string(),
        }
    }

    /// Every platform kept: `platform` first, then `more_platforms`.
    pub fn platforms(&self) -> Vec<Platform> {
        std::iter::once(self.platform.clone())
            .chain(self.more_platforms.iter().cloned())
            .collect()
    }
}

/// An image record created (or updated) by an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// The image name in containerd.
    pub name: String,
    /// The image's target: its manifest or index.
    pub target: Descriptor,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// The image records created or updated, in `index.json` order.
    pub images: Vec<ImportedImage>,
    /// Blobs written to containerd's content store.
    pub blobs_written: usize,
    /// Blobs of the archive containerd already had (not sent).
    pub blobs_present: usize,
}

/// What the archive-reading thread sends.
enum ArchiveEvent {
    /// A blob entry begins.
    Blob { digest: String, size: u64 },
    /// Bytes of the current blob.
    Data(Vec<u8>),
    /// The current blob is complete.
    BlobEnd,
    /// A small top-level file (`index.json`, `manifest.json`, `oci-layout`).
    File { path: String, data: Vec<u8> },
}

impl Containerd {
    /// Imports an OCI-layout tar into `namespace`: writes every blob containerd does not have
    /// yet, sets the gc reference labels, then creates or updates one image record per
    /// `index.json` entry. See [`ImportOptions`] for naming. An archive without images (empty
    /// stream or empty `index.json`) fails with [`Error::NoImage`] (`no image was built`).
    pub async fn import_archive(
        &self,
        namespace: &str,
        archive: impl Read + Send + 'static,
        options: &ImportOptions,
    ) -> Result<Vec<ImportedImage>> {
        Ok(self
            .import_archive_with_report(namespace, archive, options)
            .await?
            .images)
    }

    /// [`Containerd::import_archive`], also telling how many blobs were written vs already present.
    pub async fn import_archive_with_report(
        &self,
        namespace: &str,
        archive: impl Read + Send + 'static,
        options: &ImportOptions,
    ) -> Result<ImportReport> {
        let lease = self.create_lease(namespace, "import").await?;
        let result = self
            .import_leased(namespace, &lease, archive, options)
            .await;
        // The image records (and their gc labels) now hold everything; the lease goes either way.
        if let Err(error) = self.delete_lease(namespace, &lease).await {
            warn!(%error, lease, "failed to delete import lease");
        }
        result
    }

    async fn import_leased(
        &self,
        namespace: &str,
        lease: &str,
        archive: impl Read + Send + 'static,
        options: &ImportOptions,
    ) -> Result<ImportReport> {
        let (sender, mut events) = mpsc::channel::<ArchiveEvent>(4);
        let reader = tokio::task::spawn_blocking(move || read_archive(archive, &sender));

        let mut small_blobs: HashMap<String, Vec<u8>> = HashMap::new();
        let mut files: HashMap<String, Vec<u8>> = HashMap::new();
        let mut blobs_written = 0;
        let mut blobs_present = 0;
        // The blob being received: its digest, its writer (None when skipped), kept bytes.
        let mut current: Option<(String, Option<BlobWriter>, Option<Vec<u8>>)> = None;

        let consume = async {
            while let Some(event) = events.recv().await {
                match event {
                    ArchiveEvent::Blob { digest, size } => {
                        let writer = if self.content_info(namespace, &digest).await?.is_some() {
                            self.lease_content(namespace, lease, &digest).await?;
                            None
                        } else {
                            BlobWriter::open(self, namespace, lease, &digest, size).await?
                        };
                        if writer.is_none() {
                            blobs_present += 1;
                        }
                        let keep = (size <= KEEP_IN_MEMORY).then(Vec::new);
                        current = Some((digest, writer, keep));
                    }
                    ArchiveEvent::Data(data) => {
                        if let Some((_, writer, keep)) = current.as_mut() {
                            if let Some(keep) = keep.as_mut() {
                                keep.extend_from_slice(&data);
                            }
                            if let Some(active) = writer.as_mut() {
                                if !active.write(data).await? {
                                    // Someone else committed it meanwhile.
                                    *writer = None;
                                    blobs_present += 1;
                                }
                            }
                        }
                    }
                    ArchiveEvent::BlobEnd => {
                        if let Some((digest, writer, keep)) = current.take() {
                            if let Some(writer) = writer {
                                if writer.commit().await? {
                                    blobs_written += 1;
                                } else {
                                    blobs_present += 1;
                                }
                            }
                            if let Some(keep) = keep {
                                small_blobs.insert(digest, keep);
                            }
                        }
                    }
                    ArchiveEvent::File { path, data } => {
                        files.insert(path, data);
                    }
                }
            }
            Ok::<(), Error>(())
        };
        let consumed = consume.await;
        // Dropping the receiver (on error) stops the reader at its next send.
        drop(events);
        let entries = reader
            .await
            .map_err(|join| Error::ReadArchive {
                source: std::io::Error::other(join.to_string()),
            })
            .and_then(|read| read);
        consumed?;
        let entries = entries?;
        if entries == 0 {
            return Err(Error::NoImage);
        }
        debug!(blobs_written, blobs_present, "archive blobs landed");

        let index_json = files.get("index.json").ok_or(Error::MissingIndex)?;
        let index: ImageIndex =
            serde_json::from_slice(index_json).map_err(|source| Error::Json {
                what: "index",
                digest: "index.json".to_string(),
                source,
            })?;
        if index.manifests.is_empty() {
            return Err(Error::NoImage);
        }

        let blobs = BlobSource {
            containerd: self,
            namespace,
            small_blobs: &small_blobs,
        };
        let mut images = Vec::new();
        for (position, entry) in index.manifests.iter().enumerate() {
            set_gc_labels(&blobs, entry, &options.platforms(), 0).await?;
            let name = image_name(entry, position, options);
            let target = Descriptor {
                platform: None,
                ..entry.clone()
            };
            self.put_image(namespace, &name, &target).await?;
            info!(name, digest = %target.digest, "imported image");
            images.push(ImportedImage { name, target });
        }
        Ok(ImportReport {
            images,
            blobs_written,
            blobs_present,
        })
    }
}

/// The name of the `position`th `index.json` entry: `options.name` for the first entry, else the
/// entry's `io.containerd.image.name` annotation, else `<prefix>@<digest>`.
///
/// `org.opencontainers.image.ref.name` is not used: BuildKit and skopeo put a bare tag there.
fn image_name(entry: &Descriptor, position: usize, options: &ImportOptions) -> String {
    if position == 0 {
        if let Some(name) = &options.name {
            return name.clone();
        }
    }
    if let Some(name) = entry.annotations.get(ANNOTATION_IMAGE_NAME) {
        if !name.is_empty() {
            return name.clone();
        }
    }
    format!("{}@{}", options.digest_ref_prefix, entry.digest)
}

/// Where walked blobs are read from: the archive's small blobs, else containerd.
pub(crate) struct BlobSource<'a> {
    pub(crate) containerd: &'a Containerd,
    pub(crate) namespace: &'a str,
    pub(crate) small_blobs: &'a HashMap<String, Vec<u8>>,
}

impl BlobSource<'_> {
    async fn read(&self, digest: &str) -> Result<Vec<u8>> {
        match self.small_blobs.get(digest) {
            Some(data) => Ok(data.clone()),
            None => self.containerd.read_blob(self.namespace, digest).await,
        }
    }

    async fn ensure_present(&self, digest: &str) -> Result<()> {
        if self.small_blobs.contains_key(digest)
            || self
                .containerd
                .content_info(self.namespace, digest)
                .await?
                .is_some()
        {
            Ok(())
        } else {
            Err(Error::MissingBlob {
                digest: digest.to_string(),
            })
        }
    }
}

/// Sets the labels containerd's garbage collector follows, from `descriptor` down:
/// `containerd.io/gc.ref.content.m.<i>` on indexes (children of `platform` and children without
/// a platform), `containerd.io/gc.ref.content.config` and `.l.<i>` on manifests.
/// The manifests of `index` an image keeps: those of the wanted platforms (or without one),
/// and the attestation manifests (BuildKit's `vnd.docker.reference.type=attestation-manifest`,
/// platform `unknown/unknown`) of the kept ones, so that provenance stays with the image.
fn kept_children<'a>(index: &'a ImageIndex, platforms: &[Platform]) -> Vec<&'a Descriptor> {
    let wanted = |child: &Descriptor| {
        child
            .platform
            .as_ref()
            .is_none_or(|p| platforms.iter().any(|wanted| wanted.matches(p)))
    };
    let attests_kept = |child: &Descriptor| {
        child
            .annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
            && child
                .annotations
                .get("vnd.docker.reference.digest")
                .is_some_and(|subject| {
                    index
                        .manifests
                        .iter()
                        .any(|m| &m.digest == subject && wanted(m))
                })
    };
    index
        .manifests
        .iter()
        .filter(|child| wanted(child) || attests_kept(child))
        .collect()
}

pub(crate) async fn set_gc_labels(
    blobs: &BlobSource<'_>,
    descriptor: &Descriptor,
    platforms: &[Platform],
    depth: usize,
) -> Result<()> {
    sha256_hex(&descriptor.digest).ok_or_else(|| Error::InvalidDigest {
        digest: descriptor.digest.clone(),
    })?;
    let media_type = descriptor.media_type.as_str();
    if media_types::is_index(media_type) && depth < MAX_DEPTH {
        let data = blobs.read(&descriptor.digest).await?;
        let index: ImageIndex = serde_json::from_slice(&data).map_err(|source| Error::Json {
            what: "index",
            digest: descriptor.digest.clone(),
            source,
        })?;
        let children = kept_children(&index, platforms);
        let labels: Vec<(String, String)> = children
            .iter()
            .enumerate()
            .map(|(i, child)| {
                (
                    format!("containerd.io/gc.ref.content.m.{i}"),
                    child.digest.clone(),
                )
            })
            .collect();
        for child in children {
            Box::pin(set_gc_labels(blobs, child, platforms, depth + 1)).await?;
        }
        blobs
            .containerd
            .set_content_labels(blobs.namespace, &descriptor.digest, &labels)
            .await?;
    } else if media_types::is_manifest(media_type) {
        let data = blobs.read(&descriptor.digest).await?;
        let manifest: ImageManifest =
            serde_json::from_slice(&data).map_err(|source| Error::Json {
                what: "manifest",
                digest: descriptor.digest.clone(),
                source,
            })?;
        blobs.ensure_present(&manifest.config.digest).await?;
        let mut labels = vec![(
            "containerd.io/gc.ref.content.config".to_string(),
            manifest.config.digest.clone(),
        )];
        for (i, layer) in manifest.layers.iter().enumerate() {
            blobs.ensure_present(&layer.digest).await?;
            labels.push((
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            ));
        }
        blobs
            .containerd
            .set_content_labels(blobs.namespace, &descriptor.digest, &labels)
            .await?;
    }
    Ok(())
}

/// One `Content.Write` stream, driven in lockstep (one response per request).
struct BlobWriter {
    requests: mpsc::Sender<WriteContentRequest>,
    responses: Streaming<WriteContentResponse>,
    reference: String,
    digest: String,
    size: i64,
    offset: i64,
}

impl BlobWriter {
    /// Opens an ingest for `digest`; `None` when containerd reports the blob already exists.
    async fn open(
        containerd: &Containerd,
        namespace: &str,
        lease: &str,
        digest: &str,
        size: u64,
    ) -> Result<Option<BlobWriter>> {
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        // A unique ref: a stale ingest of an earlier, crashed import is never locked against us.
        let reference = format!("kiln-import-{}-{}", random_suffix(), digest);
        let (requests, receiver) = mpsc::channel(2);
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: reference.clone(),
            total: size,
            expected: digest.to_string(),
            ..Default::default()
        };
        // Queue the first message before the call: the server answers headers only once it has one.
        requests
            .send(stat)
            .await
            .map_err(|_| closed_stream(&reference))?;
        let request = containerd.request(namespace, Some(lease), ReceiverStream::new(receiver))?;
        let responses = match containerd.raw().content().write(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::AlreadyExists => return Ok(None),
            Err(status) => return Err(rpc("content.Write", digest)(status)),
        };
        let mut writer = BlobWriter {
            requests,
            responses,
            reference,
            digest: digest.to_string(),
            size,
            offset: 0,
        };
        match writer.round_trip(None).await? {
            true => Ok(Some(writer)),
            false => Ok(None),
        }
    }

    /// Writes `data` at the current offset; `false` when the blob turned out to exist already.
    async fn write(&mut self, data: Vec<u8>) -> Result<bool> {
        let length = i64::try_from(data.len()).unwrap_or(i64::MAX);
        let request = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: self.reference.clone(),
            total: self.size,
            expected: self.digest.clone(),
            offset: self.offset,
            data,
            ..Default::default()
        };
        let written = self.round_trip(Some(request)).await?;
        self.offset += length;
        Ok(written)
    }

    /// Commits the blob (containerd verifies size and digest); `false` when it already existed.
    async fn commit(mut self) -> Result<bool> {
        let request = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: self.reference.clone(),
            total: self.size,
            expected: self.digest.clone(),
            offset: self.offset,
            ..Default::default()
        };
        let committed = self.round_trip(Some(request)).await?;
        drop(self.requests);
        Ok(committed)
    }

    /// Sends `request` (when given) and waits for its response. `false` on `AlreadyExists`.
    async fn round_trip(&mut self, request: Option<WriteContentRequest>) -> Result<bool> {
        if let Some(request) = request {
            if self.requests.send(request).await.is_err() {
                // The server ended the stream: its status says why.
                return self.finish_with_status().await;
            }
        }
        match self.responses.message().await {
            Ok(Some(_)) => Ok(true),
            Ok(None) => Err(closed_stream(&self.digest)),
            Err(status) if status.code() == Code::AlreadyExists => Ok(false),
            Err(status) => Err(rpc("content.Write", self.digest.clone())(status)),
        }
    }

    async fn finish_with_status(&mut self) -> Result<bool> {
        loop {
            match self.responses.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Err(closed_stream(&self.digest)),
                Err(status) if status.code() == Code::AlreadyExists => return Ok(false),
                Err(status) => return Err(rpc("content.Write", self.digest.clone())(status)),
            }
        }
    }
}

fn closed_stream(target: &str) -> Error {
    Error::Rpc {
        call: "content.Write",
        target: target.to_string(),
        source: tonic::Status::new(Code::Aborted, "write stream closed early"),
    }
}

/// Reads the tar on a blocking thread and sends its entries; returns the number of entries.
fn read_archive(archive: impl Read, events: &mpsc::Sender<ArchiveEvent>) -> Result<usize> {
    let read_error = |source| Error::ReadArchive { source };
    let mut tar = tar::Archive::new(archive);
    let mut count = 0;
    for entry in tar.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        count += 1;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(read_error)?
            .to_string_lossy()
            .into_owned();
        let path = path.trim_start_matches("./").to_string();
        let size = entry.size();
        let sent = if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let digest = format!("sha256:{hex}");
            if sha256_hex(&digest).is_none() {
                warn!(path, "skipping archive entry that is not a sha256 blob");
                continue;
            }
            send_blob(&mut entry, digest, size, events)?
        } else if matches!(path.as_str(), "index.json" | "manifest.json" | "oci-layout")
            && size <= MAX_JSON_FILE
        {
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            entry.read_to_end(&mut data).map_err(read_error)?;
            events
                .blocking_send(ArchiveEvent::File { path, data })
                .is_ok()
        } else {
            debug!(path, "ignoring archive entry");
            true
        };
        if !sent {
            // The importer gave up (its error is reported); stop reading.
            break;
        }
    }
    Ok(count)
}

/// Sends one blob entry in chunks; `false` when the receiver is gone.
fn send_blob(
    entry: &mut impl Read,
    digest: String,
    size: u64,
    events: &mpsc::Sender<ArchiveEvent>,
) -> Result<bool> {
    if events
        .blocking_send(ArchiveEvent::Blob { digest, size })
        .is_err()
    {
        return Ok(false);
    }
    loop {
        let mut chunk = vec![0u8; CHUNK_SIZE];
        let mut filled = 0;
        while filled < CHUNK_SIZE {
            let read = entry
                .read(&mut chunk[filled..])
                .map_err(|source| Error::ReadArchive { source })?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled == 0 {
            break;
        }
        chunk.truncate(filled);
        if events.blocking_send(ArchiveEvent::Data(chunk)).is_err() {
            return Ok(false);
        }
        if filled < CHUNK_SIZE {
            break;
        }
    }
    Ok(events.blocking_send(ArchiveEvent::BlobEnd).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: media_types::OCI_MANIFEST.to_string(),
            digest: format!("sha256:{}", "1".repeat(64)),
            size: 10,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            platform: None,
        }
    }

    #[test]
    fn attestation_manifests_follow_the_platforms_they_attest() {
        let manifest = |digest: char, platform: &str, annotations: &[(&str, &str)]| {
            let mut descriptor = entry(annotations);
            descriptor.digest = format!("sha256:{}", digest.to_string().repeat(64));
            let (os, arch) = platform.split_once('/').unwrap();
            descriptor.platform = Some(Platform::new(os, arch, None));
            descriptor
        };
        let amd = manifest('a', "linux/amd64", &[]);
        let arm = manifest('b', "linux/arm64", &[]);
        let attests = |subject: &Descriptor, digest| {
            manifest(
                digest,
                "unknown/unknown",
                &[
                    ("vnd.docker.reference.type", "attestation-manifest"),
                    ("vnd.docker.reference.digest", &subject.digest),
                ],
            )
        };
        let index = ImageIndex {
            media_type: Some(media_types::OCI_INDEX.to_string()),
            manifests: vec![
                amd.clone(),
                arm.clone(),
                attests(&amd, 'c'),
                attests(&arm, 'd'),
            ],
        };
        let kept: Vec<&str> = kept_children(&index, &[Platform::new("linux", "amd64", None)])
            .iter()
            .map(|d| &d.digest[7..8])
            .collect();
        assert_eq!(kept, ["a", "c"]);
    }

    #[test]
    fn image_name_prefers_option_then_annotation_then_digest_ref() {
        let options = ImportOptions::new(
            Some("127.0.0.1:5000/x:latest".to_string()),
            Platform::host(),
            "overlayfs",
        );
        let named = entry(&[(ANNOTATION_IMAGE_NAME, "docker.io/library/y:1")]);
        assert_eq!(image_name(&named, 0, &options), "127.0.0.1:5000/x:latest");
        assert_eq!(image_name(&named, 1, &options), "docker.io/library/y:1");
        let unnamed = entry(&[("org.opencontainers.image.ref.name", "latest")]);
        assert_eq!(
            image_name(&unnamed, 1, &options),
            format!("overlayfs@sha256:{}", "1".repeat(64))
        );
    }

    #[test]
    fn archive_reader_sends_blobs_in_chunks_and_small_files() {
        let blob = vec![7u8; CHUNK_SIZE + 5];
        let hex = "2".repeat(64);
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, data).unwrap();
        };
        add("oci-layout", b"{}");
        add(&format!("blobs/sha256/{hex}"), &blob);
        add("blobs/sha256/not-a-digest", b"x");
        add("index.json", b"{\"manifests\":[]}");
        let data = builder.into_inner().unwrap();

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sender, mut receiver) = mpsc::channel(64);
        let count = std::thread::spawn(move || read_archive(&data[..], &sender).unwrap());
        let events: Vec<ArchiveEvent> = runtime.block_on(async {
            let mut events = Vec::new();
            while let Some(event) = receiver.recv().await {
                events.push(event);
            }
            events
        });
        assert_eq!(count.join().unwrap(), 4);
        let mut blob_bytes = 0;
        let mut files = Vec::new();
        let mut blob_ends = 0;
        for event in &events {
            match event {
                ArchiveEvent::Blob { digest, size } => {
                    assert_eq!(digest, &format!("sha256:{hex}"));
                    assert_eq!(*size, blob.len() as u64);
                }
                ArchiveEvent::Data(chunk) => blob_bytes += chunk.len(),
                ArchiveEvent::BlobEnd => blob_ends += 1,
                ArchiveEvent::File { path, .. } => files.push(path.clone()),
            }
        }
        assert_eq!(blob_bytes, blob.len());
        assert_eq!(blob_ends, 1);
        assert_eq!(
            files,
            vec!["oci-layout".to_string(), "index.json".to_string()]
        );
    }
}
