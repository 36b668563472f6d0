//! OCI image-spec and Docker image JSON types.
//!
//! Field names follow the specs (`mediaType`, `os.version`, Docker's capitalised runtime-config keys).
//! Maps are `BTreeMap` and optional fields are skipped when absent, so serialising the same value
//! always yields the same bytes (and therefore the same digest).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Digest;

/// Media type strings of manifests, indexes, configs and layers.
pub mod media_types {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI uncompressed layer.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI gzip layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI zstd layer.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker image manifest v2 schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker uncompressed layer.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// Whether `media_type` is a single-image manifest (OCI or Docker).
    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }

    /// Whether `media_type` is a multi-platform index (OCI or Docker).
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }
}

/// A content descriptor: what a blob is, its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes of the referenced content.
    pub size: u64,
    /// Arbitrary annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Platform of the referenced manifest (in indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor without annotations or platform.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Self {
            media_type: media_type.into(),
            digest,
            size,
            annotations: None,
            platform: None,
        }
    }
}

/// A platform: OS, CPU architecture and variant, with Go's (`GOARCH`) architecture names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture (`amd64`, `arm64`, ...).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// CPU variant (`v7`, `v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features (Windows).
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

impl Platform {
    /// A platform from OS, architecture and optional variant.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            architecture: architecture.to_owned(),
            os: os.to_owned(),
            variant: variant.map(str::to_owned),
            os_version: None,
            os_features: None,
        }
    }

    /// The platform this process runs on: `linux` and the Go name of the CPU architecture.
    pub fn host() -> Self {
        let (arch, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
            "mips" if cfg!(target_endian = "little") => ("mipsle", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self::new("linux", arch, variant)
    }

    /// Parses `os/arch[/variant]` (`linux/arm64/v8`).
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let arch = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next();
        if parts.next().is_some() || variant == Some("") {
            return None;
        }
        Some(Self::new(os, arch, variant).normalized())
    }

    /// The platform with aliases resolved: lowercase OS, Go architecture names (`x86_64` →
    /// `amd64`, `aarch64` → `arm64`), default variants (`arm64` → `v8`, `arm` → `v7`) made explicit
    /// and the meaningless `amd64/v1` dropped.
    pub fn normalized(&self) -> Self {
        let os = self.os.to_lowercase();
        let mut variant = self.variant.clone().filter(|v| !v.is_empty());
        let arch = match self.architecture.to_lowercase().as_str() {
            "x86_64" | "x86-64" | "amd64" => {
                if variant.as_deref() == Some("v1") {
                    variant = None;
                }
                "amd64".to_owned()
            }
            "aarch64" | "arm64" => {
                if variant.as_deref() == Some("8") || variant.is_none() {
                    variant = Some("v8".to_owned());
                }
                "arm64".to_owned()
            }
            "armhf" => {
                variant = Some("v7".to_owned());
                "arm".to_owned()
            }
            "armel" => {
                variant = Some("v6".to_owned());
                "arm".to_owned()
            }
            "arm" => {
                variant = Some(match variant.as_deref() {
                    None | Some("7") => "v7".to_owned(),
                    Some("5") => "v5".to_owned(),
                    Some("6") => "v6".to_owned(),
                    Some("8") => "v8".to_owned(),
                    Some(v) => v.to_owned(),
                });
                "arm".to_owned()
            }
            "i386" | "i686" | "386" => "386".to_owned(),
            other => other.to_owned(),
        };
        Self {
            architecture: arch,
            os,
            variant,
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
        }
    }

    /// containerd's `platforms.Normalize`: [normalized](Self::normalized), then the variant
    /// that is the architecture's only default dropped (`arm64/v8` → `arm64`), the form BuildKit
    /// writes in image configs, index descriptors and `TARGETPLATFORM`.
    pub fn canonical(&self) -> Self {
        let mut p = self.normalized();
        if p.architecture == "arm64" && p.variant.as_deref() == Some("v8") {
            p.variant = None;
        }
        p
    }

    /// BuildKit's platform id (`platforms.Format` of the canonical form): `linux/arm64`,
    /// `linux/arm/v7`; the keys of a multi-platform result.
    pub fn id(&self) -> String {
        self.canonical().to_string()
    }

    /// Whether a manifest for `other` can run where `self` is wanted: same OS, architecture and
    /// variant once both are [normalized](Self::normalized). OS version and features are ignored.
    pub fn matches(&self, other: &Platform) -> bool {
        let a = self.normalized();
        let b = other.normalized();
        a.os == b.os && a.architecture == b.architecture && a.variant == b.variant
    }
}

impl fmt::Display for Platform {
    /// `os/arch[/variant]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI or Docker schema 2): a config and layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's own media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layer blobs, bottom to top.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Arbitrary annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index (OCI) or manifest list (Docker): manifests per platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's own media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Arbitrary annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image config (OCI `application/vnd.oci.image.config.v1+json`, Docker-compatible).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Creation time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// CPU variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Defaults for containers run from the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RuntimeConfig>,
    /// Layer diff ids.
    #[serde(default)]
    pub rootfs: RootFs,
    /// One record per Dockerfile step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// An empty JSON object, the value type of Docker's `ExposedPorts` and `Volumes` sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyObject {}

/// Container defaults, with Docker's capitalised keys. Every field is optional and skipped when
/// `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    /// `user[:group]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `port/proto` set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, EmptyObject>>,
    /// `KEY=value` list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Entrypoint argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Command argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Volume path set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, EmptyObject>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Stop signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Windows: the command line is already escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    /// Health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthConfig>,
    /// `ONBUILD` triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// Shell for shell-form commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
}

