//! Committed snapshots on disk: `<dir>/<id>/{fs,meta.json}`.
//!
//! A snapshot is written completely under `<dir>/.tmp-<random>/` and then renamed to its id, so a
//! reader never sees a half-written one; leftovers of a crash are removed by [`SnapshotStore::open`].
//! `fs` holds the snapshot's own changes over its parent as an overlayfs upper dir (overlay
//! whiteouts), so the full tree of a snapshot is the overlay of its chain.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_image::layer::OverlayXattrs;
use kiln_image::oci::Descriptor;
use kiln_image::Digest;
use kiln_worker::{Error, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::fsx::io_err;

const TMP_PREFIX: &str = ".tmp-";
const META: &str = "meta.json";
const FS: &str = "fs";
const USAGE: &str = "usage.json";
const DELETING: &str = ".tmp-deleting-";

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
    /// When it was committed (seconds since the epoch); older snapshots use the directory's
    /// modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// Where it came from (`pulled from …`, `mount / from exec …`), for `DiskUsage`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// BuildKit record type when not `regular` (`source.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_type: Option<String>,
}

/// What `usage.json` records: how a snapshot has been used, and its size once measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UsageMeta {
    /// Last use, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<u64>,
    /// Number of uses.
    #[serde(default)]
    pub usage_count: u64,
    /// Bytes of `fs`, measured once (snapshots are immutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// How long a freshly committed snapshot counts as in use when nobody has taken a lease on it:
/// long enough to cover the moment between an op returning its outputs and the solver leasing
/// them, short enough that a commit whose result was dropped becomes prunable again.
const FRESH_FOR: Duration = Duration::from_secs(600);

/// In-use tracking shared by every clone of a store (and the cache mounts).
#[derive(Debug, Default)]
pub(crate) struct Refs {
    counts: HashMap<String, usize>,
    fresh: HashMap<String, Instant>,
}

impl Refs {
    /// Whether `id` is held or freshly committed.
    pub(crate) fn in_use(&self, id: &str) -> bool {
        self.counts.get(id).is_some_and(|c| *c > 0)
            || self.fresh.get(id).is_some_and(|t| t.elapsed() < FRESH_FOR)
    }

    /// Counts one more user of `id`; pair with [`Hold::adopt`].
    pub(crate) fn take(&mut self, id: &str) {
        *self.counts.entry(id.to_string()).or_default() += 1;
        self.fresh.remove(id);
    }

    fn mark_fresh(&mut self, id: &str) {
        self.fresh.insert(id.to_string(), Instant::now());
    }
}

/// Shared handle on [`Refs`].
pub(crate) type SharedRefs = Arc<Mutex<Refs>>;

/// Locks the refs, recovering from a poisoned lock (the data stays consistent: every
/// update is a single map operation).
pub(crate) fn lock(refs: &SharedRefs) -> MutexGuard<'_, Refs> {
    refs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds ids in use until dropped.
#[derive(Debug)]
pub(crate) struct Hold {
    refs: SharedRefs,
    ids: Vec<String>,
}

impl Hold {
    /// Wraps counts already taken with [`Refs::take`].
    pub(crate) fn adopt(refs: &SharedRefs, ids: Vec<String>) -> Self {
        Self {
            refs: refs.clone(),
            ids,
        }
    }

    /// Takes a hold on `ids`; a hold claims (ends) the fresh mark of a new snapshot.
    pub(crate) fn new(refs: &SharedRefs, ids: &[String]) -> Self {
        let mut guard = lock(refs);
        for id in ids {
            *guard.counts.entry(id.clone()).or_default() += 1;
            guard.fresh.remove(id);
        }
        drop(guard);
        Self {
            refs: refs.clone(),
            ids: ids.to_vec(),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut guard = lock(&self.refs);
        for id in &self.ids {
            if let Some(count) = guard.counts.get_mut(id) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    guard.counts.remove(id);
                }
            }
        }
    }
}

/// How the trees of snapshots are assembled from their `fs` dirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshotter {
    /// overlayfs mounts of the chain (BuildKit's `overlayfs`).
    Overlayfs,
    /// Copies of the chain, diffed back into an upper dir at commit (BuildKit's `native`): no
    /// mount needed, for kernels or filesystems where overlayfs cannot be mounted.
    Native,
}

impl Snapshotter {
    /// BuildKit's name (`overlayfs`, `native`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Overlayfs => "overlayfs",
            Self::Native => "native",
        }
    }
}

/// The directory of committed snapshots.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotStore {
    dir: PathBuf,
    refs: SharedRefs,
    /// How trees are assembled.
    pub(crate) snapshotter: Snapshotter,
    /// Where the `fs` dirs keep overlayfs' attributes (`user.*` in a user namespace).
    pub(crate) xattrs: OverlayXattrs,
}

