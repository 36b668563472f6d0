//! The crate's error type.

/// Errors of landing images in containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The containerd socket does not exist.
    #[error("containerd socket {address} does not exist")]
    SocketMissing {
        /// The address given to `connect`.
        address: String,
    },
    /// The socket exists but the gRPC connection failed.
    #[error("failed to connect to containerd at {address}")]
    Connect {
        /// The address given to `connect`.
        address: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A namespace or lease id cannot be sent as a gRPC header.
    #[error("invalid containerd {header} header value {value:?}")]
    InvalidHeader {
        /// The header (`containerd-namespace`, `containerd-lease`).
        header: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A containerd call failed.
    #[error("containerd {call} of {target} failed")]
    Rpc {
        /// The service and method, e.g. `content.Write`.
        call: &'static str,
        /// What the call was about (a digest, image name, snapshot key).
        target: String,
        /// The gRPC status.
        #[source]
        source: tonic::Status,
    },
    /// Reading the image archive failed.
    #[error("failed to read image archive")]
    ReadArchive {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The archive is not an OCI layout (no `index.json`).
    #[error("image archive has no index.json")]
    MissingIndex,
    /// The archive holds no image (empty stream or empty `index.json`).
    #[error("no image was built")]
    NoImage,
    /// A JSON document (index, manifest, config) does not parse.
    #[error("failed to parse {what} {digest}")]
    Json {
        /// What the document is (`index`, `manifest`, `config`, `index.json`).
        what: &'static str,
        /// Its digest, or its path in the archive.
        digest: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A descriptor's digest is not `sha256:<64 lowercase hex>`.
    #[error("unsupported digest {digest}")]
    InvalidDigest {
        /// The digest.
        digest: String,
    },
    /// A blob the image needs is neither in the archive nor in containerd.
    #[error("blob {digest} is missing from the archive and from containerd")]
    MissingBlob {
        /// The blob's digest.
        digest: String,
    },
    /// The image (or an index on the way) has no manifest for the platform.
    #[error("image {image} has no manifest for platform {platform}")]
    NoMatchingPlatform {
        /// The image name.
        image: String,
        /// The platform asked for.
        platform: String,
    },
    /// The image target is neither an index nor a manifest.
    #[error("unsupported media type {media_type} of {digest}")]
    UnsupportedMediaType {
        /// The media type.
        media_type: String,
        /// The descriptor's digest.
        digest: String,
    },
    /// A manifest's layer count differs from its config's diff id count.
    #[error("manifest {manifest} has {layers} layers but its config lists {diff_ids} diff ids")]
    LayerCountMismatch {
        /// The manifest digest.
        manifest: String,
        /// Layers in the manifest.
        layers: usize,
        /// Diff ids in the config.
        diff_ids: usize,
    },
    /// Applying a layer gave another diff id than the config states.
    #[error("layer {layer} unpacked to diff id {actual}, but the config says {expected}")]
    DiffIdMismatch {
        /// The layer blob digest.
        layer: String,
        /// The diff id from the image config.
        expected: String,
        /// The diff id containerd computed.
        actual: String,
    },
    /// The image record does not exist.
    #[error("image {name} not found")]
    ImageNotFound {
        /// The image name.
        name: String,
    },
    /// The image record has no target descriptor.
    #[error("image {name} has no target")]
    ImageWithoutTarget {
        /// The image name.
        name: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Rpc`] for `call` on `target`.
pub(crate) fn rpc(
    call: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(tonic::Status) -> Error {
    let target = target.into();
    move |source| Error::Rpc {
        call,
        target,
        source,
    }
}
