//! Output selection when `--output` is absent (reference §1.4).

use std::collections::BTreeMap;

use kiln_image::oci::Platform;

/// Worker label naming the executor (`oci` or `containerd`).
pub const LABEL_EXECUTOR: &str = "org.mobyproject.buildkit.worker.executor";
/// Worker label: UUID of the containerd the worker uses.
pub const LABEL_CONTAINERD_UUID: &str = "org.mobyproject.buildkit.worker.containerd.uuid";
/// Worker label: containerd namespace of the worker.
pub const LABEL_CONTAINERD_NAMESPACE: &str = "org.mobyproject.buildkit.worker.containerd.namespace";
/// Worker label: the worker's snapshotter.
pub const LABEL_SNAPSHOTTER: &str = "org.mobyproject.buildkit.worker.snapshotter";

/// Which exporter a build without `--output` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputChoice {
    /// The worker shares our containerd, namespace and snapshotter:
    /// `type=image,unpack=true`, nothing to load.
    SharableImage,
    /// `type=docker` tar, loaded into containerd by the client.
    DockerTar,
    /// `type=oci` tar (several platforms; the docker exporter rejects
    /// manifest lists), loaded by the client.
    OciTar,
}

impl OutputChoice {
    /// Whether the client must import the tar into containerd.
    pub fn needs_loading(self) -> bool {
        !matches!(self, OutputChoice::SharableImage)
    }

    /// The exporter `(type, attrs)`, with nerdctl's name suffix: `name=<first
    /// tag>` when tagged, else `dangling-name-prefix=<none>`.
    pub fn exporter(self, tags: &[String]) -> (String, BTreeMap<String, String>) {
        let mut attrs = BTreeMap::new();
        let kind = match self {
            OutputChoice::SharableImage => {
                attrs.insert("unpack".to_string(), "true".to_string());
                "image"
            }
            OutputChoice::DockerTar => "docker",
            OutputChoice::OciTar => "oci",
        };
        match tags.first() {
            Some(name) => attrs.insert("name".to_string(), name.clone()),
            None => attrs.insert("dangling-name-prefix".to_string(), "<none>".to_string()),
        };
        (kind.to_string(), attrs)
    }
}

/// nerdctl's `isImageSharable` + the tar fallback: sharable iff the worker's
/// executor is containerd, its containerd UUID, namespace and snapshotter
/// equal ours, and the platform list is empty or exactly the host platform
/// (variant empty or equal). Any missing label means not sharable.
pub fn choose_output(
    worker_labels: &BTreeMap<String, String>,
    containerd_uuid: &str,
    namespace: &str,
    snapshotter: &str,
    platforms: &[Platform],
) -> OutputChoice {
    let label_is = |key: &str, want: &str| worker_labels.get(key).map(String::as_str) == Some(want);
    let host = Platform::host();
    let platform_ok = match platforms {
        [] => true,
        [only] => {
            only.os == host.os
                && only.architecture == host.architecture
                && (only.variant.as_deref().unwrap_or("").is_empty()
                    || only.variant == host.variant)
        }
        _ => false,
    };
    let sharable = label_is(LABEL_EXECUTOR, "containerd")
        && label_is(LABEL_CONTAINERD_UUID, containerd_uuid)
        && label_is(LABEL_CONTAINERD_NAMESPACE, namespace)
        && label_is(LABEL_SNAPSHOTTER, snapshotter)
        && platform_ok;
    if sharable {
        OutputChoice::SharableImage
    } else if platforms.len() > 1 {
        OutputChoice::OciTar
    } else {
        OutputChoice::DockerTar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containerd_worker() -> BTreeMap<String, String> {
        [
            (LABEL_EXECUTOR, "containerd"),
            (LABEL_CONTAINERD_UUID, "uuid-1"),
            (LABEL_CONTAINERD_NAMESPACE, "default"),
            (LABEL_SNAPSHOTTER, "overlayfs"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn platform(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        let mut p = Platform::host();
        p.os = os.into();
        p.architecture = arch.into();
        p.variant = variant.map(Into::into);
        p
    }

    #[test]
    fn sharable_when_everything_matches() {
        let labels = containerd_worker();
        assert_eq!(
            choose_output(&labels, "uuid-1", "default", "overlayfs", &[]),
            OutputChoice::SharableImage
        );
        let host = Platform::host();
        assert_eq!(
            choose_output(
                &labels,
                "uuid-1",
                "default",
                "overlayfs",
                std::slice::from_ref(&host)
            ),
            OutputChoice::SharableImage
        );
        let no_variant = Platform {
            variant: None,
            ..host
        };
        assert_eq!(
            choose_output(&labels, "uuid-1", "default", "overlayfs", &[no_variant]),
            OutputChoice::SharableImage
        );
    }

    #[test]
    fn any_mismatch_means_docker_tar() {
        let labels = containerd_worker();
        assert_eq!(
            choose_output(&labels, "uuid-2", "default", "overlayfs", &[]),
            OutputChoice::DockerTar
        );
        assert_eq!(
            choose_output(&labels, "uuid-1", "other", "overlayfs", &[]),
            OutputChoice::DockerTar
        );
        assert_eq!(
            choose_output(&labels, "uuid-1", "default", "native", &[]),
            OutputChoice::DockerTar
        );
        let mut oci = labels.clone();
        oci.insert(LABEL_EXECUTOR.into(), "oci".into());
        assert_eq!(
            choose_output(&oci, "uuid-1", "default", "overlayfs", &[]),
            OutputChoice::DockerTar
        );
        let mut missing = labels.clone();
        missing.remove(LABEL_SNAPSHOTTER);
        assert_eq!(
            choose_output(&missing, "uuid-1", "default", "overlayfs", &[]),
            OutputChoice::DockerTar
        );
        let foreign = if Platform::host().architecture == "s390x" {
            "amd64"
        } else {
            "s390x"
        };
        assert_eq!(
            choose_output(
                &labels,
                "uuid-1",
                "default",
                "overlayfs",
                &[platform("linux", foreign, None)]
            ),
            OutputChoice::DockerTar
        );
        assert_eq!(
            choose_output(
                &labels,
                "uuid-1",
                "default",
                "overlayfs",
                &[platform("windows", &Platform::host().architecture, None)]
            ),
            OutputChoice::DockerTar
        );
    }

    #[test]
    fn several_platforms_mean_oci_tar() {
        let labels = containerd_worker();
        let two = [
            platform("linux", "amd64", None),
            platform("linux", "arm64", None),
        ];
        assert_eq!(
            choose_output(&labels, "uuid-1", "default", "overlayfs", &two),
            OutputChoice::OciTar
        );
        assert!(OutputChoice::OciTar.needs_loading());
        assert!(!OutputChoice::SharableImage.needs_loading());
    }

    #[test]
    fn exporter_name_suffix() {
        let (kind, attrs) =
            OutputChoice::DockerTar.exporter(&["docker.io/library/a:latest".into()]);
        assert_eq!(kind, "docker");
        assert_eq!(
            attrs.get("name").map(String::as_str),
            Some("docker.io/library/a:latest")
        );
        let (kind, attrs) = OutputChoice::SharableImage.exporter(&[]);
        assert_eq!(kind, "image");
        assert_eq!(attrs.get("unpack").map(String::as_str), Some("true"));
        assert_eq!(
            attrs.get("dangling-name-prefix").map(String::as_str),
            Some("<none>")
        );
        assert!(!attrs.contains_key("name"));
    }
}
