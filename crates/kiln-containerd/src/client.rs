//! [`Containerd`]: the connection and the thin wrappers over the containerd services used here.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::snapshots;
use containerd_client::services::v1::{AddResourceRequest, Info as ContentInfo};
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest, DeleteImageRequest, DeleteRequest, GetImageRequest, Image,
    InfoRequest, ListImagesRequest, ReadContentRequest, UpdateImageRequest, UpdateRequest,
};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::{Code, Request};
use prost_types::FieldMask;
use tracing::debug;

use crate::error::{rpc, Error, Result};
use crate::oci::Descriptor;

/// gRPC header carrying the containerd namespace of a call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC header carrying the lease a call's new content and snapshots are added to.
pub const LEASE_HEADER: &str = "containerd-lease";

/// How long a lease taken for an import or unpack lives if kiln dies before deleting it.
const LEASE_EXPIRY: Duration = Duration::from_secs(60 * 60);

/// A connection to a containerd daemon.
///
/// Cheap to clone (the gRPC channel is shared). Every namespaced call takes the namespace and
/// sends it as the `containerd-namespace` header.
#[derive(Clone)]
pub struct Containerd {
    client: std::sync::Arc<containerd_client::Client>,
    address: String,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("address", &self.address)
            .finish()
    }
}

impl Containerd {
    /// Connects to containerd's unix socket at `address` (a path, optionally `unix://`-prefixed).
    ///
    /// Fails with [`Error::SocketMissing`] when nothing is at that path, and with
    /// [`Error::Connect`] when the connection is refused.
    pub async fn connect(address: &str) -> Result<Containerd> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        if !Path::new(path).exists() {
            return Err(Error::SocketMissing {
                address: address.to_string(),
            });
        }
        let channel = containerd_client::connect(path)
            .await
            .map_err(|source| Error::Connect {
                address: address.to_string(),
                source,
            })?;
        debug!(address, "connected to containerd");
        Ok(Containerd {
            client: std::sync::Arc::new(containerd_client::Client::from(channel)),
            address: address.to_string(),
        })
    }

    /// The address this client connected to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The generated client, for calls this crate does not wrap.
    pub fn raw(&self) -> &containerd_client::Client {
        &self.client
    }

    /// The daemon's UUID (introspection `Server`), as BuildKit's containerd worker labels show it.
    pub async fn server_uuid(&self) -> Result<String> {
        let response = self
            .client
            .introspection()
            .server(Request::new(()))
            .await
            .map_err(rpc("introspection.Server", self.address.clone()))?;
        Ok(response.into_inner().uuid)
    }

    /// The snapshotter plugins containerd registered, each with the error that kept it from
    /// loading (`None` = usable): containerd's overlayfs plugin, for one, tries an overlay
    /// mount under its root at start-up and is skipped where that fails.
    pub async fn snapshotters(&self) -> Result<Vec<(String, Option<String>)>> {
        let response = self
            .client
            .introspection()
            .plugins(Request::new(
                containerd_client::services::v1::PluginsRequest {
                    filters: vec!["type==io.containerd.snapshotter.v1".to_string()],
                },
            ))
            .await
            .map_err(rpc("introspection.Plugins", self.address.clone()))?;
        Ok(response
            .into_inner()
            .plugins
            .into_iter()
            .map(|plugin| {
                let error = plugin.init_err.map(|status| status.message);
                (plugin.id, error)
            })
            .collect())
    }

    /// The daemon's version string (version `Version`).
    pub async fn version(&self) -> Result<String> {
        let response = self
            .client
            .version()
            .version(Request::new(()))
            .await
            .map_err(rpc("version.Version", self.address.clone()))?;
        Ok(response.into_inner().version)
    }

    /// Wraps `message` in a request carrying the namespace header (and the lease header when
    /// `lease` is given).
    pub(crate) fn request<T>(
        &self,
        namespace: &str,
        lease: Option<&str>,
        message: T,
    ) -> Result<Request<T>> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(NAMESPACE_HEADER, header_value(NAMESPACE_HEADER, namespace)?);
        if let Some(lease) = lease {
            metadata.insert(LEASE_HEADER, header_value(LEASE_HEADER, lease)?);
        }
        Ok(request)
    }

    // --- leases ---

    /// Creates a lease named `kiln-<purpose>-<random>` that expires after an hour, so a crashed
    /// kiln leaves nothing pinned for long.
    pub(crate) async fn create_lease(&self, namespace: &str, purpose: &str) -> Result<String> {
        let id = format!("kiln-{purpose}-{}", random_suffix());
        let expire = chrono::Utc::now()
            + chrono::Duration::from_std(LEASE_EXPIRY).unwrap_or(chrono::Duration::hours(1));
        let labels = HashMap::from([(
            "containerd.io/gc.expire".to_string(),
            expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )]);
        let request = self.request(
            namespace,
            None,
            CreateRequest {
                id: id.clone(),
                labels,
            },
        )?;
        self.client
            .leases()
            .create(request)
            .await
            .map_err(rpc("leases.Create", id.clone()))?;
        Ok(id)
    }

    /// Deletes a lease; what it held stays only if something else references it.
    pub(crate) async fn delete_lease(&self, namespace: &str, id: &str) -> Result<()> {
        let request = self.request(
            namespace,
            None,
            DeleteRequest {
                id: id.to_string(),
                sync: false,
            },
        )?;
        self.client
            .leases()
            .delete(request)
            .await
            .map_err(rpc("leases.Delete", id))?;
        Ok(())
    }

    /// Adds an existing blob to a lease, so it survives until the image references it.
    pub(crate) async fn lease_content(
        &self,
        namespace: &str,
        lease: &str,
        digest: &str,
    ) -> Result<()> {
        self.lease_resource(namespace, lease, "content", digest)
            .await
    }

    /// Adds a snapshot (by name) to a lease. Done before the snapshot is
    /// looked at, so a garbage collection between that look and its use (an
    /// image record moving to a new manifest releases the old references)
    /// cannot remove it.
    pub(crate) async fn lease_snapshot(
        &self,
        namespace: &str,
        lease: &str,
        snapshotter: &str,
        name: &str,
    ) -> Result<()> {
        self.lease_resource(namespace, lease, &format!("snapshots/{snapshotter}"), name)
            .await
    }

    async fn lease_resource(
        &self,
        namespace: &str,
        lease: &str,
        kind: &str,
        id: &str,
    ) -> Result<()> {
        let request = self.request(
            namespace,
            None,
            AddResourceRequest {
                id: lease.to_string(),
                resource: Some(containerd_client::services::v1::Resource {
                    id: id.to_string(),
                    r#type: kind.to_string(),
                }),
            },
        )?;
        self.client
            .leases()
            .add_resource(request)
            .await
            .map_err(rpc("leases.AddResource", id))?;
        Ok(())
    }

    // --- content ---

    /// `Content.Info` of a blob, `None` when containerd does not have it.
    pub async fn content_info(&self, namespace: &str, digest: &str) -> Result<Option<ContentInfo>> {
        let request = self.request(
            namespace,
            None,
            InfoRequest {
                digest: digest.to_string(),
            },
        )?;
        match self.client.content().info(request).await {
            Ok(response) => Ok(response.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc("content.Info", digest)(status)),
        }
    }

    /// Reads a whole blob (`Content.Read`). Meant for manifests and configs.
    pub async fn read_blob(&self, namespace: &str, digest: &str) -> Result<Vec<u8>> {
        let request = self.request(
            namespace,
            None,
            ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
        )?;
        let mut stream = match self.client.content().read(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => {
                return Err(Error::MissingBlob {
                    digest: digest.to_string(),
                })
            }
            Err(status) => return Err(rpc("content.Read", digest)(status)),
        };
        let mut data = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(rpc("content.Read", digest))?
        {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// Sets labels on a blob (`Content.Update` with `labels.<key>` field paths), leaving its other
    /// labels alone.
    pub async fn set_content_labels(
        &self,
        namespace: &str,
        digest: &str,
        labels: &[(String, String)],
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let request = self.request(
            namespace,
            None,
            UpdateRequest {
                info: Some(ContentInfo {
                    digest: digest.to_string(),
                    labels: labels.iter().cloned().collect(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: labels
                        .iter()
                        .map(|(key, _)| format!("labels.{key}"))
                        .collect(),
                }),
            },
        )?;
        self.client
            .content()
            .update(request)
            .await
            .map_err(rpc("content.Update", digest))?;
        Ok(())
    }

    // --- images ---

    /// The image record `name`, `None` when there is none.
    pub async fn get_image(&self, namespace: &str, name: &str) -> Result<Option<Image>> {
        let request = self.request(
            namespace,
            None,
            GetImageRequest {
                name: name.to_string(),
            },
        )?;
        match self.client.images().get(request).await {
            Ok(response) => Ok(response.into_inner().image),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc("images.Get", name)(status)),
        }
    }

    /// Creates the image record `name` → `target`, or updates it when it exists (what
    /// containerd's importer does: a rebuilt tag moves to the new image).
    pub async fn put_image(&self, namespace: &str, name: &str, target: &Descriptor) -> Result<()> {
        let image = Image {
            name: name.to_string(),
            target: Some(target.to_containerd()),
            ..Default::default()
        };
        let request = self.request(
            namespace,
            None,
            CreateImageRequest {
                image: Some(image.clone()),
                source_date_epoch: None,
            },
        )?;
        match self.client.images().create(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                let request = self.request(
                    namespace,
                    None,
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(FieldMask {
                            paths: vec!["target".to_string()],
                        }),
                        source_date_epoch: None,
                    },
                )?;
                self.client
                    .images()
                    .update(request)
                    .await
                    .map_err(rpc("images.Update", name))?;
                Ok(())
            }
            Err(status) => Err(rpc("images.Create", name)(status)),
        }
    }

    /// Gives the image `source_name` the additional name `new_name` (nerdctl's tagging after a
    /// build, reference §1.8): `Create`, and on `AlreadyExists` a synchronous `Delete` then
    /// `Create`. Fails with [`Error::ImageNotFound`] when `source_name` does not exist.
    pub async fn tag(&self, namespace: &str, source_name: &str, new_name: &str) -> Result<()> {
        let source = self
            .get_image(namespace, source_name)
            .await?
            .ok_or_else(|| Error::ImageNotFound {
                name: source_name.to_string(),
            })?;
        let image = Image {
            name: new_name.to_string(),
            labels: source.labels.clone(),
            target: source.target.clone(),
            ..Default::default()
        };
        let create = |image: Image| {
            self.request(
                namespace,
                None,
                CreateImageRequest {
                    image: Some(image),
                    source_date_epoch: None,
                },
            )
        };
        match self.client.images().create(create(image.clone())?).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => {
                self.delete_image(namespace, new_name).await?;
                self.client
                    .images()
                    .create(create(image)?)
                    .await
                    .map_err(rpc("images.Create", new_name))?;
                Ok(())
            }
            Err(status) => Err(rpc("images.Create", new_name)(status)),
        }
    }

    /// Names of all image records in the namespace, sorted.
    pub async fn image_names(&self, namespace: &str) -> Result<Vec<String>> {
        let request = self.request(namespace, None, ListImagesRequest { filters: vec![] })?;
        let response = self
            .client
            .images()
            .list(request)
            .await
            .map_err(rpc("images.List", namespace))?;
        let mut names: Vec<String> = response
            .into_inner()
            .images
            .into_iter()
            .map(|image| image.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Deletes the image record `name` synchronously (containerd collects what only it
    /// referenced before answering). A missing image is not an error.
    pub async fn delete_image(&self, namespace: &str, name: &str) -> Result<()> {
        let request = self.request(
            namespace,
            None,
            DeleteImageRequest {
                name: name.to_string(),
                sync: true,
                target: None,
            },
        )?;
        match self.client.images().delete(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(rpc("images.Delete", name)(status)),
        }
    }

    // --- snapshots ---

    /// `Snapshots.Stat` of `key`, `None` when the snapshotter has no such snapshot.
    pub async fn snapshot_info(
        &self,
        namespace: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<snapshots::Info>> {
        let request = self.request(
            namespace,
            None,
            snapshots::StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            },
        )?;
        match self.client.snapshots().stat(request).await {
            Ok(response) => Ok(response.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(rpc("snapshots.Stat", key)(status)),
        }
    }

    /// Removes snapshot `key`; a missing one is not an error.
    pub(crate) async fn remove_snapshot(
        &self,
        namespace: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<()> {
        let request = self.request(
            namespace,
            None,
            snapshots::RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            },
        )?;
        match self.client.snapshots().remove(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(rpc("snapshots.Remove", key)(status)),
        }
    }
}

fn header_value(
    header: &'static str,
    value: &str,
) -> Result<MetadataValue<tonic::metadata::Ascii>> {
    MetadataValue::try_from(value).map_err(|_| Error::InvalidHeader {
        header,
        value: value.to_string(),
    })
}

/// A random suffix for lease ids, ingest refs and snapshot keys.
pub(crate) fn random_suffix() -> String {
    use rand::Rng;
    let value: u64 = rand::thread_rng().gen();
    format!("{value:016x}")
}
