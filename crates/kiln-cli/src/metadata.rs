//! Result files: `--metadata-file` (buildctl's JSON) and `--iidfile` (§1.8).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Context};
use base64::Engine;

/// buildctl's metadata JSON of an exporter response: every key with its
/// value, except that a value which is base64 of valid JSON is inlined as
/// that JSON (e.g. `containerimage.descriptor`).
pub fn metadata_json(response: &BTreeMap<String, String>) -> anyhow::Result<Vec<u8>> {
    let mut out = serde_json::Map::new();
    for (key, value) in response {
        let inlined = base64::engine::general_purpose::STANDARD
            .decode(value)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        let json = match inlined {
            Some(json) => json,
            None => serde_json::Value::String(value.clone()),
        };
        out.insert(key.clone(), json);
    }
    let mut text = serde_json::to_vec_pretty(&serde_json::Value::Object(out))
        .context("failed to encode the metadata")?;
    text.push(b'\n');
    Ok(text)
}

/// The image digest nerdctl writes to `--iidfile`: `containerimage.digest`,
/// the manifest (or index) digest — not the config digest docker writes.
pub fn image_digest(response: &BTreeMap<String, String>) -> anyhow::Result<&str> {
    response
        .get("containerimage.digest")
        .map(String::as_str)
        .ok_or_else(|| anyhow!("failed to find containerimage.digest in metadata file"))
}

/// Writes `digest` to `path` with mode 0644 (no trailing newline, as nerdctl).
pub fn write_iidfile(path: &Path, digest: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("failed to write iidfile {}", path.display()))?;
    file.write_all(digest.as_bytes())
        .with_context(|| format!("failed to write iidfile {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_json_values_are_inlined() {
        let descriptor = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:ab","size":3}"#;
        let response: BTreeMap<String, String> = [
            ("containerimage.digest", "sha256:ab".to_string()),
            (
                "containerimage.descriptor",
                base64::engine::general_purpose::STANDARD.encode(descriptor),
            ),
            ("image.name", "docker.io/library/a:latest".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let json: serde_json::Value =
            serde_json::from_slice(&metadata_json(&response).unwrap()).unwrap();
        assert_eq!(json["containerimage.digest"], "sha256:ab");
        assert_eq!(json["containerimage.descriptor"]["size"], 3);
        assert_eq!(json["image.name"], "docker.io/library/a:latest");
    }

    #[test]
    fn iid_is_the_manifest_digest() {
        let mut response = BTreeMap::new();
        assert_eq!(
            image_digest(&response).unwrap_err().to_string(),
            "failed to find containerimage.digest in metadata file"
        );
        response.insert("containerimage.digest".into(), "sha256:m".into());
        response.insert("containerimage.config.digest".into(), "sha256:c".into());
        assert_eq!(image_digest(&response).unwrap(), "sha256:m");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iid");
        write_iidfile(&path, "sha256:m").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "sha256:m");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
}
