//! Committed snapshots on disk: `<dir>/<id>/{fs,meta.json}`.
//!
//! A snapshot is written completely under `<dir>/.tmp-<random>/` and then renamed to its id, so a
//! reader never sees a half-written one; leftovers of a crash are removed by [`SnapshotStore::open`].
//! `fs` holds the snapshot's own changes over its parent as an overlayfs upper dir (overlay
//! whiteouts), so the full tree of a snapshot is the overlay of its chain.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kiln_image::oci::Descriptor;
use kiln_image::Digest;
use kiln_worker::{Error, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::fsx::io_err;

const TMP_PREFIX: &str = ".tmp-";
const META: &str = "meta.json";
const FS: &str = "fs";

/// What `meta.json` records about a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotMeta {
    /// The snapshot below this one, `None` for a base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<SnapshotId>,
    /// Digest of the uncompressed layer tar of `fs`, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
    /// The compressed layer blob in the content store, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<Descriptor>,
}

/// The directory of committed snapshots.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotStore {
    dir: PathBuf,
}

/// A snapshot being written: its `fs` dir is writable until [`PendingSnapshot::commit`]. Dropping
/// it without committing removes it.
#[derive(Debug)]
pub(crate) struct PendingSnapshot {
    tmp: PathBuf,
    store: PathBuf,
    committed: bool,
}

