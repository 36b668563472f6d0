//! The few OCI / Docker image types landing needs: descriptors, platforms, indexes, manifests
//! and the `rootfs` part of image configs, plus chain id computation.
//!
//! Kept local (rather than taken from `kiln-image`) so that this crate only depends on the
//! containerd API; the JSON field names are the OCI ones, so values round-trip with other crates.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Media types this crate walks.
pub mod media_types {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// Docker manifest list (schema 2).
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image manifest (schema 2).
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

    /// Whether `media_type` is an index or a manifest list.
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    /// Whether `media_type` is a single-platform image manifest.
    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }
}

/// Annotation BuildKit's exporters put on `index.json` entries with the full image name.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

/// A content descriptor (OCI `descriptor`), with digests as `sha256:<hex>` strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Digest of the referenced content, `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes of the referenced content.
    pub size: i64,
    /// Annotations of the descriptor.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform of the referenced manifest, in indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The descriptor in containerd's API form (platform dropped: containerd has no field for it).
    pub fn to_containerd(&self) -> containerd_client::types::Descriptor {
        containerd_client::types::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: self
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// A descriptor from containerd's API form.
    pub fn from_containerd(descriptor: &containerd_client::types::Descriptor) -> Self {
        Descriptor {
            media_type: descriptor.media_type.clone(),
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            annotations: descriptor
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            platform: None,
        }
    }
}

/// An image platform (`os`/`architecture`/`variant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in GOARCH terms (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system in GOOS terms (`linux`).
    pub os: String,
    /// CPU variant (`v7`, `v8`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// The platform of this machine, in GOOS/GOARCH names.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "arm" => "arm",
            other => other,
        };
        let variant = match architecture {
            "arm" => Some("v7"),
            _ => None,
        };
        Platform::new(std::env::consts::OS, architecture, variant)
    }

    /// Whether an image for `other` runs here, strictly: same OS and architecture, and the same
    /// variant when both name one (`arm64` without variant counts as `v8`). Like containerd's
    /// strict default matcher, no compatible-variant fallback.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        let normalize = |variant: &Option<String>| -> Option<String> {
            match (self.architecture.as_str(), variant.as_deref()) {
                ("arm64", None) => Some("v8".to_string()),
                (_, v) => v.map(str::to_string),
            }
        };
        match (normalize(&self.variant), normalize(&other.variant)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// An image index (also `index.json` of an OCI layout) or Docker manifest list.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageIndex {
    /// Media type, when the document states it.
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    /// The entries.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageManifest {
    /// Media type, when the document states it.
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The part of an image config landing needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    /// Architecture the image is for.
    #[serde(default)]
    pub architecture: String,
    /// OS the image is for.
    #[serde(default)]
    pub os: String,
    /// Variant the image is for.
    #[serde(default)]
    pub variant: Option<String>,
    /// The layer diff ids.
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Digests of the uncompressed layer tars, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Chain ids of a layer stack (bottom first): `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])` — the snapshot names containerd uses.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => {
                let hash = Sha256::digest(format!("{parent} {diff_id}").as_bytes());
                format!("sha256:{}", hex::encode(hash))
            }
        };
        chain.push(next);
    }
    chain
}

/// The hex part of a `sha256:<64 hex>` digest, or `None` when it is not one.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(chain[1], expected);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn sha256_hex_accepts_only_sha256_digests() {
        let good = format!("sha256:{}", "0f".repeat(32));
        assert_eq!(sha256_hex(&good), Some(&good[7..]));
        assert_eq!(sha256_hex("sha256:abc"), None);
        assert_eq!(sha256_hex(&format!("sha512:{}", "0".repeat(64))), None);
        assert_eq!(sha256_hex(&format!("sha256:{}", "A".repeat(64))), None);
    }

    #[test]
    fn platform_matching_is_strict_with_arm64_variant_default() {
        let amd = Platform::new("linux", "amd64", None);
        assert!(amd.matches(&Platform::new("linux", "amd64", None)));
        assert!(!amd.matches(&Platform::new("linux", "arm64", None)));
        assert!(!amd.matches(&Platform::new("windows", "amd64", None)));
        let arm64 = Platform::new("linux", "arm64", None);
        assert!(arm64.matches(&Platform::new("linux", "arm64", Some("v8"))));
        let armv7 = Platform::new("linux", "arm", Some("v7"));
        assert!(!armv7.matches(&Platform::new("linux", "arm", Some("v6"))));
        assert_eq!(armv7.to_string(), "linux/arm/v7");
    }

    #[test]
    fn index_entries_parse_with_annotations_and_platform() {
        let json = r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "digest":"sha256:00","size":3,"annotations":{"io.containerd.image.name":"x/y:z"},
            "platform":{"architecture":"amd64","os":"linux"}}]}"#;
        let index: ImageIndex = serde_json::from_str(json).unwrap();
        assert_eq!(index.manifests.len(), 1);
        let entry = &index.manifests[0];
        assert_eq!(entry.annotations[ANNOTATION_IMAGE_NAME], "x/y:z");
        assert_eq!(entry.platform, Some(Platform::new("linux", "amd64", None)));
        assert!(media_types::is_manifest(&entry.media_type));
    }
}
