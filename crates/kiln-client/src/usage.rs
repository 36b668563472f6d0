//! Build-cache administration: `Control.DiskUsage` and `Control.Prune`.

use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::{DiskUsageRequest, PruneRequest, UsageRecord};
use tonic::transport::Channel;

use crate::Error;

/// The daemon's cache records (`buildctl du`).
pub async fn disk_usage(client: &mut ControlClient<Channel>) -> Result<Vec<UsageRecord>, Error> {
    let response = client
        .disk_usage(DiskUsageRequest::default())
        .await
        .map_err(|status| Error::Rpc {
            method: "DiskUsage",
            status,
        })?;
    Ok(response.into_inner().record)
}

/// Prunes the build cache (`all`: every unused record, not only dangling
/// ones) and returns the records the daemon reports as removed, in the
/// order streamed.
pub async fn prune(
    client: &mut ControlClient<Channel>,
    all: bool,
) -> Result<Vec<UsageRecord>, Error> {
    let request = PruneRequest {
        all,
        ..Default::default()
    };
    let rpc_error = |status| Error::Rpc {
        method: "Prune",
        status,
    };
    let mut stream = client.prune(request).await.map_err(rpc_error)?.into_inner();
    let mut removed = Vec::new();
    while let Some(record) = stream.message().await.map_err(rpc_error)? {
        removed.push(record);
    }
    Ok(removed)
}
