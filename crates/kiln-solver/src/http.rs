//! `http://` and `https://` sources (`ADD <url>`): the daemon downloads the file into a
//! one-file snapshot.
//!
//! Attributes (reference §5.9): `http.checksum` (the expected `sha256:` digest; a mismatch fails
//! the vertex), `http.filename` (else the `Content-Disposition` file name, else the last URL path
//! element, else `download`), `http.perm` (default `0600`), `http.uid` / `http.gid` (default 0),
//! `http.header.<name>` (request headers). The file's mtime is the response's `Last-Modified`
//! when it has one.
//!
//! Cache: the key is the content digest plus the file's name, mode and owner, so an unchanged
//! download reuses the snapshot (and everything built on it). With `http.checksum` the key is
//! known before any request, so a cached result needs no network at all. Without one, the last
//! response's `ETag` is remembered per URL under `<state>/http/` and sent as `If-None-Match`;
//! a `304 Not Modified` reuses the recorded result without downloading — BuildKit's
//! revalidation. A server without `ETag` is downloaded on every build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::pb;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::cache::CacheKey;
use crate::progress::VertexProgress;
use crate::{hold, lookup, now_secs, record, Context, Error, Resolved, SourceFailure};

/// The file an http source produces, as its attributes ask.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileSpec {
    checksum: Option<String>,
    filename: Option<String>,
    perm: u32,
    uid: u32,
    gid: u32,
    headers: Vec<(String, String)>,
}

/// What is remembered per URL for revalidation.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Validator {
    etag: String,
    /// Content digest of the response the etag belongs to.
    digest: String,
    filename: String,
}

fn failure(url: &str, reason: impl Into<String>) -> SourceFailure {
    SourceFailure::Other(Arc::new(Error::Http {
        url: url.to_string(),
        reason: reason.into(),
    }))
}

fn io_failure(path: &Path, source: std::io::Error) -> SourceFailure {
    SourceFailure::Other(Arc::new(Error::Io {
        path: path.to_path_buf(),
        source,
    }))
}

/// Go's `strconv.ParseInt(v, 0, 64)`: `0x` hex, leading `0` octal, else decimal.
fn parse_int(value: &str) -> Option<u32> {
    let v = value.trim();
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if let Some(octal) = v.strip_prefix("0o").or_else(|| v.strip_prefix("0O")) {
        u32::from_str_radix(octal, 8).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u32::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

fn file_spec(url: &str, attrs: &BTreeMap<String, String>) -> Result<FileSpec, SourceFailure> {
    let number = |name: &str, default: u32| -> Result<u32, SourceFailure> {
        match attrs.get(name).filter(|v| !v.is_empty()) {
            None => Ok(default),
            Some(v) => parse_int(v).ok_or_else(|| failure(url, format!("invalid {name} {v:?}"))),
        }
    };
    let checksum = match attrs.get("http.checksum").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => {
            let valid = v
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !valid {
                return Err(failure(
                    url,
                    format!("invalid checksum {v:?}: only sha256:<64 hex digits> is supported"),
                ));
            }
            Some(v.to_ascii_lowercase())
        }
    };
    let filename = match attrs.get("http.filename").filter(|v| !v.is_empty()) {
        None => None,
        Some(name) => Some(
            safe_name(name)
                .ok_or_else(|| failure(url, format!("invalid http.filename {name:?}")))?,
        ),
    };
    Ok(FileSpec {
        checksum,
        filename,
        perm: number("http.perm", 0o600)? & 0o7777,
        uid: number("http.uid", 0)?,
        gid: number("http.gid", 0)?,
        headers: attrs
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("http.header.")
                    .map(|name| (name.to_string(), v.clone()))
            })
            .collect(),
    })
}

/// A plain file name (no directories, not `.`/`..`).
fn safe_name(name: &str) -> Option<String> {
    let base = name.rsplit('/').next()?.trim();
    (!base.is_empty() && base != "." && base != "..").then(|| base.to_string())
}

/// The file name from a `Content-Disposition` header (`attachment; filename="x.tar"`).
fn disposition_filename(header: &str) -> Option<String> {
    header.split(';').find_map(|part| {
        let (key, value) = part.trim().split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("filename") {
            return None;
        }
        safe_name(value.trim().trim_matches('"'))
    })
}

