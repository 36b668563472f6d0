//! `layers.json`: which compressed blob each snapshot was exported as (or pulled from), so a
//! snapshot is compressed once.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_image::oci::Descriptor;
use kiln_image::Digest;
use kiln_worker::{Error, SnapshotId};
use serde::{Deserialize, Serialize};

/// The layer blob of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// The compressed blob.
    pub descriptor: Descriptor,
    /// The digest of the uncompressed tar.
    pub diff_id: Digest,
}

/// The snapshot → layer map, persisted as JSON after every change.
#[derive(Debug)]
pub(crate) struct LayerDb {
    path: PathBuf,
    records: BTreeMap<SnapshotId, LayerRecord>,
}

impl LayerDb {
    /// Loads `path` (an absent file is an empty db).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let records = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Io {
                op: "parse",
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(Error::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            records,
        })
    }

    /// The record of `id`.
    pub fn get(&self, id: &str) -> Option<&LayerRecord> {
        self.records.get(id)
    }

    /// Records `id` → `record` and saves (write to a temporary file, then rename).
    pub fn insert(&mut self, id: &str, record: LayerRecord) -> Result<(), Error> {
        if self.records.get(id) == Some(&record) {
            return Ok(());
        }
        self.records.insert(id.to_string(), record);
        let bytes = serde_json::to_vec_pretty(&self.records).map_err(|e| Error::Io {
            op: "encode",
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        let tmp = self.path.with_extension("tmp");
        let io_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io_err("rename", &self.path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layers.json");
        let record = LayerRecord {
            descriptor: Descriptor::new(
                kiln_image::oci::media_types::OCI_LAYER_GZIP,
                Digest::of(b"blob"),
                4,
            ),
            diff_id: Digest::of(b"tar"),
        };
        let mut db = LayerDb::open(&path).unwrap();
        assert!(db.get("a").is_none());
        db.insert("a", record.clone()).unwrap();
        let reopened = LayerDb::open(&path).unwrap();
        assert_eq!(reopened.get("a"), Some(&record));
    }
}
