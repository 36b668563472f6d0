//! A content-addressed blob store: `<root>/blobs/sha256/<hex>`, ingested through `<root>/ingest/`.
//!
//! Blobs are written to a private temporary file, fsynced, verified and renamed into place, so a
//! reader never sees a partial blob and two writers of the same blob cannot corrupt it (the rename
//! is atomic and both files have the same content).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Digest, Hasher};

/// A content store failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store's directories could not be created.
    #[error("failed to open content store at {path}")]
    Open {
        /// The store root.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The blob is not in the store.
    #[error("blob {digest} not found in content store")]
    NotFound {
        /// The missing blob.
        digest: Digest,
    },
    /// Reading, writing or renaming a file failed.
    #[error("content store i/o failed at {path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The written bytes do not have the expected digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the caller expected.
        expected: Digest,
        /// The digest of the bytes written.
        actual: Digest,
    },
}

/// Result of content store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A blob store on disk. Cheap to clone; safe to share between threads and processes.
#[derive(Debug, Clone)]
pub struct ContentStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    blobs: PathBuf,
    ingest: PathBuf,
}

static INGEST_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ContentStore {
    /// Opens (creating if needed) the store rooted at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let root = dir.as_ref().to_path_buf();
        let blobs = root.join("blobs").join("sha256");
        let ingest = root.join("ingest");
        for d in [&blobs, &ingest] {
            fs::create_dir_all(d).map_err(|source| Error::Open {
                path: root.clone(),
                source,
            })?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                blobs,
                ingest,
            }),
        })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.inner.blobs.join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn has(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The size of the blob.
    pub fn info(&self, digest: &Digest) -> Result<u64> {
        let path = self.path(digest);
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| self.map_missing(digest, path, e))
    }

    /// Opens the blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| self.map_missing(digest, path, e))
    }

    /// Reads the whole blob.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.path(digest);
        fs::read(&path).map_err(|e| self.map_missing(digest, path, e))
    }

    /// Stores `data` and returns its digest (a no-op when already present).
    pub fn write_blob(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::of(data);
        if self.has(&digest) {
            return Ok(digest);
        }
        let mut w = self.writer()?;
        w.write_all(data).map_err(|source| Error::Io {
            path: w.temp_path.clone(),
            source,
        })?;
        w.commit(Some(&digest))?;
        Ok(digest)
    }

    /// Starts writing a blob of not-yet-known digest.
    pub fn writer(&self) -> Result<ContentWriter> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!(
            "{}-{}-{}",
            std::process::id(),
            INGEST_COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        let temp_path = self.inner.ingest.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .map_err(|source| Error::Io {
                path: temp_path.clone(),
                source,
            })?;
        Ok(ContentWriter {
            store: self.clone(),
            file: Some(file),
            temp_path,
            hasher: Hasher::new(),
        })
    }

    /// Removes the blob. Removing a missing blob is an error.
    pub fn delete(&self, digest: &Digest) -> Result<()> {
        let path = self.path(digest);
        fs::remove_file(&path).map_err(|e| self.map_missing(digest, path, e))
    }

    /// Records that the blob `digest` is also stored in the registry repository `source`
    /// (`domain/path`, e.g. `127.0.0.1:5000/busybox`), so a push to another repository of the same
    /// registry can mount it instead of uploading it. Recording a known source is a no-op.
    pub fn add_source(&self, digest: &Digest, source: &str) -> Result<()> {
        let mut sources = self.sources(digest);
        if sources.iter().any(|s| s == source) {
            return Ok(());
        }
        sources.push(source.to_owned());
        let dir = self.inner.root.join("sources");
        fs::create_dir_all(&dir).map_err(|e| Error::Io {
            path: dir.clone(),
            source: e,
        })?;
        let path = dir.join(digest.hex());
        let temp = dir.join(format!(
            ".{}-{}-{}",
            digest.hex(),
            std::process::id(),
            INGEST_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut text = sources.join("\n");
        text.push('\n');
        fs::write(&temp, text).map_err(|e| Error::Io {
            path: temp.clone(),
            source: e,
        })?;
        fs::rename(&temp, &path).map_err(|e| Error::Io { path, source: e })
    }

    /// The registry repositories (`domain/path`) the blob is known to be in, oldest first.
    pub fn sources(&self, digest: &Digest) -> Vec<String> {
        let path = self.inner.root.join("sources").join(digest.hex());
        fs::read_to_string(path)
            .map(|text| {
                text.lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn map_missing(&self, digest: &Digest, path: PathBuf, e: io::Error) -> Error {
        if e.kind() == io::ErrorKind::NotFound {
            Error::NotFound {
                digest: digest.clone(),
            }
        } else {
            Error::Io { path, source: e }
        }
    }
}

/// A blob being written. Dropping it without [`commit`](Self::commit) discards the data.
pub struct ContentWriter {
    store: ContentStore,
    file: Option<File>,
    temp_path: PathBuf,
    hasher: Hasher,
}

impl ContentWriter {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.hasher.size()
    }

    /// Makes the blob visible: fsyncs it, checks it against `expected` (if given) and renames it
    /// into place atomically. Returns its digest and size.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let file = self.file.take();
        if let Some(mut file) = file {
            file.flush().map_err(io_err(&self.temp_path))?;
            file.sync_all().map_err(io_err(&self.temp_path))?;
        }
        let (digest, size) = std::mem::take(&mut self.hasher).finish();
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        let target = self.store.path(&digest);
        fs::rename(&self.temp_path, &target).map_err(io_err(&target))?;
        // The rename happened; make it durable. A failure here leaves a valid blob behind.
        if let Ok(dir) = File::open(&self.store.inner.blobs) {
            if let Err(e) = dir.sync_all() {
                tracing::warn!(error = %e, "failed to fsync blob directory");
            }
        }
        Ok((digest, size))
    }
}

impl Write for ContentWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("content writer already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for ContentWriter {
    fn drop(&mut self) {
        // After a successful commit the temp file was renamed away; otherwise discard it.
        let _ = fs::remove_file(&self.temp_path);
    }
}

/// Copies everything from `reader` into a new blob and commits it against `expected`.
pub fn ingest(
    store: &ContentStore,
    mut reader: impl Read,
    expected: Option<&Digest>,
) -> Result<(Digest, u64)> {
    let mut w = store.writer()?;
    io::copy(&mut reader, &mut w).map_err(|source| Error::Io {
        path: w.temp_path.clone(),
        source,
    })?;
    w.commit(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_info_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.write_blob(b"hello").unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert!(store.has(&d));
        assert_eq!(
            store.path(&d),
            dir.path().join("blobs/sha256").join(d.hex())
        );
        assert_eq!(store.read(&d).unwrap(), b"hello");
        assert_eq!(store.info(&d).unwrap(), 5);
        store.delete(&d).unwrap();
        assert!(!store.has(&d));
        assert!(matches!(store.read(&d), Err(Error::NotFound { .. })));
        assert!(matches!(store.info(&d), Err(Error::NotFound { .. })));
    }

    #[test]
    fn writer_verifies_expected_digest_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"abc").unwrap();
        let err = w.commit(Some(&Digest::of(b"xyz"))).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!store.has(&Digest::of(b"abc")));
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);

        let mut w = store.writer().unwrap();
        w.write_all(b"abc").unwrap();
        let (d, n) = w.commit(Some(&Digest::of(b"abc"))).unwrap();
        assert_eq!((d, n), (Digest::of(b"abc"), 3));

        let mut w = store.writer().unwrap();
        w.write_all(b"dropped").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_writers_of_the_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let expected = Digest::of(&data);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let store = store.clone();
                let data = &data;
                let expected = &expected;
                s.spawn(move || {
                    let mut w = store.writer().unwrap();
                    for chunk in data.chunks(4096) {
                        w.write_all(chunk).unwrap();
                    }
                    assert_eq!(w.commit(Some(expected)).unwrap().0, *expected);
                });
            }
        });
        assert_eq!(store.read(&expected).unwrap(), data);
    }

    #[test]
    fn blob_sources_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = store.write_blob(b"layer").unwrap();
        assert!(store.sources(&d).is_empty());
        store.add_source(&d, "127.0.0.1:5000/a").unwrap();
        store.add_source(&d, "127.0.0.1:5000/b").unwrap();
        store.add_source(&d, "127.0.0.1:5000/a").unwrap();
        assert_eq!(store.sources(&d), ["127.0.0.1:5000/a", "127.0.0.1:5000/b"]);
    }

    #[test]
    fn store_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<ContentStore>();
    }
}