/// A snapshot being written: its `fs` dir is writable until [`PendingSnapshot::commit`]. Dropping
/// it without committing removes it.
#[derive(Debug)]
pub(crate) struct PendingSnapshot {
    tmp: PathBuf,
    store: PathBuf,
    refs: SharedRefs,
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
            refs: SharedRefs::default(),
            snapshotter: Snapshotter::Overlayfs,
            xattrs: OverlayXattrs::Trusted,
        })
    }

    /// The same store assembling trees with `snapshotter`, overlay attributes in `xattrs`.
    pub(crate) fn with_layout(mut self, snapshotter: Snapshotter, xattrs: OverlayXattrs) -> Self {
        self.snapshotter = snapshotter;
        self.xattrs = xattrs;
        self
    }

    /// The in-use tracking of this store.
    pub(crate) fn refs(&self) -> &SharedRefs {
        &self.refs
    }

    /// Holds `ids` in use until the returned value is dropped.
    pub(crate) fn hold(&self, ids: &[String]) -> Hold {
        Hold::new(&self.refs, ids)
    }

    /// Keeps `id` from being pruned until someone holds it (or for [`FRESH_FOR`]).
    pub(crate) fn mark_fresh(&self, id: &str) {
        lock(&self.refs).mark_fresh(id);
    }

    /// Every committed snapshot with its metadata (unreadable ones are skipped).
    pub(crate) fn list(&self) -> Vec<(SnapshotId, SnapshotMeta)> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !valid_id(&id) {
                continue;
            }
            if let Ok(meta) = self.meta(&id) {
                out.push((id, meta));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// When `id` was committed.
    pub(crate) fn created(&self, id: &str, meta: &SnapshotMeta) -> SystemTime {
        match meta.created {
            Some(secs) => UNIX_EPOCH + Duration::from_secs(secs),
            None => fs::metadata(self.dir.join(id).join(META))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH),
        }
    }

    /// The usage record of `id` (empty when never written).
    pub(crate) fn usage_meta(&self, id: &str) -> UsageMeta {
        fs::read(self.dir.join(id).join(USAGE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_usage(&self, id: &str, usage: &UsageMeta) -> Result<(), Error> {
        let dir = self.dir.join(id);
        let tmp = dir.join(format!("{USAGE}.{}.tmp", random_id()));
        write_json(&tmp, usage)?;
        let path = dir.join(USAGE);
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("rename", &path)(e)
        })
    }

    /// The size of `id`'s own data, measured on first request and remembered.
    pub(crate) fn size(&self, id: &str) -> u64 {
        let mut usage = self.usage_meta(id);
        if let Some(size) = usage.size {
            return size;
        }
        let size = disk_usage(&self.fs_path(id));
        usage.size = Some(size);
        if let Err(e) = self.write_usage(id, &usage) {
            tracing::debug!(id, error = %e, "failed to remember snapshot size");
        }
        size
    }

    /// Records a use of `id` now (atomically replaces `usage.json`).
    pub(crate) fn record_use(&self, id: &str) -> Result<(), Error> {
        if !self.exists(id) {
            return Ok(());
        }
        let mut usage = self.usage_meta(id);
        usage.usage_count += 1;
        usage.last_used = Some(now_secs());
        self.write_usage(id, &usage)
    }

    /// Removes the snapshots of `ids` that are not in use and not the parent of a snapshot that
    /// stays; returns those removed. Decided and renamed away under the refs lock, so a
    /// concurrent [`hold`](Self::hold) either wins (the snapshot stays) or sees it gone.
    pub(crate) fn remove_unused(&self, ids: &[String]) -> Result<Vec<SnapshotId>, Error> {
        let all = self.list();
        let guard = lock(&self.refs);
        let mut removable: HashSet<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| all.iter().any(|(a, _)| a == id) && !guard.in_use(id))
            .collect();
        // A parent stays while any child that is not removed stays.
        loop {
            let kept_parents: HashSet<&str> = all
                .iter()
                .filter(|(id, _)| !removable.contains(id.as_str()))
                .filter_map(|(_, meta)| meta.parent.as_deref())
                .collect();
            let before = removable.len();
            removable.retain(|id| !kept_parents.contains(id));
            if removable.len() == before {
                break;
            }
        }
        let mut renamed = Vec::new();
        for (id, _) in &all {
            if !removable.contains(id.as_str()) {
                continue;
            }
            let from = self.dir.join(id);
            let to = self.dir.join(format!("{DELETING}{}", random_id()));
            fs::rename(&from, &to).map_err(io_err("rename", &from))?;
            renamed.push((id.clone(), to));
        }
        drop(guard);
        sync_dir(&self.dir);
        let mut removed = Vec::with_capacity(renamed.len());
        for (id, path) in renamed {
            if let Err(e) = fs::remove_dir_all(&path) {
                // Invisible already; `open` removes what is left.
                tracing::warn!(path = %path.display(), error = %e, "failed to remove pruned snapshot");
            }
            removed.push(id);
        }
        Ok(removed)
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
            refs: self.refs.clone(),
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
    /// A new snapshot counts as in use for a while (see [`FRESH_FOR`]), so it survives until its
    /// caller leases it.
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
        let mut meta = meta.clone();
        meta.created.get_or_insert_with(now_secs);
        write_json(&self.tmp.join(META), &meta)?;
        sync_dir(&self.tmp);
        lock(&self.refs).mark_fresh(id);
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

/// Seconds since the epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Bytes used by the files under `path` (apparent sizes, hard links counted once), as `du
/// --apparent-size` would say; directories count zero.
pub(crate) fn disk_usage(path: &Path) -> u64 {
    fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>, total: &mut u64) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(&entry.path(), seen, total);
            } else if meta.nlink() <= 1 || seen.insert((meta.dev(), meta.ino())) {
                *total += meta.len();
            }
        }
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    walk(path, &mut seen, &mut total);
    total
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
