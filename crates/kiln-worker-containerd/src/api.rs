//! The containerd calls of the worker, all in its namespace and (for anything that creates
//! resources) under its lease.

use std::collections::HashMap;
use std::io::{Read, Write};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Info as SnapshotInfo, ListSnapshotsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{
    AddResourceRequest, ApplyRequest, CreateRequest as CreateLeaseRequest, DiffRequest,
    ReadContentRequest, Resource, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::{Descriptor as CtrdDescriptor, Mount};
use kiln_containerd::{Containerd, LEASE_HEADER, NAMESPACE_HEADER};
use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageConfig, ImageIndex, ImageManifest, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::ResolvedImage;
use kiln_image::Digest;
use kiln_worker::Error;

use crate::parse_json;
use tokio_stream::wrappers::ReceiverStream;

/// Bytes sent per `Content.Write` message.
const WRITE_CHUNK: usize = 1 << 20;

/// Maps any error into [`Error::Backend`] for `op`.
pub(crate) fn backend<E>(op: impl Into<String>) -> impl FnOnce(E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let op = op.into();
    move |source| Error::Backend {
        op,
        source: Box::new(source),
    }
}

/// containerd in one namespace, one snapshotter, one lease.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub containerd: Containerd,
    pub namespace: String,
    pub snapshotter: String,
    /// The worker's lease: every snapshot and blob the worker creates is added to it, so
    /// containerd's garbage collector keeps them while the worker references them.
    pub lease: String,
}

