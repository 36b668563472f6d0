//! Unpacking an imported image into a containerd snapshotter, the way containerd's own
//! unpacker does, so `ctr run` finds the image unpacked.

use containerd_client::services::v1::snapshots::{CommitSnapshotRequest, PrepareSnapshotRequest};
use containerd_client::services::v1::ApplyRequest;
use containerd_client::tonic::Code;
use tracing::{debug, info, warn};

use crate::client::{random_suffix, Containerd};
use crate::error::{rpc, Error, Result};
use crate::import::ImportedImage;
use crate::oci::{
    chain_ids, media_types, Descriptor, ImageConfig, ImageIndex, ImageManifest, Platform,
};

/// Deepest index nesting followed when picking a manifest.
const MAX_DEPTH: usize = 8;

/// What [`Containerd::unpack`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// The manifest that was unpacked (the platform's manifest when the target is an index).
    pub manifest: Descriptor,
    /// Layers applied into new snapshots.
    pub layers_unpacked: usize,
    /// Layers whose snapshot already existed.
    pub layers_present: usize,
    /// Chain id of the top layer: the snapshot a container's rootfs is prepared from
    /// (`None` for an image without layers).
    pub top_chain_id: Option<String>,
}

impl Containerd {
    /// Unpacks `image` (for `platform`) into `snapshotter`: one committed snapshot per layer,
    /// named by chain id, applied with the `Diff` service; layers whose snapshot exists are
    /// skipped. Then labels the config blob `containerd.io/gc.ref.snapshot.<snapshotter>` (top
    /// chain id) and each layer blob `containerd.io/uncompressed` (its diff id), as containerd's
    /// unpacker does.
    pub async fn unpack(
        &self,
        namespace: &str,
        image: &ImportedImage,
        snapshotter: &str,
        platform: &Platform,
    ) -> Result<UnpackStats> {
        let manifest_descriptor = self
            .platform_manifest(namespace, &image.name, &image.target, platform, 0)
            .await?;
        let manifest: ImageManifest = parse(
            "manifest",
            &manifest_descriptor.digest,
            &self
                .read_blob(namespace, &manifest_descriptor.digest)
                .await?,
        )?;
        let config: ImageConfig = parse(
            "config",
            &manifest.config.digest,
            &self.read_blob(namespace, &manifest.config.digest).await?,
        )?;
        // A single-manifest target says its platform only in its config; check it as
        // containerd's platform matcher does.
        if !config.os.is_empty() && !config.architecture.is_empty() {
            let image_platform = Platform {
                os: config.os.clone(),
                architecture: config.architecture.clone(),
                variant: config.variant.clone(),
            };
            if !platform.matches(&image_platform) {
                return Err(Error::NoMatchingPlatform {
                    image: image.name.clone(),
                    platform: platform.to_string(),
                });
            }
        }
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::LayerCountMismatch {
                manifest: manifest_descriptor.digest.clone(),
                layers: manifest.layers.len(),
                diff_ids: diff_ids.len(),
            });
        }
        let chain = chain_ids(diff_ids);

        let lease = self.create_lease(namespace, "unpack").await?;
        let result = self
            .unpack_layers(
                namespace,
                &lease,
                snapshotter,
                &manifest.layers,
                diff_ids,
                &chain,
            )
            .await;
        // Label before the lease goes: once it is deleted containerd's garbage collector may
        // run at any moment, and only the config's label keeps the snapshots alive then.
        let labelled = match &result {
            Ok(_) => {
                self.label_unpacked(namespace, snapshotter, &manifest, diff_ids, &chain)
                    .await
            }
            Err(_) => Ok(()),
        };
        if let Err(error) = self.delete_lease(namespace, &lease).await {
            warn!(%error, lease, "failed to delete unpack lease");
        }
        let (layers_unpacked, layers_present) = result?;
        labelled?;
        let top_chain_id = chain.last().cloned();
        info!(
            image = image.name,
            snapshotter, layers_unpacked, layers_present, "unpacked image"
        );
        Ok(UnpackStats {
            manifest: manifest_descriptor,
            layers_unpacked,
            layers_present,
            top_chain_id,
        })
    }

    /// Labels the config blob `containerd.io/gc.ref.snapshot.<snapshotter>` (keeping the
    /// snapshots alive after the lease is gone) and each layer blob `containerd.io/uncompressed`
    /// (so containerd need not decompress it to learn its diff id again).
    async fn label_unpacked(
        &self,
        namespace: &str,
        snapshotter: &str,
        manifest: &ImageManifest,
        diff_ids: &[String],
        chain: &[String],
    ) -> Result<()> {
        if let Some(top) = chain.last() {
            self.set_content_labels(
                namespace,
                &manifest.config.digest,
                &[(
                    format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
                    top.clone(),
                )],
            )
            .await?;
        }
        for (layer, diff_id) in manifest.layers.iter().zip(diff_ids) {
            self.set_content_labels(
                namespace,
                &layer.digest,
                &[("containerd.io/uncompressed".to_string(), diff_id.clone())],
            )
            .await?;
        }
        Ok(())
    }

    /// The manifest of `descriptor` for `platform`: itself when it is a manifest, the first
    /// matching entry (recursively) when it is an index.
    async fn platform_manifest(
        &self,
        namespace: &str,
        image: &str,
        descriptor: &Descriptor,
        platform: &Platform,
        depth: usize,
    ) -> Result<Descriptor> {
        let media_type = descriptor.media_type.as_str();
        if media_types::is_manifest(media_type) {
            return Ok(descriptor.clone());
        }
        if !media_types::is_index(media_type) || depth >= MAX_DEPTH {
            return Err(Error::UnsupportedMediaType {
                media_type: descriptor.media_type.clone(),
                digest: descriptor.digest.clone(),
            });
        }
        let index: ImageIndex = parse(
            "index",
            &descriptor.digest,
            &self.read_blob(namespace, &descriptor.digest).await?,
        )?;
        for child in &index.manifests {
            let matches = child.platform.as_ref().is_some_and(|p| platform.matches(p));
            if matches && media_types::is_manifest(&child.media_type) {
                return Ok(child.clone());
            }
            if matches && media_types::is_index(&child.media_type) {
                return Box::pin(self.platform_manifest(
                    namespace,
                    image,
                    child,
                    platform,
                    depth + 1,
                ))
                .await;
            }
        }
        Err(Error::NoMatchingPlatform {
            image: image.to_string(),
            platform: platform.to_string(),
        })
    }

    /// Applies the missing layers; returns (unpacked, already present).
    async fn unpack_layers(
        &self,
        namespace: &str,
        lease: &str,
        snapshotter: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
        chain: &[String],
    ) -> Result<(usize, usize)> {
        let mut unpacked = 0;
        let mut present = 0;
        for (i, layer) in layers.iter().enumerate() {
            let chain_id = &chain[i];
            self.lease_snapshot(namespace, lease, snapshotter, chain_id)
                .await?;
            if self
                .snapshot_info(namespace, snapshotter, chain_id)
                .await?
                .is_some()
            {
                debug!(chain_id, "layer snapshot present");
                present += 1;
                continue;
            }
            let parent = if i == 0 {
                String::new()
            } else {
                chain[i - 1].clone()
            };
            let key = format!("extract-{}-{}", random_suffix(), chain_id);
            let applied = self
                .apply_layer(
                    namespace,
                    lease,
                    snapshotter,
                    &key,
                    &parent,
                    chain_id,
                    layer,
                    &diff_ids[i],
                )
                .await;
            match applied {
                Ok(true) => unpacked += 1,
                Ok(false) => present += 1,
                Err(error) => {
                    if let Err(cleanup) = self.remove_snapshot(namespace, snapshotter, &key).await {
                        warn!(%cleanup, key, "failed to remove prepared snapshot");
                    }
                    return Err(error);
                }
            }
        }
        Ok((unpacked, present))
    }

    /// Prepare → Diff.Apply → Commit for one layer. `false` when another client committed the
    /// same chain id first (the prepared key is removed then).
    #[allow(clippy::too_many_arguments)]
    async fn apply_layer(
        &self,
        namespace: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
        parent: &str,
        chain_id: &str,
        layer: &Descriptor,
        diff_id: &str,
    ) -> Result<bool> {
        let request = self.request(
            namespace,
            Some(lease),
            PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: Default::default(),
            },
        )?;
        let mounts = self
            .raw()
            .snapshots()
            .prepare(request)
            .await
            .map_err(rpc("snapshots.Prepare", key))?
            .into_inner()
            .mounts;

        let request = self.request(
            namespace,
            Some(lease),
            ApplyRequest {
                diff: Some(layer.to_containerd()),
                mounts,
                payloads: Default::default(),
                sync_fs: false,
            },
        )?;
        let applied = self
            .raw()
            .diff()
            .apply(request)
            .await
            .map_err(rpc("diff.Apply", layer.digest.clone()))?
            .into_inner()
            .applied;
        let actual = applied.map(|d| d.digest).unwrap_or_default();
        if actual != diff_id {
            return Err(Error::DiffIdMismatch {
                layer: layer.digest.clone(),
                expected: diff_id.to_string(),
                actual,
            });
        }

        let request = self.request(
            namespace,
            Some(lease),
            CommitSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                name: chain_id.to_string(),
                key: key.to_string(),
                labels: Default::default(),
            },
        )?;
        match self.raw().snapshots().commit(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::AlreadyExists => {
                self.remove_snapshot(namespace, snapshotter, key).await?;
                Ok(false)
            }
            Err(status) => Err(rpc("snapshots.Commit", chain_id)(status)),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    what: &'static str,
    digest: &str,
    data: &[u8],
) -> Result<T> {
    serde_json::from_slice(data).map_err(|source| Error::Json {
        what,
        digest: digest.to_string(),
        source,
    })
}
