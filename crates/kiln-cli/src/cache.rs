//! The client side of `--cache-from` / `--cache-to` with `type=local`.
//!
//! An import's `src` directory is served over the session's FileSync under
//! the name `kiln-cache-from-<i>` (told to kilnd in the `kiln.session-dir`
//! attr). An export's `dest` stays on the client: kilnd sends the OCI layout
//! as a tar over FileSend with exporter id `cache-<n>`, and [`CachePlan::land`]
//! unpacks it into `dest` after the build — blobs are added, `index.json`
//! keeps other tags and points the exported tag at the new manifest.
//! Registry caches need nothing on the client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};

use crate::settings::CacheEntry;

/// The attr naming the session directory of a local import (kilnd's
/// `cache::SESSION_DIR_ATTR`).
const SESSION_DIR_ATTR: &str = "kiln.session-dir";

/// The index.json annotation holding a manifest's tag.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Cache entries ready for the solve request, plus what to do afterwards.
#[derive(Debug, Default)]
pub struct CachePlan {
    /// `--cache-from` entries as sent.
    pub imports: Vec<CacheEntry>,
    /// `--cache-to` entries as sent.
    pub exports: Vec<CacheEntry>,
    /// Session directories to serve (local imports).
    pub locals: BTreeMap<String, PathBuf>,
    /// FileSend targets by exporter id (local exports).
    pub file_send_targets: BTreeMap<String, PathBuf>,
    /// Received tar → destination directory and tag, per local export.
    landings: Vec<(PathBuf, PathBuf, String)>,
}

/// Plans the cache entries; local export tars are received under `tmp_dir`.
pub fn plan(
    imports: &[CacheEntry],
    exports: &[CacheEntry],
    tmp_dir: &Path,
) -> anyhow::Result<CachePlan> {
    let mut out = CachePlan::default();
    for (i, (kind, attrs)) in imports.iter().enumerate() {
        let mut attrs = attrs.clone();
        if kind == "local" {
            let src = attrs
                .get("src")
                .ok_or_else(|| anyhow!("--cache-from type=local needs src=<directory>"))?;
            let src = std::path::absolute(src)
                .with_context(|| format!("invalid cache directory {src}"))?;
            let name = format!("kiln-cache-from-{i}");
            attrs.insert(SESSION_DIR_ATTR.to_string(), name.clone());
            out.locals.insert(name, src);
        }
        out.imports.push((kind.clone(), attrs));
    }
    for (n, (kind, attrs)) in exports.iter().enumerate() {
        let mut attrs = attrs.clone();
        if kind == "local" {
            // As buildctl: dest is the client's business, not an attr.
            let dest = attrs
                .remove("dest")
                .ok_or_else(|| anyhow!("--cache-to type=local needs dest=<directory>"))?;
            let dest = std::path::absolute(&dest)
                .with_context(|| format!("invalid cache directory {dest}"))?;
            let tag = attrs
                .get("tag")
                .filter(|t| !t.is_empty())
                .cloned()
                .unwrap_or_else(|| "latest".to_string());
            let tar = tmp_dir.join(format!("cache-{n}.tar"));
            out.file_send_targets
                .insert(format!("cache-{n}"), tar.clone());
            out.landings.push((tar, dest, tag));
        }
        out.exports.push((kind.clone(), attrs));
    }
    Ok(out)
}

impl CachePlan {
    /// Unpacks every received local cache export into its directory.
    pub fn land(&self) -> anyhow::Result<()> {
        for (tar, dest, tag) in &self.landings {
            unpack_layout(tar, dest, tag)
                .with_context(|| format!("failed to write the cache to {}", dest.display()))?;
        }
        Ok(())
    }
}