/// The last path element of the URL, `download` when there is none.
fn url_filename(url: &reqwest::Url) -> String {
    url.path_segments()
        .and_then(|mut s| s.next_back().map(str::to_string))
        .and_then(|s| safe_name(&s))
        .unwrap_or_else(|| "download".to_string())
}

fn key_for(digest: &str, filename: &str, spec: &FileSpec) -> CacheKey {
    let meta = format!("{filename}\0{:o}\0{}\0{}", spec.perm, spec.uid, spec.gid);
    CacheKey::from_parts([("http", digest.as_bytes()), ("file", meta.as_bytes())])
}

fn validator_path(context: &Context, url: &str, spec: &FileSpec) -> PathBuf {
    let mut hasher = Sha256::new();
    hasher.update(url.as_bytes());
    for (k, v) in &spec.headers {
        hasher.update([0]);
        hasher.update(k.as_bytes());
        hasher.update([0]);
        hasher.update(v.as_bytes());
    }
    context
        .state_dir
        .join("http")
        .join(format!("{}.json", hex::encode(hasher.finalize())))
}

/// Runs an http(s) source; see the module docs.
pub(crate) async fn run_http_source(
    context: &Context,
    source: &pb::SourceOp,
    ignore_cache: bool,
    progress: &VertexProgress,
    name: &str,
) -> Result<Resolved, SourceFailure> {
    let url_text = source.identifier.as_str();
    let url = reqwest::Url::parse(url_text).map_err(|e| {
        SourceFailure::Other(Arc::new(Error::InvalidSource {
            identifier: url_text.to_string(),
            reason: e.to_string(),
        }))
    })?;
    let spec = file_spec(url_text, &source.attrs)?;

    // With a checksum and a known file name the key needs no request.
    if let (Some(checksum), Some(filename), false) = (&spec.checksum, &spec.filename, ignore_cache)
    {
        if let Some(resolved) = lookup(context, &key_for(checksum, filename, &spec)) {
            return Ok(resolved);
        }
    }

    let validator_file = validator_path(context, url_text, &spec);
    let validator: Option<Validator> = if ignore_cache {
        None
    } else {
        std::fs::read(&validator_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Validator>(&b).ok())
            // Revalidating content other than the expected checksum would skip the check.
            .filter(|v| spec.checksum.as_ref().is_none_or(|c| *c == v.digest))
    };

    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| failure(url_text, e.to_string()))?;
    let mut request = client.get(url.clone());
    for (k, v) in &spec.headers {
        request = request.header(k.as_str(), v.as_str());
    }
    if let Some(v) = &validator {
        request = request.header(reqwest::header::IF_NONE_MATCH, v.etag.as_str());
    }
    progress.log(2, format!("downloading {url_text}\n").as_bytes());
    let mut response = request
        .send()
        .await
        .map_err(|e| failure(url_text, error_chain(&e)))?;

    if response.status() == reqwest::StatusCode::NOT_MODIFIED {
        if let Some(resolved) = validator
            .as_ref()
            .and_then(|v| lookup(context, &key_for(&v.digest, &v.filename, &spec)))
        {
            tracing::debug!(url = url_text, "http source not modified");
            return Ok(resolved);
        }
        // The recorded result is gone: download unconditionally.
        response = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| failure(url_text, error_chain(&e)))?;
    }
    if !response.status().is_success() {
        return Err(failure(
            url_text,
            format!("invalid response status {}", response.status()),
        ));
    }
    let header = |name: reqwest::header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header(reqwest::header::ETAG);
    let last_modified = header(reqwest::header::LAST_MODIFIED)
        .and_then(|v| chrono::DateTime::parse_from_rfc2822(&v).ok());
    let filename = spec
        .filename
        .clone()
        .or_else(|| {
            header(reqwest::header::CONTENT_DISPOSITION).and_then(|h| disposition_filename(&h))
        })
        .unwrap_or_else(|| url_filename(&url));

    // Download into a directory of its own, hashing as it arrives.
    let dir = context
        .state_dir
        .join("http")
        .join(format!("download-{}", unique_suffix()));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| io_failure(&dir, e))?;
    let result = download(
        response,
        &dir,
        &filename,
        &spec,
        last_modified.map(|t| t.timestamp()),
        url_text,
    )
    .await;
    let snapshot = match result {
        Ok(digest) => {
            let key = key_for(&digest, &filename, &spec);
            let cached = if ignore_cache {
                None
            } else {
                lookup(context, &key)
            };
            let resolved = match cached {
                // Same content as an earlier download: keep that snapshot.
                Some(resolved) => {
                    // The download ran: not reported as cached.
                    resolved
                        .ran
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(Resolved {
                        cached: false,
                        ..resolved
                    })
                }
                None => match context.worker.snapshot_from_dir(&dir).await {
                    Ok(snapshot) => {
                        let outputs = vec![Some(snapshot)];
                        hold(context, &outputs);
                        let created = now_secs();
                        record(context, &key, &outputs, name, created)
                            .map(|()| Resolved::ready(key.clone(), false, outputs, created))
                    }
                    Err(e) => Err(SourceFailure::Worker(e)),
                },
            };
            if let (Ok(_), Some(etag)) = (&resolved, etag) {
                remember_validator(
                    &validator_file,
                    Validator {
                        etag,
                        digest,
                        filename: filename.clone(),
                    },
                );
            }
            resolved
        }
        Err(e) => Err(e),
    };
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
        tracing::warn!(dir = %dir.display(), error = %e, "failed to remove download directory");
    }
    snapshot
}

