//! Image formats and storage shared by the daemon's worker, the exporters and the client.
//!
//! - [`Digest`] (`sha256:<hex>`) and [`DigestWriter`], the hashing `Write` wrapper every module reuses;
//! - [`oci`]: OCI/Docker JSON types ([`oci::Descriptor`], [`oci::ImageManifest`], [`oci::ImageIndex`],
//!   [`oci::ImageConfig`], [`oci::Platform`]) and [`oci::media_types`];
//! - [`reference`](mod@reference): docker-style image references with docker's normalisation;
//! - [`content`]: a content-addressed blob store with atomic, verified ingestion;
//! - [`registry`]: pulling manifests, configs and blobs from an OCI distribution registry;
//! - [`layer`] (Linux): applying layer tars onto a directory and diffing an overlayfs upper dir into a
//!   gzip layer;
//! - [`compression`]: layer compression (parallel deterministic gzip, zstd) and media types;
//! - [`convert`]: recompressing layers and clamping their file times, each conversion done once;
//! - [`archive`]: the docker/OCI tar that BuildKit's `type=docker` exporter writes.
//!
//! Each module has its own error type; [`Error`] gathers them for callers that mix modules.

pub mod archive;
pub mod compression;
pub mod content;
pub mod convert;
mod digest;
#[cfg(target_os = "linux")]
pub mod layer;
pub mod oci;
pub mod reference;
pub mod registry;

pub use digest::{Digest, DigestError, DigestWriter, Hasher};

/// Any error of this crate, for callers that use several modules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed digest.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// A malformed image reference.
    #[error(transparent)]
    Reference(#[from] reference::ParseError),
    /// A content store failure.
    #[error(transparent)]
    Content(#[from] content::Error),
    /// A registry failure.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// A layer apply or diff failure.
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Layer(#[from] layer::Error),
    /// An invalid compression setting.
    #[error(transparent)]
    Compression(#[from] compression::Error),
    /// A layer conversion failure.
    #[error(transparent)]
    Convert(#[from] convert::Error),
    /// An archive export failure.
    #[error(transparent)]
    Archive(#[from] archive::Error),
}