/// Snapshot ids are used as directory names: only a conservative alphabet is accepted.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh random snapshot id (32 hex digits).
pub(crate) fn random_id() -> SnapshotId {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

impl SnapshotStore {
    /// Opens (creating) the store and removes uncommitted leftovers.
    pub(crate) fn open(dir: &Path) -> Result<Self, Error> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
            let entry = entry.map_err(io_err("read", dir))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                tracing::info!(path = %path.display(), "removing uncommitted snapshot");
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory holding the snapshot's own changes.
    pub(crate) fn fs_path(&self, id: &str) -> PathBuf {
        self.dir.join(id).join(FS)
    }

    /// Whether `id` is committed.
    pub(crate) fn exists(&self, id: &str) -> bool {
        valid_id(id) && self.dir.join(id).join(META).is_file()
    }

    /// Reads the metadata of `id`.
    pub(crate) fn meta(&self, id: &str) -> Result<SnapshotMeta, Error> {
        if !self.exists(id) {
            return Err(Error::SnapshotNotFound { id: id.to_string() });
        }
        let path = self.dir.join(id).join(META);
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            op: "parse",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }

    /// Replaces the metadata of a committed snapshot (write to a temp file, then rename).
    pub(crate) fn update_meta(&self, id: &str, meta: &SnapshotMeta) -> Result<(), Error> {
        if !self.exists(id) {
            return Err(Error::SnapshotNotFound { id: id.to_string() });
        }
        let dir = self.dir.join(id);
        let tmp = dir.join(format!("{META}.{}.tmp", random_id()));
        write_json(&tmp, meta)?;
        let path = dir.join(META);
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("rename", &path)(e)
        })
    }

    /// The chain ending at `id`, bottom → top, with each snapshot's metadata.
    pub(crate) fn chain(&self, id: &str) -> Result<Vec<(SnapshotId, SnapshotMeta)>, Error> {
        let mut chain = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(current) = next {
            let meta = self.meta(&current)?;
            next = meta.parent.clone();
            chain.push((current, meta));
            if chain.len() > 10_000 {
                return Err(Error::InvalidOp {
                    op: "snapshot chain",
                    reason: format!("chain of {id} is cyclic or too deep"),
                });
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// The `fs` dirs of the chain ending at `id`, top first (overlay `lowerdir` order).
    pub(crate) fn lowers(&self, id: &str) -> Result<Vec<PathBuf>, Error> {
        Ok(self
            .chain(id)?
            .iter()
            .rev()
            .map(|(id, _)| self.fs_path(id))
            .collect())
    }

    /// Starts a new snapshot with an empty `fs` dir.
    pub(crate) fn prepare(&self) -> Result<PendingSnapshot, Error> {
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}", random_id()));
        let fs_dir = tmp.join(FS);
        fs::create_dir_all(&fs_dir).map_err(io_err("create", &fs_dir))?;
        Ok(PendingSnapshot {
            tmp,
            store: self.dir.clone(),
            committed: false,
        })
    }
}

impl PendingSnapshot {
    /// The writable `fs` dir.
    pub(crate) fn fs_path(&self) -> PathBuf {
        self.tmp.join(FS)
    }

    /// The private directory of this pending snapshot, for scratch dirs that must live on the
    /// same filesystem (an overlay `workdir`). Everything but `fs` is removed at commit.
    pub(crate) fn scratch_dir(&self, name: &str) -> Result<PathBuf, Error> {
        let dir = self.tmp.join(name);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(dir)
    }

    /// Commits under `id`. When `id` already exists (same content reached twice, for example the
    /// same layer pulled concurrently) the existing snapshot is kept and this one discarded.
    pub(crate) fn commit(mut self, id: &str, meta: &SnapshotMeta) -> Result<(), Error> {
        if !valid_id(id) {
            return Err(Error::InvalidOp {
                op: "snapshot commit",
                reason: format!("invalid snapshot id {id:?}"),
            });
        }
        for entry in fs::read_dir(&self.tmp).map_err(io_err("read", &self.tmp))? {
            let entry = entry.map_err(io_err("read", &self.tmp))?;
            if entry.file_name() != FS {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            }
        }
        write_json(&self.tmp.join(META), meta)?;
        sync_dir(&self.tmp);
        let target = self.store.join(id);
        match fs::rename(&self.tmp, &target) {
            Ok(()) => {
                self.committed = true;
                sync_dir(&self.store);
                Ok(())
            }
            Err(_) if target.join(META).is_file() => {
                tracing::debug!(id, "snapshot already committed, discarding duplicate");
                Ok(())
            }
            Err(e) => Err(io_err("rename", &target)(e)),
        }
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.tmp) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.tmp.display(), error = %e, "failed to remove pending snapshot");
                }
            }
        }
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), Error> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Io {
        op: "encode",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    let mut file = fs::File::create(path).map_err(io_err("create", path))?;
    file.write_all(&bytes).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_is_atomic_and_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let pending = store.prepare().unwrap();
        fs::write(pending.fs_path().join("a"), b"x").unwrap();
        pending.scratch_dir("work").unwrap();
        // Not yet visible.
        assert!(!store.exists("s1"));
        pending
            .commit(
                "s1",
                &SnapshotMeta {
                    parent: None,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(store.exists("s1"));
        assert_eq!(fs::read(store.fs_path("s1").join("a")).unwrap(), b"x");
        assert!(!dir.path().join("s1").join("work").exists());

        // A pending snapshot left behind (crash) disappears on open; a dropped one at once.
        let left = store.prepare().unwrap();
        let left_path = left.tmp.clone();
        std::mem::forget(left);
        assert!(left_path.exists());
        let dropped = store.prepare().unwrap();
        let dropped_path = dropped.tmp.clone();
        drop(dropped);
        assert!(!dropped_path.exists());
        let store = SnapshotStore::open(dir.path()).unwrap();
        assert!(!left_path.exists());
        assert!(store.exists("s1"));
    }

    #[test]
    fn chain_is_bottom_to_top_and_lowers_top_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let mut parent = None;
        for id in ["a", "b", "c"] {
            let p = store.prepare().unwrap();
            p.commit(
                id,
                &SnapshotMeta {
                    parent: parent.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
            parent = Some(id.to_string());
        }
        let chain: Vec<_> = store
            .chain("c")
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(chain, ["a", "b", "c"]);
        assert_eq!(store.lowers("c").unwrap()[0], store.fs_path("c"));
        assert!(matches!(
            store.chain("nope"),
            Err(Error::SnapshotNotFound { .. })
        ));
        assert!(!store.exists("../c"));
    }

    #[test]
    fn duplicate_commit_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let first = store.prepare().unwrap();
        fs::write(first.fs_path().join("f"), b"1").unwrap();
        first.commit("x", &SnapshotMeta::default()).unwrap();
        let second = store.prepare().unwrap();
        fs::write(second.fs_path().join("f"), b"2").unwrap();
        second.commit("x", &SnapshotMeta::default()).unwrap();
        assert_eq!(fs::read(store.fs_path("x").join("f")).unwrap(), b"1");
        let leftovers = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(TMP_PREFIX)
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
