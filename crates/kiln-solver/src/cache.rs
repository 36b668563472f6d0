//! Persistent cache records: cache key → the snapshots a vertex produced.
//!
//! One small JSON file per record under `<state>/cache/`, written to a
//! temporary name, fsynced and renamed, so a killed daemon leaves either the
//! old record or the new one, never half of one. A record whose snapshots no
//! longer exist in the worker is a miss.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::Error;

/// What a vertex produced, by output index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Snapshot per output (`None` = scratch).
    pub outputs: Vec<Option<String>>,
    /// The vertex name when the record was made (for `du` and debugging).
    #[serde(default)]
    pub description: String,
    /// Seconds since the epoch.
    #[serde(default)]
    pub created: u64,
}

/// A cache key: hex of a sha256 over everything that determines a result.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    /// Builds a key from labelled parts; the labels keep parts of different
    /// kinds from colliding.
    pub fn from_parts<'a>(parts: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"kiln-cache-v1\0");
        for (label, bytes) in parts {
            hasher.update((label.len() as u64).to_le_bytes());
            hasher.update(label.as_bytes());
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        Self(hex::encode(hasher.finalize()))
    }

    /// A key from its hex form (as [`as_str`](Self::as_str) gives it);
    /// `None` unless it is 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let valid = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| Self(hex.to_string()))
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes `bytes` to `path` through a temporary file unique to this write, synced and then
/// renamed: readers see the old content or the new, and concurrent writers of one path
/// (two builds storing the same key) cannot collide; the last rename wins.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", crate::http::unique_suffix()));
    let written = fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    let result = written.and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The on-disk record store.
#[derive(Clone, Debug)]
pub struct CacheRecords {
    dir: PathBuf,
}

impl CacheRecords {
    /// Opens (creating) the store in `dir`, removing leftovers of
    /// interrupted writes. Open a directory once per process and share the
    /// (cheaply cloned) store: the sweep would also remove a concurrent
    /// writer's temporary file.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.json", key.as_str()))
    }

    /// The record for `key`, if any. An unreadable record counts as absent.
    pub fn get(&self, key: &CacheKey) -> Option<CacheRecord> {
        let bytes = fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores a record atomically, made now.
    pub fn put(
        &self,
        key: &CacheKey,
        outputs: &[Option<String>],
        description: &str,
    ) -> Result<(), Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.put_created(key, outputs, description, now)
    }

    /// Stores a record atomically with its creation time `created`
    /// (seconds since the epoch; an imported result keeps its own).
    pub fn put_created(
        &self,
        key: &CacheKey,
        outputs: &[Option<String>],
        description: &str,
        created: u64,
    ) -> Result<(), Error> {
        let record = CacheRecord {
            outputs: outputs.to_vec(),
            description: description.to_string(),
            created,
        };
        let path = self.path(key);
        let bytes = serde_json::to_vec(&record).map_err(std::io::Error::other);
        bytes
            .and_then(|bytes| write_atomically(&path, &bytes))
            .map_err(|source| Error::Io { path, source })
    }

    /// Removes the record with hex key `key` (absent is fine).
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        let path = self.dir.join(format!("{key}.json"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// Every record, for disk-usage reporting.
    pub fn all(&self) -> Vec<(String, CacheRecord)> {
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(key) = name.strip_suffix(".json") {
                    if let Ok(bytes) = fs::read(entry.path()) {
                        if let Ok(record) = serde_json::from_slice(&bytes) {
                            out.push((key.to_string(), record));
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_parts() {
        let a = CacheKey::from_parts([("a", b"bc".as_slice())]);
        let b = CacheKey::from_parts([("ab", b"c".as_slice())]);
        let c = CacheKey::from_parts([("a", b"b".as_slice()), ("", b"c".as_slice())]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, CacheKey::from_parts([("a", b"bc".as_slice())]));
        assert_eq!(CacheKey::from_hex(a.as_str()), Some(a.clone()));
        assert_eq!(CacheKey::from_hex("abc"), None);
        assert_eq!(CacheKey::from_hex(&a.as_str().to_uppercase()), None);
    }

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let records = CacheRecords::open(dir.path()).unwrap();
        let key = CacheKey::from_parts([("op", b"x".as_slice())]);
        assert!(records.get(&key).is_none());
        records
            .put(&key, &[Some("snap1".into()), None], "RUN x")
            .unwrap();
        std::fs::write(dir.path().join("junk.1.tmp"), b"{").unwrap();
        let reopened = CacheRecords::open(dir.path()).unwrap();
        let record = reopened.get(&key).unwrap();
        assert_eq!(record.outputs, vec![Some("snap1".to_string()), None]);
        assert!(!dir.path().join("junk.1.tmp").exists());
        assert_eq!(reopened.all().len(), 1);
        reopened.remove(key.as_str()).unwrap();
        reopened.remove(key.as_str()).unwrap();
        assert!(reopened.get(&key).is_none());
    }

    #[test]
    fn concurrent_puts_of_one_key_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let records = CacheRecords::open(dir.path()).unwrap();
        let key = CacheKey::from_parts([("image", b"sha256:x".as_slice())]);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (records, key) = (records.clone(), key.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        records
                            .put(&key, &[Some(format!("snap{i}"))], "FROM x")
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(records.get(&key).is_some());
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
