//! [`ContainerdImageSource`]: a containerd namespace as the OCI worker's read-only fallback for
//! base images.

use async_trait::async_trait;
use kiln_containerd::Containerd;
use kiln_image::content::ContentStore;
use kiln_image::oci::{Descriptor, Platform};
use kiln_image::reference::Reference;
use kiln_image::registry::ResolvedImage;
use kiln_worker::Error;
use kiln_worker_oci::BaseImageSource;

use crate::api::{backend, Api};

/// The images of one containerd namespace, read-only: image records are looked up and blobs
/// read through containerd's image and content services; nothing is ever written to containerd
/// (no lease, no label, no snapshot).
#[derive(Debug, Clone)]
pub struct ContainerdImageSource {
    api: Api,
    address: String,
}

impl ContainerdImageSource {
    /// Connects to containerd at `address` (`unix://` prefix allowed) for the images of
    /// `namespace`.
    pub async fn connect(address: &str, namespace: &str) -> Result<Self, Error> {
        let containerd = Containerd::connect(address)
            .await
            .map_err(backend(format!("connect to containerd at {address}")))?;
        Ok(Self {
            api: Api {
                containerd,
                namespace: namespace.to_string(),
                // Read-only: the snapshotter and the lease are never used.
                snapshotter: String::new(),
                lease: String::new(),
            },
            address: address.to_string(),
        })
    }

    /// The namespace the images are read from.
    pub fn namespace(&self) -> &str {
        &self.api.namespace
    }
}

#[async_trait]
impl BaseImageSource for ContainerdImageSource {
    fn describe(&self) -> String {
        format!(
            "containerd namespace {:?} at {}",
            self.api.namespace, self.address
        )
    }

    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<ResolvedImage>, Error> {
        self.api.resolve_image(reference, platform).await
    }

    async fn fetch_blob(&self, descriptor: &Descriptor, store: &ContentStore) -> Result<(), Error> {
        self.api.copy_blob_out(&descriptor.digest, store).await
    }
}