/// Docker's health check settings (durations in nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", cmd]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Time before a check is considered hung.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Start-up grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    /// Time between checks during the start period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
    /// Consecutive failures before unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// The image's layer list by uncompressed digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Uncompressed layer digests, bottom to top.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        Self {
            kind: "layers".to_owned(),
            diff_ids: Vec::new(),
        }
    }
}

/// One step of the image's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Time of the step, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction that made the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The step made no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_and_platform_field_names() {
        let mut d = Descriptor::new(media_types::OCI_MANIFEST, Digest::of(b"m"), 3);
        let mut p = Platform::new("windows", "amd64", None);
        p.os_version = Some("10.0".into());
        p.os_features = Some(vec!["win32k".into()]);
        d.platform = Some(p);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["mediaType"], media_types::OCI_MANIFEST);
        assert_eq!(v["platform"]["os.version"], "10.0");
        assert_eq!(v["platform"]["os.features"][0], "win32k");
        assert!(v.get("annotations").is_none());
        assert!(v["platform"].get("variant").is_none());
        let back: Descriptor = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn platform_ids_are_containerds() {
        let arm = Platform::parse("linux/aarch64").unwrap();
        assert_eq!(arm.id(), "linux/arm64");
        assert_eq!(arm.canonical().variant, None);
        assert!(arm.canonical().matches(&arm));
        assert_eq!(Platform::parse("linux/arm").unwrap().id(), "linux/arm/v7");
        assert_eq!(Platform::parse("linux/x86_64").unwrap().id(), "linux/amd64");
    }

    #[test]
    fn runtime_config_uses_docker_keys_and_skips_none() {
        let rc = RuntimeConfig {
            env: Some(vec!["PATH=/bin".into()]),
            exposed_ports: Some([("80/tcp".to_owned(), EmptyObject {})].into()),
            working_dir: Some("/app".into()),
            on_build: Some(vec![]),
            args_escaped: Some(true),
            ..Default::default()
        };
        let json = serde_json::to_string(&rc).unwrap();
        assert_eq!(
            json,
            r#"{"ExposedPorts":{"80/tcp":{}},"Env":["PATH=/bin"],"WorkingDir":"/app","ArgsEscaped":true,"OnBuild":[]}"#
        );
        assert_eq!(serde_json::from_str::<RuntimeConfig>(&json).unwrap(), rc);
    }

    #[test]
    fn image_config_parses_docker_config_and_serialises_deterministically() {
        let src = r#"{"architecture":"amd64","config":{"Env":["PATH=/usr/bin"],"Cmd":["sh"],"Labels":{"b":"2","a":"1"}},
            "container":"abc","created":"2024-01-01T00:00:00Z","history":[{"created":"2024-01-01T00:00:00Z","created_by":"ADD x /","empty_layer":true},{"created_by":"RUN y"}],
            "os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}}"#;
        let c: ImageConfig = serde_json::from_str(src).unwrap();
        assert_eq!(c.architecture, "amd64");
        assert_eq!(c.rootfs.diff_ids.len(), 1);
        assert!(c.history[0].empty_layer);
        assert!(!c.history[1].empty_layer);
        let a = serde_json::to_vec(&c).unwrap();
        let again: ImageConfig = serde_json::from_slice(&a).unwrap();
        assert_eq!(serde_json::to_vec(&again).unwrap(), a);
        let text = String::from_utf8(a).unwrap();
        assert!(text.contains(r#""Labels":{"a":"1","b":"2"}"#), "{text}");
        assert!(!text.contains("empty_layer\":false"), "{text}");
        assert!(
            text.contains(r#""rootfs":{"type":"layers","diff_ids":["#),
            "{text}"
        );
    }

    #[test]
    fn manifest_and_index_round_trip() {
        let m = ImageManifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.into()),
            config: Descriptor::new(media_types::OCI_CONFIG, Digest::of(b"c"), 1),
            layers: vec![Descriptor::new(
                media_types::OCI_LAYER_GZIP,
                Digest::of(b"l"),
                1,
            )],
            annotations: None,
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(serde_json::from_value::<ImageManifest>(v).unwrap(), m);
        let i: ImageIndex = serde_json::from_str(
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            i.manifests[0].platform.as_ref().unwrap().architecture,
            "arm64"
        );
    }

    #[test]
    fn platform_matching_normalises_aliases_and_variants() {
        let arm64 = Platform::new("linux", "arm64", None);
        assert!(arm64.matches(&Platform::new("linux", "arm64", Some("v8"))));
        assert!(arm64.matches(&Platform::new("linux", "aarch64", None)));
        assert!(!arm64.matches(&Platform::new("linux", "amd64", None)));
        assert!(!arm64.matches(&Platform::new("windows", "arm64", None)));
        let armv7 = Platform::new("linux", "arm", None);
        assert!(armv7.matches(&Platform::new("linux", "arm", Some("v7"))));
        assert!(!armv7.matches(&Platform::new("linux", "arm", Some("v6"))));
        assert!(
            Platform::new("linux", "x86_64", None).matches(&Platform::new("linux", "amd64", None))
        );
        assert_eq!(
            Platform::parse("linux/arm/v6").unwrap().to_string(),
            "linux/arm/v6"
        );
        assert!(Platform::parse("linux").is_none());
    }

    #[test]
    fn host_platform_is_linux_with_go_arch() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.architecture, "amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(h.architecture, "arm64");
        }
    }
}