/// Streams the body to `dir/filename`, verifies the checksum and sets mode, owner and mtime;
/// returns the content digest.
async fn download(
    mut response: reqwest::Response,
    dir: &Path,
    filename: &str,
    spec: &FileSpec,
    mtime: Option<i64>,
    url: &str,
) -> Result<String, SourceFailure> {
    let path = dir.join(filename);
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| io_failure(&path, e))?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| failure(url, format!("failed to read body: {}", error_chain(&e))))?
    {
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| io_failure(&path, e))?;
    }
    file.flush().await.map_err(|e| io_failure(&path, e))?;
    drop(file);
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    if let Some(expected) = &spec.checksum {
        if *expected != digest {
            return Err(failure(
                url,
                format!("digest mismatch: expected {expected}, got {digest}"),
            ));
        }
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::lchown(&path, Some(spec.uid), Some(spec.gid))
            .map_err(|e| io_failure(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(spec.perm))
            .map_err(|e| io_failure(&path, e))?;
    }
    if let Some(secs) = mtime {
        let time = nix::sys::time::TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(
            None,
            &path,
            &time,
            &time,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_failure(&path, e.into()))?;
    }
    Ok(digest)
}

fn remember_validator(path: &Path, validator: Validator) {
    let write = || -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let bytes = serde_json::to_vec(&validator).map_err(std::io::Error::other)?;
        let tmp = path.with_extension(format!("tmp-{}", unique_suffix()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    };
    // Losing a validator only costs a download next time.
    if let Err(e) = write() {
        tracing::debug!(path = %path.display(), error = %e, "failed to remember etag");
    }
}

/// A name part unique in this process (for temporary directories).
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `error: cause: cause` of a reqwest error (its Display alone hides the reason).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes() {
        let attrs = BTreeMap::from([
            ("http.perm".to_string(), "0755".to_string()),
            ("http.uid".to_string(), "1000".to_string()),
            ("http.filename".to_string(), "tool".to_string()),
            ("http.header.Accept".to_string(), "*/*".to_string()),
        ]);
        let spec = file_spec("http://x/y", &attrs).ok().unwrap();
        assert_eq!(spec.perm, 0o755);
        assert_eq!((spec.uid, spec.gid), (1000, 0));
        assert_eq!(spec.filename.as_deref(), Some("tool"));
        assert_eq!(spec.headers, vec![("Accept".into(), "*/*".into())]);
        let spec = file_spec("http://x/y", &BTreeMap::new()).ok().unwrap();
        assert_eq!(spec.perm, 0o600, "BuildKit's default mode");
        let bad = BTreeMap::from([("http.checksum".to_string(), "md5:abc".to_string())]);
        assert!(file_spec("http://x/y", &bad).is_err());
        assert_eq!(parse_int("0x1f"), Some(31));
        assert_eq!(parse_int("0"), Some(0));
    }

    #[test]
    fn file_names() {
        assert_eq!(
            disposition_filename("attachment; filename=\"report.tar.gz\""),
            Some("report.tar.gz".into())
        );
        assert_eq!(disposition_filename("inline"), None);
        assert_eq!(
            disposition_filename("attachment; filename=../../etc/passwd"),
            Some("passwd".into())
        );
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert_eq!(url_filename(&url("http://h/a/b.txt?x=1")), "b.txt");
        assert_eq!(url_filename(&url("http://h/")), "download");
    }
}
