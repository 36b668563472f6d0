//! Cache imported from outside the worker (`--cache-from`) and the per-vertex
//! records a solve hands back for exporting its cache (`--cache-to`).
//!
//! An imported cache maps cache keys to layer chains. When a vertex's key has
//! no local record but the imported cache has a result for it, the solver
//! materializes that result on the worker the way a pull does (one snapshot
//! per layer, layers whose chain the worker already holds are reused) instead
//! of running the step. Where the blobs come from (a registry, a directory
//! the client sent) is the importer's business: [`CacheImport::prepare`]
//! puts them where [`Worker::pull`](kiln_worker::Worker::pull) finds them.

use std::fmt;
use std::sync::Arc;

use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageConfig, ImageManifest, RootFs};
use kiln_image::reference::Reference;
use kiln_image::registry::ResolvedImage;
use kiln_image::Digest;
use kiln_worker::{Layer, SnapshotId, Worker};

use crate::{BoxError, CacheKey};

/// A result found in an imported cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedResult {
    /// The layer chain of the result, bottom → top.
    pub layers: Vec<Layer>,
    /// When the result was first made (seconds since the epoch).
    pub created: u64,
    /// Where [`Worker::pull`](kiln_worker::Worker::pull) fetches blobs that
    /// [`CacheImport::prepare`] did not put in the worker's content store
    /// (the cache's registry reference).
    pub reference: Reference,
}

/// A cache imported for one solve (`--cache-from`).
#[async_trait::async_trait]
pub trait CacheImport: Send + Sync + fmt::Debug {
    /// The result recorded for `key`, if the cache has one.
    fn lookup(&self, key: &CacheKey) -> Option<ImportedResult>;

    /// Makes the blobs of `layers` available to a pull from
    /// [`ImportedResult::reference`]: either writes them into `content` or
    /// leaves them for the worker to fetch from that reference.
    async fn prepare(&self, layers: &[Layer], content: &ContentStore) -> Result<(), BoxError>;
}

/// The imported caches of a solve, searched in order.
pub type CacheImports = Vec<Arc<dyn CacheImport>>;

/// One vertex of a finished solve, as a cache exporter needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheVertex {
    /// The vertex's cache key.
    pub key: CacheKey,
    /// Cache keys of its inputs (with the output index used), in input order.
    pub inputs: Vec<(CacheKey, usize)>,
    /// Its outputs (`None` = scratch).
    pub outputs: Vec<Option<SnapshotId>>,
    /// When its result was first made (seconds since the epoch).
    pub created: u64,
    /// Whether it is the solve's result vertex.
    pub is_result: bool,
}

/// A manifest and config shaped like an image for `layers`, so the worker's
/// pull can apply them.
pub(crate) fn as_image(result: &ImportedResult) -> ResolvedImage {
    let config = ImageConfig {
        rootfs: RootFs {
            kind: "layers".to_string(),
            diff_ids: result.layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        ..Default::default()
    };
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.to_string()),
        config: Descriptor::new(
            media_types::OCI_CONFIG,
            Digest::of(&config_bytes),
            config_bytes.len() as u64,
        ),
        layers: result.layers.iter().map(|l| l.descriptor.clone()).collect(),
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
    ResolvedImage {
        reference: result.reference.clone(),
        manifest_digest: Digest::of(&manifest_bytes),
        manifest,
        manifest_bytes,
        config,
        config_bytes,
    }
}

/// Applies an imported result on `worker`; `None` for an empty chain.
pub(crate) async fn materialize(
    worker: &dyn Worker,
    import: &dyn CacheImport,
    result: &ImportedResult,
    progress: &dyn kiln_worker::ProgressSink,
) -> Result<Option<SnapshotId>, BoxError> {
    import.prepare(&result.layers, worker.content()).await?;
    let image = as_image(result);
    Ok(worker.pull(&image, progress).await?)
}
