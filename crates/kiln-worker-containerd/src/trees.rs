//! [`Trees`] over containerd's snapshotter, so the OCI worker's executor and file-op engine run
//! unchanged on containerd snapshots.
//!
//! The engine calls these methods synchronously; the containerd calls are made with
//! `block_in_place` + the runtime handle, which needs tokio's multi-thread runtime (kilnd's).

use std::future::Future;
use std::path::{Path, PathBuf};

use kiln_worker::{Error, SnapshotId, SnapshotView};
use kiln_worker_oci::{ActiveTree, Trees};
use tokio::runtime::Handle;

use crate::api::{random_hex, Api};
use crate::mounts::{mount_all, Mounted};

/// Key prefix of the worker's active (prepared, uncommitted) snapshots and views.
pub(crate) const ACTIVE_PREFIX: &str = "kiln-active-";
/// Name prefix of snapshots the worker committed.
pub(crate) const COMMITTED_PREFIX: &str = "kiln-";

/// Runs `future` to completion from synchronous code running on (or beside) the runtime.
pub(crate) fn block<F: Future>(handle: &Handle, future: F) -> F::Output {
    tokio::task::block_in_place(|| handle.block_on(future))
}

/// The worker's snapshotter as [`Trees`].
#[derive(Debug, Clone)]
pub(crate) struct CtrdTrees {
    pub api: Api,
    pub handle: Handle,
}

impl CtrdTrees {
    /// A read-only view of `id` mounted at `mount_point`, removed (view snapshot included) when
    /// dropped.
    pub fn mount_view(&self, id: &str, mount_point: &Path) -> Result<SnapshotView, Error> {
        let key = format!("{ACTIVE_PREFIX}view-{}", random_hex());
        let mounts = block(&self.handle, self.api.view(&key, id))?;
        let guard = Removal {
            api: self.api.clone(),
            handle: self.handle.clone(),
            key: Some(key),
            mount: None,
        };
        let mut guard = guard;
        guard.mount = Some(mount_all(&mounts, mount_point)?);
        Ok(SnapshotView::new(
            mount_point.to_path_buf(),
            Some(Box::new(guard)),
        ))
    }
}

impl Trees for CtrdTrees {
    fn view(&self, id: Option<&SnapshotId>, mount_point: &Path) -> Result<SnapshotView, Error> {
        match id {
            None => Ok(SnapshotView::new(mount_point.to_path_buf(), None)),
            Some(id) => self.mount_view(id, mount_point),
        }
    }

    fn activate(
        &self,
        parent: Option<&SnapshotId>,
        mount_point: &Path,
    ) -> Result<Box<dyn ActiveTree>, Error> {
        let key = format!("{ACTIVE_PREFIX}{}", random_hex());
        let mounts = block(
            &self.handle,
            self.api.prepare(&key, parent.map(String::as_str)),
        )?;
        let mut removal = Removal {
            api: self.api.clone(),
            handle: self.handle.clone(),
            key: Some(key),
            mount: None,
        };
        removal.mount = Some(mount_all(&mounts, mount_point)?);
        Ok(Box::new(CtrdActive {
            path: mount_point.to_path_buf(),
            removal,
        }))
    }
}

/// Unmounts, then removes an uncommitted snapshot key (in the background: drop cannot wait).
struct Removal {
    api: Api,
    handle: Handle,
    key: Option<String>,
    mount: Option<Mounted>,
}

impl Drop for Removal {
    fn drop(&mut self) {
        drop(self.mount.take());
        if let Some(key) = self.key.take() {
            let api = self.api.clone();
            self.handle.spawn(async move {
                if let Err(e) = api.remove(&key).await {
                    tracing::warn!(key, error = %e, "failed to remove snapshot");
                }
            });
        }
    }
}

/// A prepared containerd snapshot mounted on the host.
struct CtrdActive {
    path: PathBuf,
    removal: Removal,
}

impl ActiveTree for CtrdActive {
    fn path(&self) -> &Path {
        &self.path
    }

    fn commit(self: Box<Self>) -> Result<SnapshotId, Error> {
        let mut this = *self;
        if let Some(m) = this.removal.mount.take() {
            m.unmount()?;
        }
        let Some(key) = this.removal.key.take() else {
            return Err(Error::InvalidOp {
                op: "snapshot commit",
                reason: "snapshot committed twice".into(),
            });
        };
        let name = format!("{COMMITTED_PREFIX}{}{}", random_hex(), random_hex());
        let api = this.removal.api.clone();
        match block(&this.removal.handle, api.commit(&key, &name)) {
            Ok(_) => Ok(name),
            Err(e) => {
                this.removal.key = Some(key);
                Err(e)
            }
        }
    }
}
