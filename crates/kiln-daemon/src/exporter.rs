//! Exporters: commit a result snapshot as an image (config + manifest in the
//! worker's content store) and deliver it — as a `docker`/`oci` tarball over
//! the session's `FileSend`, or only in the store (`image` without an image
//! store, as BuildKit's OCI worker does).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use kiln_image::oci::{media_types, Descriptor, History, ImageConfig, ImageManifest, RootFs};
use kiln_image::reference::Reference;
use kiln_image::Digest;
use kiln_solver::VertexProgress;
use kiln_worker::{SnapshotId, Worker};

/// An image written to the content store.
#[derive(Clone, Debug)]
pub struct CommittedImage {
    /// The manifest descriptor.
    pub manifest: Descriptor,
    /// The config digest.
    pub config: Digest,
}

/// Exporter types kiln knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExporterKind {
    /// `type=image`.
    Image,
    /// `type=docker` tarball.
    Docker,
    /// `type=oci` tarball.
    Oci,
}

impl ExporterKind {
    /// The progress title of the exporter's vertex.
    pub fn title(self) -> &'static str {
        match self {
            Self::Image => "exporting to image",
            Self::Docker => "exporting to docker image format",
            Self::Oci => "exporting to oci image format",
        }
    }

    /// Parses an exporter type name.
    pub fn parse(kind: &str) -> anyhow::Result<Self> {
        match kind {
            "image" => Ok(Self::Image),
            "docker" => Ok(Self::Docker),
            "oci" => Ok(Self::Oci),
            "local" | "tar" => bail!("exporter \"{kind}\" is not supported yet"),
            other => bail!("exporter \"{other}\" could not be found"),
        }
    }
}

/// Reads a boolean exporter attr (empty value = true, as BuildKit).
pub fn bool_attr(
    attrs: &BTreeMap<String, String>,
    key: &str,
    default: bool,
) -> anyhow::Result<bool> {
    match attrs.get(key).map(String::as_str) {
        None => Ok(default),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => bail!("invalid boolean value {other:?} for exporter attribute {key}"),
    }
}

/// The names of the `name` attr (comma-separated), normalized.
pub fn names(attrs: &BTreeMap<String, String>) -> anyhow::Result<Vec<Reference>> {
    let mut out = Vec::new();
    if let Some(list) = attrs.get("name") {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            out.push(
                Reference::parse_normalized(name)
                    .with_context(|| format!("invalid image name {name:?}"))?,
            );
        }
    }
    Ok(out)
}

fn docker_media_type(oci: &str) -> String {
    match oci {
        media_types::OCI_LAYER_GZIP => media_types::DOCKER_LAYER_GZIP.to_string(),
        other => other.to_string(),
    }
}

fn oci_media_type(docker: &str) -> String {
    match docker {
        media_types::DOCKER_LAYER_GZIP => media_types::OCI_LAYER_GZIP.to_string(),
        other => other.to_string(),
    }
}

/// Writes the image config and manifest for `snapshot` (its layers bottom to
/// top) into the worker's content store.
pub async fn commit_image(
    worker: &dyn Worker,
    snapshot: Option<&SnapshotId>,
    mut config: ImageConfig,
    created: Option<u64>,
    oci_mediatypes: bool,
    progress: &VertexProgress,
) -> anyhow::Result<CommittedImage> {
    progress.status("exporting layers", "exporting layers", 0, None, false);
    let layers = match snapshot {
        Some(id) => worker.layers(id).await.context("failed to export layers")?,
        None => Vec::new(),
    };
    progress.status("exporting layers", "exporting layers", 0, None, true);

    // The time the result was first built, not the export time: a fully
    // cached rebuild then yields the very same config and manifest digests.
    let created = created
        .and_then(|secs| chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0))
        .unwrap_or_else(chrono::Utc::now)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    config.rootfs = RootFs {
        kind: "layers".to_string(),
        diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
    };
    if config.created.is_none() {
        config.created = Some(created.clone());
    }
    for entry in &mut config.history {
        if entry.created.is_none() {
            entry.created = Some(created.clone());
        }
    }
    // The history must name one non-empty entry per layer; pad when the
    // frontend's history (or a base image's) has fewer.
    let non_empty = config.history.iter().filter(|h| !h.empty_layer).count();
    for _ in non_empty..layers.len() {
        config.history.push(History {
            created: Some(created.clone()),
            created_by: Some("kiln: layer without history".to_string()),
            author: None,
            comment: None,
            empty_layer: false,
        });
    }
    let config_bytes = serde_json::to_vec(&config).context("failed to encode image config")?;
    let content = worker.content();
    let config_digest = content
        .write_blob(&config_bytes)
        .context("failed to write image config")?;

    let (manifest_type, config_type) = if oci_mediatypes {
        (media_types::OCI_MANIFEST, media_types::OCI_CONFIG)
    } else {
        (media_types::DOCKER_MANIFEST, media_types::DOCKER_CONFIG)
    };
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(manifest_type.to_string()),
        config: Descriptor::new(
            config_type,
            config_digest.clone(),
            config_bytes.len() as u64,
        ),
        layers: layers
            .iter()
            .map(|l| {
                let media_type = if oci_mediatypes {
                    oci_media_type(&l.descriptor.media_type)
                } else {
                    docker_media_type(&l.descriptor.media_type)
                };
                Descriptor::new(media_type, l.descriptor.digest.clone(), l.descriptor.size)
            })
            .collect(),
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).context("failed to encode manifest")?;
    let manifest_digest = content
        .write_blob(&manifest_bytes)
        .context("failed to write manifest")?;
    let status = format!("exporting manifest {manifest_digest}");
    progress.status(&status, &status, 0, None, true);
    let status = format!("exporting config {config_digest}");
    progress.status(&status, &status, 0, None, true);
    Ok(CommittedImage {
        manifest: Descriptor::new(manifest_type, manifest_digest, manifest_bytes.len() as u64),
        config: config_digest,
    })
}