impl Api {
    fn request<T>(&self, leased: bool, message: T) -> Result<Request<T>, Error> {
        let mut request = Request::new(message);
        let header = |value: &str| {
            MetadataValue::try_from(value).map_err(|e| Error::Backend {
                op: format!("use {value:?} as a containerd header"),
                source: Box::new(e),
            })
        };
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, header(&self.namespace)?);
        if leased {
            request
                .metadata_mut()
                .insert(LEASE_HEADER, header(&self.lease)?);
        }
        Ok(request)
    }

    /// Creates the worker lease when it does not exist yet (no expiry: it lives as long as the
    /// worker's state).
    pub async fn ensure_lease(&self) -> Result<(), Error> {
        let labels = HashMap::from([(
            "org.mobyproject.buildkit.worker.owner".to_string(),
            "kiln".to_string(),
        )]);
        let request = self.request(
            false,
            CreateLeaseRequest {
                id: self.lease.clone(),
                labels,
            },
        )?;
        match self.containerd.raw().leases().create(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => Ok(()),
            Err(status) => Err(backend(format!("create lease {}", self.lease))(status)),
        }
    }

    /// Adds a snapshot (one the worker did not create, e.g. an unpacked layer) to the lease.
    pub async fn lease_snapshot(&self, key: &str) -> Result<(), Error> {
        self.lease_resource(format!("snapshots/{}", self.snapshotter), key)
            .await
    }

    /// Adds a blob to the lease.
    pub async fn lease_blob(&self, digest: &Digest) -> Result<(), Error> {
        self.lease_resource("content".into(), &digest.to_string())
            .await
    }

    async fn lease_resource(&self, kind: String, id: &str) -> Result<(), Error> {
        let request = self.request(
            false,
            AddResourceRequest {
                id: self.lease.clone(),
                resource: Some(Resource {
                    id: id.to_string(),
                    r#type: kind,
                }),
            },
        )?;
        self.containerd
            .raw()
            .leases()
            .add_resource(request)
            .await
            .map_err(backend(format!("add {id} to lease {}", self.lease)))?;
        Ok(())
    }

    // --- snapshots ---

    /// `Snapshots.Stat`; `None` when there is no such snapshot.
    pub async fn stat(&self, key: &str) -> Result<Option<SnapshotInfo>, Error> {
        let request = self.request(
            false,
            StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            },
        )?;
        match self.containerd.raw().snapshots().stat(request).await {
            Ok(response) => Ok(response.into_inner().info),
            Err(status) if status.code() == Code::NotFound => Ok(None),
            Err(status) => Err(backend(format!("stat snapshot {key}"))(status)),
        }
    }

    /// `Snapshots.Prepare` of an active snapshot `key` over `parent`; returns its mounts.
    pub async fn prepare(&self, key: &str, parent: Option<&str>) -> Result<Vec<Mount>, Error> {
        let request = self.request(
            true,
            PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
                parent: parent.unwrap_or_default().to_string(),
                labels: HashMap::new(),
            },
        )?;
        Ok(self
            .containerd
            .raw()
            .snapshots()
            .prepare(request)
            .await
            .map_err(backend(format!("prepare snapshot {key}")))?
            .into_inner()
            .mounts)
    }

    /// `Snapshots.View` of `parent` under the key `key`; returns its (read-only) mounts.
    pub async fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Error> {
        let request = self.request(
            true,
            ViewSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: HashMap::new(),
            },
        )?;
        Ok(self
            .containerd
            .raw()
            .snapshots()
            .view(request)
            .await
            .map_err(backend(format!("view snapshot {parent}")))?
            .into_inner()
            .mounts)
    }

    /// `Snapshots.Commit` of active `key` as `name`; `false` when `name` exists already (the
    /// active snapshot is removed then).
    pub async fn commit(&self, key: &str, name: &str) -> Result<bool, Error> {
        let request = self.request(
            true,
            CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: name.to_string(),
                key: key.to_string(),
                labels: HashMap::new(),
            },
        )?;
        match self.containerd.raw().snapshots().commit(request).await {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::AlreadyExists => {
                self.remove(key).await?;
                Ok(false)
            }
            Err(status) => Err(backend(format!("commit snapshot {name}"))(status)),
        }
    }

    /// `Snapshots.Remove`; a missing snapshot is not an error.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        let request = self.request(
            false,
            RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            },
        )?;
        match self.containerd.raw().snapshots().remove(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => Ok(()),
            Err(status) => Err(backend(format!("remove snapshot {key}"))(status)),
        }
    }

    /// Names of all snapshots of the snapshotter in the namespace.
    pub async fn list(&self) -> Result<Vec<String>, Error> {
        let request = self.request(
            false,
            ListSnapshotsRequest {
                snapshotter: self.snapshotter.clone(),
                filters: Vec::new(),
            },
        )?;
        let mut stream = self
            .containerd
            .raw()
            .snapshots()
            .list(request)
            .await
            .map_err(backend("list snapshots"))?
            .into_inner();
        let mut names = Vec::new();
        while let Some(page) = stream.message().await.map_err(backend("list snapshots"))? {
            names.extend(page.info.into_iter().map(|info| info.name));
        }
        Ok(names)
    }

    // --- diff ---

    /// `Diff.Apply` of the layer `layer` (in containerd's content store) onto `mounts`; returns
    /// the diff id containerd computed.
    pub async fn apply(&self, layer: &Descriptor, mounts: Vec<Mount>) -> Result<String, Error> {
        let request = self.request(
            true,
            ApplyRequest {
                diff: Some(to_containerd(layer)),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            },
        )?;
        Ok(self
            .containerd
            .raw()
            .diff()
            .apply(request)
            .await
            .map_err(backend(format!("apply layer {}", layer.digest)))?
            .into_inner()
            .applied
            .map(|d| d.digest)
            .unwrap_or_default())
    }

    /// `Diff.Diff` of `lower` → `upper` as a gzip layer in containerd's content store.
    pub async fn diff(&self, lower: Vec<Mount>, upper: Vec<Mount>) -> Result<Descriptor, Error> {
        let request = self.request(
            true,
            DiffRequest {
                left: lower,
                right: upper,
                media_type: kiln_image::oci::media_types::OCI_LAYER_GZIP.to_string(),
                r#ref: String::new(),
                labels: HashMap::new(),
                source_date_epoch: None,
            },
        )?;
        let diff = self
            .containerd
            .raw()
            .diff()
            .diff(request)
            .await
            .map_err(backend("compute a layer diff"))?
            .into_inner()
            .diff
            .unwrap_or_default();
        from_containerd(&diff)
    }

    // --- content ---

    /// Whether containerd's content store has the blob.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, Error> {
        Ok(self
            .containerd
            .content_info(&self.namespace, &digest.to_string())
            .await
            .map_err(backend(format!("look up blob {digest}")))?
            .is_some())
    }

    /// The labels of a blob in containerd's content store.
    pub async fn blob_labels(&self, digest: &Digest) -> Result<HashMap<String, String>, Error> {
        Ok(self
            .containerd
            .content_info(&self.namespace, &digest.to_string())
            .await
            .map_err(backend(format!("look up blob {digest}")))?
            .map(|info| info.labels)
            .unwrap_or_default())
    }

    /// Reads a whole (small) blob from containerd.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        self.containerd
            .read_blob(&self.namespace, &digest.to_string())
            .await
            .map_err(backend(format!("read blob {digest}")))
    }

    /// Streams a blob from containerd's content store into the local `store` (nothing when it
    /// is there already).
    pub async fn copy_blob_out(&self, digest: &Digest, store: &ContentStore) -> Result<(), Error> {
        if store.has(digest) {
            return Ok(());
        }
        let op = || format!("copy blob {digest} out of containerd");
        let request = self.request(
            false,
            ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
        )?;
        let mut stream = self
            .containerd
            .raw()
            .content()
            .read(request)
            .await
            .map_err(backend(op()))?
            .into_inner();
        let mut writer = store.writer().map_err(local(op()))?;
        while let Some(chunk) = stream.message().await.map_err(backend(op()))? {
            writer.write_all(&chunk.data).map_err(backend(op()))?;
        }
        writer.commit(Some(digest)).map_err(local(op()))?;
        Ok(())
    }

    /// Writes the local blob `descriptor` from `store` into containerd's content store under
    /// the lease (nothing when containerd has it; it is added to the lease then).
    pub async fn copy_blob_in(
        &self,
        descriptor: &Descriptor,
        store: &ContentStore,
    ) -> Result<(), Error> {
        let digest = &descriptor.digest;
        if self.has_blob(digest).await? {
            return self.lease_blob(digest).await;
        }
        let op = || format!("write blob {digest} into containerd");
        let mut file = store.open_blob(digest).map_err(local(op()))?;
        let total = i64::try_from(descriptor.size).unwrap_or(i64::MAX);
        let reference = format!("kiln-worker-{}-{}", random_hex(), digest.hex());
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let base = WriteContentRequest {
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            ..Default::default()
        };
        let closed = || Error::Backend {
            op: op(),
            source: "containerd closed the write stream".into(),
        };
        sender
            .send(WriteContentRequest {
                action: WriteAction::Stat as i32,
                ..base.clone()
            })
            .await
            .map_err(|_| closed())?;
        let request = self.request(true, ReceiverStream::new(receiver))?;
        let mut responses = match self.containerd.raw().content().write(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::AlreadyExists => return Ok(()),
            Err(status) => return Err(backend(op())(status)),
        };
        let mut offset: i64 = 0;
        let mut buf = vec![0u8; WRITE_CHUNK];
        loop {
            // Each request is answered once; the first answer is the Stat's.
            match responses.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(closed()),
                Err(status) if status.code() == Code::AlreadyExists => return Ok(()),
                Err(status) => return Err(backend(op())(status)),
            }
            let n = file.read(&mut buf).map_err(backend(op()))?;
            let message = if n == 0 {
                offset = total;
                WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    offset,
                    ..base.clone()
                }
            } else {
                let m = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    offset,
                    data: buf[..n].to_vec(),
                    ..base.clone()
                };
                offset += n as i64;
                m
            };
            let commit = n == 0;
            if sender.send(message).await.is_err() {
                return Err(closed());
            }
            if commit {
                match responses.message().await {
                    Ok(Some(_)) => break,
                    Ok(None) => return Err(closed()),
                    Err(status) if status.code() == Code::AlreadyExists => break,
                    Err(status) => return Err(backend(op())(status)),
                }
            }
        }
        Ok(())
    }

    // --- images (read-only) ---

    /// The image `reference` for `platform` in the namespace's image service (manifest and
    /// config read from containerd's content store), `None` when there is no such image.
    pub async fn resolve_image(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error> {
        // containerd names images `name:tag`; a pinned `name:tag@digest`
        // (what the Dockerfile frontend resolves FROM to) is looked up by
        // its tag and must then match the digest.
        let name = match reference.tag() {
            Some(tag) => format!("{}:{tag}", reference.name()),
            None => reference.to_string(),
        };
        let Some(image) = self
            .containerd
            .get_image(&self.namespace, &name)
            .await
            .map_err(backend(format!("look up image {name}")))?
        else {
            return Ok(None);
        };
        let Some(target) = image.target.as_ref() else {
            return Ok(None);
        };
        let target = from_containerd(target)?;
        let Some((manifest_descriptor, manifest_bytes)) =
            self.platform_manifest(&target, platform).await?
        else {
            return Ok(None);
        };
        if let Some(pinned) = reference.digest() {
            if pinned != &target.digest && pinned != &manifest_descriptor.digest {
                return Ok(None);
            }
        }
        let manifest: ImageManifest = parse_json(&manifest_bytes, &manifest_descriptor.digest)?;
        let config_bytes = self.read_blob(&manifest.config.digest).await?;
        let config: ImageConfig = parse_json(&config_bytes, &manifest.config.digest)?;
        Ok(Some(ResolvedImage {
            reference: reference.clone(),
            manifest_digest: manifest_descriptor.digest,
            manifest,
            manifest_bytes,
            config,
            config_bytes,
        }))
    }

    /// Reads the manifest for `platform` under `target` (a manifest or an index) from
    /// containerd: (descriptor, bytes).
    async fn platform_manifest(
        &self,
        target: &Descriptor,
        platform: &Platform,
    ) -> Result<Option<(Descriptor, Vec<u8>)>, Error> {
        let mut current = target.clone();
        for _ in 0..8 {
            let bytes = self.read_blob(&current.digest).await?;
            if media_types::is_manifest(&current.media_type) {
                return Ok(Some((current, bytes)));
            }
            if !media_types::is_index(&current.media_type) {
                return Ok(None);
            }
            let index: ImageIndex = parse_json(&bytes, &current.digest)?;
            let Some(child) = index.manifests.into_iter().find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| platform.matches(p) || p.matches(platform))
            }) else {
                return Ok(None);
            };
            current = child;
        }
        Ok(None)
    }

    /// Sets labels on a blob (keeping its others).
    pub async fn label_blob(
        &self,
        digest: &Digest,
        labels: &[(String, String)],
    ) -> Result<(), Error> {
        self.containerd
            .set_content_labels(&self.namespace, &digest.to_string(), labels)
            .await
            .map_err(backend(format!("label blob {digest}")))
    }
}

/// Maps a local content store error into [`Error::Backend`].
pub(crate) fn local(op: String) -> impl FnOnce(kiln_image::content::Error) -> Error {
    move |source| Error::Backend {
        op,
        source: Box::new(source),
    }
}

/// A kiln descriptor as containerd's.
pub(crate) fn to_containerd(d: &Descriptor) -> CtrdDescriptor {
    CtrdDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        annotations: d
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    }
}

/// containerd's descriptor as kiln's.
pub(crate) fn from_containerd(d: &CtrdDescriptor) -> Result<Descriptor, Error> {
    let digest: Digest = d
        .digest
        .parse()
        .map_err(backend(format!("parse digest {:?}", d.digest)))?;
    Ok(Descriptor::new(
        d.media_type.clone(),
        digest,
        u64::try_from(d.size).unwrap_or(0),
    ))
}

/// 16 random hex digits for keys and refs.
pub(crate) fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}
