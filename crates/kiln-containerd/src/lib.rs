//! kiln-containerd — landing built images in containerd, client side, through containerd's gRPC
//! API (the `containerd-client` crate's generated services).
//!
//! What nerdctl does after `buildctl build --output type=docker|oci` (reference §1.4, §1.5, §1.8):
//!
//! - [`Containerd::connect`] to a unix socket; [`Containerd::server_uuid`] (introspection) for
//!   the "is the builder's image store this containerd" check.
//! - [`Containerd::import_archive`]: reads the OCI-layout tar the exporter wrote, streams each
//!   missing blob into the content store under a lease, sets the gc reference labels, and
//!   creates or updates the image records ([`ImportedImage`]). Naming is described on
//!   [`ImportOptions`].
//! - [`Containerd::unpack`]: applies the layers of the platform's manifest into a snapshotter,
//!   one committed snapshot per chain id, and labels the blobs like containerd's unpacker so
//!   `ctr run` sees the image unpacked ([`UnpackStats`]).
//! - [`ExportStore`]: containerd's content store served over the build session as the store
//!   `export`, so a daemon's `oci`/`docker` exporter with `tar=false` sends only the blobs
//!   containerd lacks; [`ExportStore::finish`] names the image ([`LandingStats`] counts).
//! - [`Containerd::tag`], [`Containerd::image_names`], [`Containerd::delete_image`].
//!
//! Every namespaced call sends the `containerd-namespace` header of the namespace passed to it.

mod client;
mod error;
mod export_store;
mod import;
pub mod oci;
mod unpack;

pub use client::{Containerd, LEASE_HEADER, NAMESPACE_HEADER};
pub use error::{Error, Result};
pub use export_store::{human_bytes, ExportStore, LandingStats, EXPORT_STORE_ID, STORE_ID_HEADER};
pub use import::{ImportOptions, ImportReport, ImportedImage};
pub use oci::{Descriptor, Platform};
pub use unpack::UnpackStats;