/// What every exporter works from.
pub struct ExportInput<'a> {
    /// The worker holding the result.
    pub worker: &'a dyn Worker,
    /// The result snapshot (`None` = scratch).
    pub snapshot: Option<&'a SnapshotId>,
    /// The frontend's image config.
    pub image_config: &'a ImageConfig,
    /// When the result was first built (seconds since the epoch).
    pub created: Option<u64>,
    /// The client's session, for file exporters.
    pub session: Option<&'a kiln_session::Session>,
    /// Where temporary files go.
    pub tmp_dir: &'a Path,
}

/// Runs exporter number `index` of kind `kind` with `attrs`, returning its
/// response keys.
pub async fn export(
    kind: ExporterKind,
    index: usize,
    attrs: &BTreeMap<String, String>,
    input: &ExportInput<'_>,
    vertex: &VertexProgress,
) -> anyhow::Result<BTreeMap<String, String>> {
    let names = names(attrs)?;
    let oci_types = bool_attr(attrs, "oci-mediatypes", kind == ExporterKind::Oci)?;
    if kind == ExporterKind::Image && bool_attr(attrs, "push", false)? {
        bail!("pushing images is not supported yet");
    }
    let image = commit_image(
        input.worker,
        input.snapshot,
        input.image_config.clone(),
        input.created,
        oci_types,
        vertex,
    )
    .await?;
    let response = response(&image, &names)?;
    if matches!(kind, ExporterKind::Docker | ExporterKind::Oci) && bool_attr(attrs, "tar", true)? {
        let session = input
            .session
            .context("a tarball exporter needs a session to send the file to")?;
        let file = archive_to_temp(input.worker, &image, &names, input.tmp_dir).await?;
        vertex.status("sending tarball", "sending tarball", 0, None, false);
        let sent = kiln_session::filesend::send(
            session.channel(),
            index,
            &response,
            tokio::fs::File::from_std(file),
        )
        .await
        .context("failed to send the image to the client")?;
        vertex.status("sending tarball", "sending tarball", sent, Some(sent), true);
    }
    Ok(response)
}

/// The exporter response keys BuildKit returns for an image.
pub fn response(
    image: &CommittedImage,
    names: &[Reference],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    out.insert(
        "containerimage.digest".to_string(),
        image.manifest.digest.to_string(),
    );
    out.insert(
        "containerimage.config.digest".to_string(),
        image.config.to_string(),
    );
    let descriptor = serde_json::to_vec(&image.manifest).context("failed to encode descriptor")?;
    out.insert(
        "containerimage.descriptor".to_string(),
        base64::engine::general_purpose::STANDARD.encode(descriptor),
    );
    if !names.is_empty() {
        out.insert(
            "image.name".to_string(),
            names
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    Ok(out)
}

/// Writes the tarball of `image` to a temporary file under `tmp_dir` and
/// returns it (opened for reading, already unlinked).
pub async fn archive_to_temp(
    worker: &dyn Worker,
    image: &CommittedImage,
    names: &[Reference],
    tmp_dir: &Path,
) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(tmp_dir)
        .with_context(|| format!("failed to create {}", tmp_dir.display()))?;
    let store = worker.content().clone();
    let manifest = image.manifest.clone();
    let names = names.to_vec();
    let tmp_dir = tmp_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
        let mut file =
            tempfile::tempfile_in(&tmp_dir).context("failed to create temporary archive")?;
        {
            let mut writer = std::io::BufWriter::new(&mut file);
            kiln_image::archive::write_docker_archive(&mut writer, &store, &manifest, &names)
                .context("failed to write image archive")?;
            std::io::Write::flush(&mut writer).context("failed to write image archive")?;
        }
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
            .context("failed to rewind archive")?;
        Ok(file)
    })
    .await
    .context("archive writer panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_kinds_and_bools() {
        assert_eq!(ExporterKind::parse("docker").unwrap(), ExporterKind::Docker);
        assert_eq!(
            ExporterKind::parse("nope").unwrap_err().to_string(),
            "exporter \"nope\" could not be found"
        );
        let mut attrs = BTreeMap::new();
        attrs.insert("unpack".to_string(), String::new());
        assert!(bool_attr(&attrs, "unpack", false).unwrap());
        attrs.insert("unpack".to_string(), "maybe".to_string());
        assert!(bool_attr(&attrs, "unpack", false).is_err());
        assert!(!bool_attr(&attrs, "push", false).unwrap());
    }

    #[test]
    fn names_are_normalized() {
        let mut attrs = BTreeMap::new();
        attrs.insert("name".to_string(), "foo, 127.0.0.1:5000/bar:1".to_string());
        let names: Vec<String> = names(&attrs)
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            vec!["docker.io/library/foo:latest", "127.0.0.1:5000/bar:1"]
        );
    }
}
