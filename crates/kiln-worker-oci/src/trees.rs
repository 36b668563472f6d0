//! [`Trees`]: where `exec` and `file` get the filesystem trees they work on.
//!
//! The executor and the file-op engine only need two things of a snapshot backend: a read-only
//! tree of a snapshot, and a writable tree over one that can later be committed as a new
//! snapshot. The OCI worker's own [`SnapshotStore`] provides them with overlay mounts of its
//! snapshot directories; other workers (the containerd worker) provide them from their own
//! snapshotter and reuse [`run_exec`](crate::run_exec) and [`run_file_op`](crate::run_file_op).

use std::path::{Path, PathBuf};

use kiln_worker::{Error, SnapshotId, SnapshotView};

use crate::fsx::io_err;
use crate::mount::{mount_overlay, Mounted};
use crate::native::{self, Recorded};
use crate::snapshot::{random_id, PendingSnapshot, SnapshotMeta, SnapshotStore, Snapshotter};

/// A snapshot backend seen by the executor and the file-op engine.
///
/// Both methods may block (mounts, remote calls); callers run them off the async executor or
/// accept the short block.
pub trait Trees: Send + Sync {
    /// A read-only tree of `id` (`None` = an empty tree). `mount_point` is an empty directory
    /// the implementation may mount on; the returned view may also point elsewhere.
    fn view(&self, id: Option<&SnapshotId>, mount_point: &Path) -> Result<SnapshotView, Error>;

    /// A writable tree whose initial content is `parent` (`None` = empty). `mount_point` is an
    /// empty directory the implementation may mount on. Dropping the result without
    /// [`ActiveTree::commit`] discards it.
    fn activate(
        &self,
        parent: Option<&SnapshotId>,
        mount_point: &Path,
    ) -> Result<Box<dyn ActiveTree>, Error>;
}

/// A writable tree being changed; see [`Trees::activate`].
pub trait ActiveTree: Send {
    /// The root of the tree on the host.
    fn path(&self) -> &Path;

    /// Releases the tree (unmounting it) and commits it as a new immutable snapshot.
    fn commit(self: Box<Self>) -> Result<SnapshotId, Error>;
}

impl Trees for SnapshotStore {
    fn view(&self, id: Option<&SnapshotId>, mount_point: &Path) -> Result<SnapshotView, Error> {
        let lowers = match id {
            Some(id) => self.lowers(id)?,
            None => Vec::new(),
        };
        match lowers.len() {
            0 => Ok(SnapshotView::new(mount_point.to_path_buf(), None)),
            1 => Ok(SnapshotView::new(lowers[0].clone(), None)),
            _ if self.snapshotter == Snapshotter::Native => {
                let copy = CopiedTree(mount_point.to_path_buf());
                native::materialize(&lowers, mount_point)
                    .map_err(io_err("copy snapshot chain into", mount_point))?;
                Ok(SnapshotView::new(
                    mount_point.to_path_buf(),
                    Some(Box::new(copy)),
                ))
            }
            _ => {
                let userxattr = self.xattrs == kiln_image::layer::OverlayXattrs::User;
                let mounted = mount_overlay(&lowers, None, mount_point, userxattr)?;
                Ok(SnapshotView::new(
                    mount_point.to_path_buf(),
                    Some(Box::new(mounted)),
                ))
            }
        }
    }

    fn activate(
        &self,
        parent: Option<&SnapshotId>,
        mount_point: &Path,
    ) -> Result<Box<dyn ActiveTree>, Error> {
        let pending = self.prepare()?;
        let upper = pending.fs_path();
        let lowers = match parent {
            Some(id) => self.lowers(id)?,
            None => Vec::new(),
        };
        if lowers.is_empty() {
            return Ok(Box::new(OciActive {
                mount: None,
                path: upper,
                pending,
                parent: parent.cloned(),
            }));
        }
        if self.snapshotter == Snapshotter::Native {
            let copy = CopiedTree(mount_point.to_path_buf());
            let recorded = native::materialize(&lowers, mount_point)
                .map_err(io_err("copy snapshot chain into", mount_point))?;
            return Ok(Box::new(NativeActive {
                copy,
                recorded,
                pending,
                parent: parent.cloned(),
            }));
        }
        let work = pending.scratch_dir("work")?;
        let userxattr = self.xattrs == kiln_image::layer::OverlayXattrs::User;
        let mount = mount_overlay(&lowers, Some((&upper, &work)), mount_point, userxattr)?;
        Ok(Box::new(OciActive {
            mount: Some(mount),
            path: mount_point.to_path_buf(),
            pending,
            parent: parent.cloned(),
        }))
    }
}

/// A pending OCI snapshot, overlay-mounted over its parent chain when it has one.
///
/// Field order matters: the mount is dropped (unmounted) before the pending snapshot's
/// directory is removed.
struct OciActive {
    mount: Option<Mounted>,
    path: PathBuf,
    pending: PendingSnapshot,
    parent: Option<SnapshotId>,
}

impl ActiveTree for OciActive {
    fn path(&self) -> &Path {
        &self.path
    }

    fn commit(self: Box<Self>) -> Result<SnapshotId, Error> {
        let this = *self;
        if let Some(m) = this.mount {
            m.unmount()?;
        }
        let id = random_id();
        this.pending.commit(
            &id,
            &SnapshotMeta {
                parent: this.parent,
                ..Default::default()
            },
        )?;
        Ok(id)
    }
}

/// A copy of a snapshot chain (the `native` snapshotter), removed when dropped.
struct CopiedTree(PathBuf);

impl Drop for CopiedTree {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "failed to remove copied tree");
            }
        }
    }
}

/// A pending snapshot of the `native` snapshotter: a copy of the parent chain, diffed into the
/// pending upper at commit.
struct NativeActive {
    copy: CopiedTree,
    recorded: Recorded,
    pending: PendingSnapshot,
    parent: Option<SnapshotId>,
}

impl ActiveTree for NativeActive {
    fn path(&self) -> &Path {
        &self.copy.0
    }

    fn commit(self: Box<Self>) -> Result<SnapshotId, Error> {
        let this = *self;
        let upper = this.pending.fs_path();
        native::diff_into(&this.copy.0, &this.recorded, &upper)
            .map_err(io_err("record the changes of", &this.copy.0))?;
        drop(this.copy);
        let id = random_id();
        this.pending.commit(
            &id,
            &SnapshotMeta {
                parent: this.parent,
                ..Default::default()
            },
        )?;
        Ok(id)
    }
}