/// Merges the OCI layout in the tar `archive` into `dest`.
fn unpack_layout(archive: &Path, dest: &Path, tag: &str) -> anyhow::Result<()> {
    let file = std::fs::File::open(archive)
        .with_context(|| format!("no cache was received ({})", archive.display()))?;
    let blobs = dest.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)
        .with_context(|| format!("failed to create {}", blobs.display()))?;
    let mut new_index: Option<serde_json::Value> = None;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().context("failed to read the cache tar")? {
        let mut entry = entry.context("failed to read the cache tar")?;
        let path = entry
            .path()
            .context("invalid path in the cache tar")?
            .into_owned();
        let name = path.to_string_lossy().to_string();
        if name == "index.json" {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes)
                .context("failed to read index.json")?;
            new_index = Some(serde_json::from_slice(&bytes).context("invalid index.json")?);
        } else if name == "oci-layout" {
            entry
                .unpack(dest.join("oci-layout"))
                .context("failed to write oci-layout")?;
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
            if !valid {
                return Err(anyhow!("unexpected entry {name:?} in the cache tar"));
            }
            let target = blobs.join(hex);
            if !target.exists() {
                entry
                    .unpack(&target)
                    .with_context(|| format!("failed to write {}", target.display()))?;
            }
        } else {
            return Err(anyhow!("unexpected entry {name:?} in the cache tar"));
        }
    }
    let new_index = new_index.ok_or_else(|| anyhow!("the cache tar has no index.json"))?;
    let index_path = dest.join("index.json");
    let mut index = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .unwrap_or_else(|| new_index.clone());
    let tagged = |m: &serde_json::Value| {
        m.get("annotations")
            .and_then(|a| a.get(REF_NAME))
            .and_then(|t| t.as_str())
            == Some(tag)
    };
    let mut manifests: Vec<serde_json::Value> = index
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    manifests.retain(|m| !tagged(m));
    manifests.extend(
        new_index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default(),
    );
    index["manifests"] = serde_json::Value::Array(manifests);
    let bytes = serde_json::to_vec(&index).context("failed to encode index.json")?;
    let tmp = dest.join(".index.json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, &index_path)
        .with_context(|| format!("failed to write {}", index_path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, attrs: &[(&str, &str)]) -> CacheEntry {
        (
            kind.to_string(),
            attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn local_entries_get_session_names_and_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = plan(
            &[
                entry("registry", &[("ref", "r/x")]),
                entry("local", &[("src", "/c")]),
            ],
            &[entry("local", &[("dest", "/d"), ("mode", "max")])],
            tmp.path(),
        )
        .unwrap();
        assert_eq!(plan.imports[1].1[SESSION_DIR_ATTR], "kiln-cache-from-1");
        assert_eq!(plan.locals["kiln-cache-from-1"], PathBuf::from("/c"));
        assert!(!plan.exports[0].1.contains_key("dest"));
        assert_eq!(
            plan.file_send_targets["cache-0"],
            tmp.path().join("cache-0.tar")
        );
    }

    fn layout_tar(path: &Path, digest_hex: &str, tag: &str) {
        let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "m", "digest": format!("sha256:{digest_hex}"), "size": 1, "annotations": {REF_NAME: tag}}]});
        for (name, data) in [
            ("oci-layout".to_string(), b"{}".to_vec()),
            (
                "index.json".to_string(),
                serde_json::to_vec(&index).unwrap(),
            ),
            (format!("blobs/sha256/{digest_hex}"), b"x".to_vec()),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, data.as_slice())
                .unwrap();
        }
        builder.finish().unwrap();
    }

    #[test]
    fn landing_merges_tags() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("cache");
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        layout_tar(&tmp.path().join("1.tar"), &a, "one");
        unpack_layout(&tmp.path().join("1.tar"), &dest, "one").unwrap();
        layout_tar(&tmp.path().join("2.tar"), &b, "two");
        unpack_layout(&tmp.path().join("2.tar"), &dest, "two").unwrap();
        layout_tar(&tmp.path().join("3.tar"), &b, "one");
        unpack_layout(&tmp.path().join("3.tar"), &dest, "one").unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 2, "{index}");
        assert!(manifests
            .iter()
            .all(|m| m["digest"] == format!("sha256:{b}")));
        assert!(dest.join("blobs/sha256").join(&a).exists());
        assert!(dest.join("oci-layout").exists());
    }
}
