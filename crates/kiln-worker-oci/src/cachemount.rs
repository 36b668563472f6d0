//! Directories behind `RUN --mount=type=cache`: `<worker>/cachemounts/<name>/{fs,meta.json}`.
//!
//! `<name>` is the sha256 of the cache id; `private` sharing adds `-<n>` for each concurrent user
//! beyond the first. The directories persist across builds and restarts; they are mutable, so
//! their size is measured at every `DiskUsage`. Usage records name them `cachemount-<name>`, so
//! one worker `prune` call covers snapshots and cache mounts.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use kiln_proto::pb;
use kiln_worker::{Error, RecordType, SnapshotUsage};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::fsx::io_err;
use crate::snapshot::{self, disk_usage, lock, now_secs, random_id, Hold, SharedRefs};

/// Prefix of cache mount ids in usage records.
pub(crate) const PREFIX: &str = "cachemount-";
const META: &str = "meta.json";
const FS: &str = "fs";

/// What `meta.json` of a cache mount records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CacheMeta {
    /// The cache id of the mount (`id=` in the Dockerfile, the target path by default).
    id: String,
    /// `cached mount <dest> from exec <args>` of the first user.
    description: String,
    /// Seconds since the epoch.
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_used: Option<u64>,
    #[serde(default)]
    usage_count: u64,
}

/// The cache mount directories of one worker.
#[derive(Debug)]
pub struct CacheMounts {
    dir: PathBuf,
    refs: SharedRefs,
    /// One lock per cache id, for `sharing=locked`.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A cache directory in use by one exec; releases it when dropped.
#[derive(Debug)]
pub(crate) struct CacheMountGuard {
    /// The directory to bind-mount.
    pub path: PathBuf,
    /// Whether it was created for this use (so it may be seeded from the mount's input).
    pub created: bool,
    _hold: Hold,
    _lock: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl CacheMounts {
    /// The cache mounts under `dir` (created on first use), with their own in-use tracking.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            refs: SharedRefs::default(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the cache directory of `id` for one exec, following `sharing`: `shared` hands out
    /// the same directory to everyone, `locked` waits until no one else holds it, `private`
    /// hands out a directory no one else holds (a fresh one if all are taken).
    pub(crate) async fn acquire(
        &self,
        id: &str,
        sharing: pb::CacheSharingOpt,
        description: &str,
    ) -> Result<CacheMountGuard, Error> {
        let base = hex::encode(sha2::Sha256::digest(id.as_bytes()));
        let lock_guard = if sharing == pb::CacheSharingOpt::Locked {
            let mutex = {
                let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
                locks.entry(base.clone()).or_default().clone()
            };
            Some(mutex.lock_owned().await)
        } else {
            None
        };
        let (name, hold) = {
            let mut refs = lock(&self.refs);
            let name = if sharing == pb::CacheSharingOpt::Private {
                (0..)
                    .map(|n| {
                        if n == 0 {
                            base.clone()
                        } else {
                            format!("{base}-{n}")
                        }
                    })
                    .find(|name| !refs.in_use(&format!("{PREFIX}{name}")))
                    .unwrap_or_else(|| format!("{base}-{}", random_id()))
            } else {
                base.clone()
            };
            let record = format!("{PREFIX}{name}");
            refs.take(&record);
            (name, Hold::adopt(&self.refs, vec![record]))
        };
        let dir = self.dir.join(&name);
        let fs_dir = dir.join(FS);
        let meta_path = dir.join(META);
        let mut meta: CacheMeta = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let created = !fs_dir.is_dir() || meta.created == 0;
        fs::create_dir_all(&fs_dir).map_err(io_err("create", &fs_dir))?;
        if created {
            meta = CacheMeta {
                id: id.to_string(),
                description: description.to_string(),
                created: now_secs(),
                ..Default::default()
            };
        }
        meta.last_used = Some(now_secs());
        meta.usage_count += 1;
        write_meta(&dir, &meta)?;
        Ok(CacheMountGuard {
            path: fs_dir,
            created,
            _hold: hold,
            _lock: lock_guard,
        })
    }

    /// Usage of every cache directory.
    pub(crate) fn usage(&self) -> Vec<SnapshotUsage> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        let refs = lock(&self.refs);
        let mut dirs = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !snapshot::valid_id(&name) {
                continue;
            }
            let in_use = refs.in_use(&format!("{PREFIX}{name}"));
            dirs.push((name, entry.path(), in_use));
        }
        drop(refs);
        for (name, path, in_use) in dirs {
            let Some(meta) = fs::read(path.join(META))
                .ok()
                .and_then(|b| serde_json::from_slice::<CacheMeta>(&b).ok())
            else {
                continue;
            };
            let secs = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
            out.push(SnapshotUsage {
                id: format!("{PREFIX}{name}"),
                parent: None,
                size: disk_usage(&path.join(FS)),
                created: secs(meta.created),
                last_used: meta.last_used.map(secs),
                usage_count: meta.usage_count,
                in_use,
                record_type: RecordType::ExecCacheMount,
                description: meta.description,
                mutable: true,
                shared: false,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Removes the cache directories of `ids` (with [`PREFIX`]) that no exec holds.
    pub(crate) fn remove_unused(&self, ids: &[String]) -> Vec<String> {
        let wanted: HashSet<&str> = ids
            .iter()
            .filter_map(|id| id.strip_prefix(PREFIX))
            .collect();
        let mut renamed = Vec::new();
        {
            let refs = lock(&self.refs);
            for name in wanted {
                if !snapshot::valid_id(name) || refs.in_use(&format!("{PREFIX}{name}")) {
                    continue;
                }
                let from = self.dir.join(name);
                if !from.join(META).is_file() {
                    continue;
                }
                let to = self.dir.join(format!(".deleting-{}", random_id()));
                match fs::rename(&from, &to) {
                    Ok(()) => renamed.push((format!("{PREFIX}{name}"), to)),
                    Err(e) => {
                        tracing::warn!(path = %from.display(), error = %e, "failed to prune cache mount")
                    }
                }
            }
        }
        let mut removed = Vec::new();
        for (id, path) in renamed {
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "failed to remove pruned cache mount");
            }
            removed.push(id);
        }
        removed.sort();
        removed
    }
}

fn write_meta(dir: &Path, meta: &CacheMeta) -> Result<(), Error> {
    let path = dir.join(META);
    let tmp = dir.join(format!("{META}.{}.tmp", random_id()));
    let bytes = serde_json::to_vec(meta).map_err(|e| Error::Io {
        op: "encode",
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("rename", &path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sharing_modes() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = CacheMounts::new(dir.path().to_path_buf());
        let shared = pb::CacheSharingOpt::Shared;
        let a = mounts.acquire("go", shared, "d").await.unwrap();
        let b = mounts.acquire("go", shared, "d").await.unwrap();
        assert_eq!(a.path, b.path);
        assert!(a.created);
        assert!(!b.created);

        let private = pb::CacheSharingOpt::Private;
        let p1 = mounts.acquire("p", private, "d").await.unwrap();
        let p2 = mounts.acquire("p", private, "d").await.unwrap();
        assert_ne!(p1.path, p2.path);
        drop(p2);
        let p3 = mounts.acquire("p", private, "d").await.unwrap();
        assert!(!p3.created, "a released private dir is reused");

        let locked = pb::CacheSharingOpt::Locked;
        let l1 = mounts.acquire("l", locked, "d").await.unwrap();
        let waiting = mounts.acquire("l", locked, "d");
        let timed = tokio::time::timeout(Duration::from_millis(100), waiting).await;
        assert!(timed.is_err(), "a second locked user waits");
        drop(l1);
        let l2 = mounts.acquire("l", locked, "d").await.unwrap();

        // Usage lists all; in-use ones are not pruned.
        let usage = mounts.usage();
        assert_eq!(usage.len(), 4, "{usage:?}");
        assert!(usage.iter().all(|u| u.in_use && u.mutable));
        let ids: Vec<String> = usage.iter().map(|u| u.id.clone()).collect();
        assert!(mounts.remove_unused(&ids).is_empty());
        drop(p3);
        let removed = mounts.remove_unused(&ids);
        assert_eq!(
            removed.len(),
            1,
            "only the released private dir: {removed:?}"
        );
        drop((a, b, p1, l2));
        let removed = mounts.remove_unused(&ids);
        assert_eq!(removed.len(), 3);
        assert!(mounts.usage().is_empty());
    }
}
