//! Exporters: commit a result snapshot as an image (config + manifest in the
//! worker's content store) and deliver it — as a `docker`/`oci` tarball over
//! the session's `FileSend`, pushed to registries (`image` with `push=true`),
//! or only in the store (`image` without an image store, as BuildKit's OCI
//! worker does). The file exporters (`local`, `tar`) live in
//! [`crate::fsexport`].
//!
//! Layers are converted on the way when the attrs ask (`compression`,
//! `compression-level`, `force-compression`, `rewrite-timestamp`); the
//! conversions are remembered in the content store (`kiln_image::convert`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use kiln_image::compression::{Compression, CompressionOptions};
use kiln_image::convert::{self, ConvertTarget};
use kiln_image::oci::{
    media_types, Descriptor, History, ImageConfig, ImageIndex, ImageManifest, Platform, RootFs,
};
use kiln_image::reference::Reference;
use kiln_image::registry::{BlobPush, RegistryHosts, Resolver};
use kiln_image::Digest;
use kiln_solver::{LazyImage, SolveResult, VertexProgress};
use kiln_worker::{SnapshotId, Worker};

/// An image written to the content store.
#[derive(Clone, Debug)]
pub struct CommittedImage {
    /// The manifest descriptor (an index for a multi-platform result).
    pub manifest: Descriptor,
    /// The config digest (`None` for a multi-platform index, as BuildKit reports none).
    pub config: Option<Digest>,
    /// The config's `created` time (RFC 3339).
    pub created: String,
}

/// Registry settings for pushes (the daemon's `[registry."host"]` table).
static REGISTRY_HOSTS: OnceLock<RegistryHosts> = OnceLock::new();

/// Sets the registry settings pushes use; call once at daemon start. Without
/// it pushes use the defaults (https, with the http fallback for loopback
/// hosts).
pub fn set_registry_hosts(hosts: RegistryHosts) {
    if REGISTRY_HOSTS.set(hosts).is_err() {
        tracing::warn!("registry hosts for exporters were already set");
    }
}

/// The registry settings set with [`set_registry_hosts`] (defaults without).
pub fn registry_hosts() -> RegistryHosts {
    REGISTRY_HOSTS.get().cloned().unwrap_or_default()
}

/// The settings every exporter reads from its attrs.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// `name` (normalized).
    pub names: Vec<Reference>,
    /// `push`.
    pub push: bool,
    /// `push-by-digest`: push the manifest without a tag.
    pub push_by_digest: bool,
    /// `name-canonical`: also name the image `<name>@<digest>`.
    pub name_canonical: bool,
    /// `registry.insecure`: https without certificate checks, then http.
    pub insecure: bool,
    /// `oci-mediatypes`.
    pub oci_media_types: bool,
    /// `compression` and `compression-level` (`None`: keep layers as they are).
    pub compression: Option<CompressionOptions>,
    /// `force-compression`: also convert layers pulled from a registry.
    pub force_compression: bool,
    /// `rewrite-timestamp`: clamp file times in layers to the epoch.
    pub rewrite_timestamp: bool,
    /// `source-date-epoch` (seconds).
    pub source_date_epoch: Option<u64>,
    /// `annotation.KEY=VALUE` and `annotation-manifest.KEY=VALUE`: the manifest's annotations.
    pub manifest_annotations: BTreeMap<String, String>,
}

/// The manifest annotations of the attrs (`annotation.KEY` and `annotation-manifest.KEY`, as
/// BuildKit). Annotations of an index or of descriptors, and platform-qualified ones
/// (`annotation[linux/amd64].KEY`), are refused: kiln exports one manifest here.
fn manifest_annotations(
    attrs: &BTreeMap<String, String>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (key, value) in attrs {
        if !key.starts_with("annotation") {
            continue;
        }
        let name = key
            .strip_prefix("annotation.")
            .or_else(|| key.strip_prefix("annotation-manifest."));
        match name {
            Some(name) if !name.is_empty() => {
                out.insert(name.to_string(), value.clone());
            }
            _ => bail!(
                "exporter attribute {key}: only annotation.KEY and annotation-manifest.KEY \
                 (manifest annotations) are supported"
            ),
        }
    }
    Ok(out)
}

impl ExportOptions {
    /// Reads the attrs of an exporter of kind `kind`.
    pub fn parse(kind: ExporterKind, attrs: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let level = match attrs.get("compression-level").map(|l| l.trim()) {
            None | Some("") => None,
            Some(l) => Some(
                l.parse::<i32>()
                    .with_context(|| format!("invalid compression-level {l:?}"))?,
            ),
        };
        let compression = match attrs.get("compression").map(String::as_str) {
            None | Some("") => level.map(|l| (Compression::Gzip, Some(l))),
            Some(name) => Some((Compression::parse(name)?, level)),
        }
        .map(|(kind, level)| CompressionOptions::new(kind, level))
        .transpose()?;
        let source_date_epoch = match attrs.get("source-date-epoch").map(|v| v.trim()) {
            None | Some("") => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .with_context(|| format!("invalid source-date-epoch {v:?}"))?,
            ),
        };
        let mut oci_media_types = bool_attr(attrs, "oci-mediatypes", kind == ExporterKind::Oci)?;
        if compression.is_some_and(|c| c.kind == Compression::Zstd) {
            // zstd layers only exist with OCI media types (BuildKit switches too).
            oci_media_types = true;
        }
        Ok(Self {
            names: names(attrs)?,
            push: kind == ExporterKind::Image && bool_attr(attrs, "push", false)?,
            push_by_digest: bool_attr(attrs, "push-by-digest", false)?,
            name_canonical: bool_attr(attrs, "name-canonical", false)?,
            insecure: bool_attr(attrs, "registry.insecure", false)?,
            oci_media_types,
            compression,
            force_compression: bool_attr(attrs, "force-compression", false)?,
            rewrite_timestamp: bool_attr(attrs, "rewrite-timestamp", false)?,
            source_date_epoch,
            manifest_annotations: manifest_annotations(attrs)?,
        })
    }
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
    /// `type=local`: the result's files into a client directory.
    Local,
    /// `type=tar`: the result's files as one tar stream.
    Tar,
}

impl ExporterKind {
    /// The progress title of the exporter's vertex.
    pub fn title(self) -> &'static str {
        match self {
            Self::Image => "exporting to image",
            Self::Docker => "exporting to docker image format",
            Self::Oci => "exporting to oci image format",
            Self::Local => "exporting to client directory",
            Self::Tar => "exporting to client tarball",
        }
    }

    /// Parses an exporter type name.
    pub fn parse(kind: &str) -> anyhow::Result<Self> {
        match kind {
            "image" => Ok(Self::Image),
            "docker" => Ok(Self::Docker),
            "oci" => Ok(Self::Oci),
            "local" => Ok(Self::Local),
            "tar" => Ok(Self::Tar),
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
        media_types::OCI_LAYER => media_types::DOCKER_LAYER.to_string(),
        other => other.to_string(),
    }
}

fn oci_media_type(docker: &str) -> String {
    match docker {
        media_types::DOCKER_LAYER_GZIP => media_types::OCI_LAYER_GZIP.to_string(),
        media_types::DOCKER_LAYER => media_types::OCI_LAYER.to_string(),
        other => other.to_string(),
    }
}

/// Writes the image config and manifest for `result` (its snapshot's layers
/// bottom to top, converted as `options` asks; its image config and creation
/// time) into the worker's content store.
/// Without a snapshot, `result.lazy` (a base image the worker has not pulled)
/// gives the layers as its manifest names them: their blobs stay in the
/// registry, recorded as the blobs' sources so a push mounts them, unless a
/// conversion needs their bytes (see [`fetch_lazy_layers`] for exporters
/// that do).
/// With `inline_cache`, the records of that solve whose results are part of
/// the image go into the config under `moby.buildkit.cache.v0` (see
/// [`crate::cache`]).
pub async fn commit_image(
    worker: &dyn Worker,
    result: &ExportRef,
    options: &ExportOptions,
    inline_cache: Option<&SolveResult>,
    progress: &VertexProgress,
) -> anyhow::Result<CommittedImage> {
    let mut config = result.image_config.clone();
    let created = result.created;
    let oci_mediatypes = options.oci_media_types;
    progress.status("exporting layers", "exporting layers", 0, None, false);
    let clamp = options
        .source_date_epoch
        .filter(|_| options.rewrite_timestamp);
    let converts = options.compression.is_some() || clamp.is_some();
    let mut layers = match (&result.snapshot, &result.lazy) {
        (Some(id), _) => worker.layers(id).await.context("failed to export layers")?,
        (None, Some(image)) => {
            record_sources(worker, image);
            if converts {
                fetch_lazy_layers(worker, image, progress).await?;
            }
            image.layers.clone()
        }
        (None, None) => Vec::new(),
    };
    if converts {
        let store = worker.content().clone();
        let options = options.clone();
        layers =
            tokio::task::spawn_blocking(move || convert_layers(&store, layers, &options, clamp))
                .await
                .context("layer conversion panicked")??;
    }
    progress.status("exporting layers", "exporting layers", 0, None, true);

    // The time the result was first built, not the export time: a fully
    // cached rebuild then yields the very same config and manifest digests.
    // SOURCE_DATE_EPOCH wins over both.
    let epoch_time = options
        .source_date_epoch
        .and_then(|secs| chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0));
    let created = epoch_time
        .or_else(|| {
            created.and_then(|secs| chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, 0))
        })
        .unwrap_or_else(chrono::Utc::now)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    config.rootfs = RootFs {
        kind: "layers".to_string(),
        diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
    };
    if config.created.is_none() || epoch_time.is_some() {
        config.created = Some(created.clone());
    }
    for entry in &mut config.history {
        let later = match (&entry.created, epoch_time) {
            (None, _) => true,
            (Some(t), Some(epoch)) => chrono::DateTime::parse_from_rfc3339(t)
                .map_or(true, |t| t.timestamp() > epoch.timestamp()),
            (Some(_), None) => false,
        };
        if later {
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
    let cache = match inline_cache {
        Some(result) => {
            let value = crate::cache::inline_cache(worker, result, &layers)
                .await
                .context("failed to write the inline cache")?;
            if value.is_none() {
                let text = "WARNING: inline cache: no build step's result is part of the image\n";
                progress.log(2, text.as_bytes());
            }
            value
        }
        None => None,
    };
    let config_bytes = serde_json::to_vec(&ConfigWithCache {
        config: &config,
        cache,
    })
    .context("failed to encode image config")?;
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
        annotations: (!options.manifest_annotations.is_empty())
            .then(|| options.manifest_annotations.clone()),
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
        config: Some(config_digest),
        created,
    })
}

/// An image config with BuildKit's inline cache key next to its fields
/// (serialized exactly as the bare config when there is no cache).
#[derive(serde::Serialize)]
struct ConfigWithCache<'a> {
    #[serde(flatten)]
    config: &'a ImageConfig,
    #[serde(
        rename = "moby.buildkit.cache.v0",
        skip_serializing_if = "Option::is_none"
    )]
    cache: Option<String>,
}

/// Converts the layers `options` asks to convert. Layers pulled from a
/// registry (the store knows a source for them) are kept as they are unless
/// `force-compression` is set; a layer already in the wanted compression is
/// kept unless its times must be clamped.
fn convert_layers(
    store: &kiln_image::content::ContentStore,
    layers: Vec<kiln_worker::Layer>,
    options: &ExportOptions,
    clamp: Option<u64>,
) -> anyhow::Result<Vec<kiln_worker::Layer>> {
    let mut out = Vec::with_capacity(layers.len());
    for layer in layers {
        let pulled = !store.sources(&layer.descriptor.digest).is_empty();
        let current =
            Compression::from_media_type(&layer.descriptor.media_type).unwrap_or(Compression::Gzip);
        let compression = match options.compression {
            Some(c) if options.force_compression || !pulled => c,
            _ => CompressionOptions {
                kind: current,
                level: None,
            },
        };
        let target = ConvertTarget {
            compression,
            oci_media_types: true,
            clamp_mtime: clamp.filter(|_| !pulled || options.force_compression),
        };
        if convert::matches(&layer.descriptor, &target) {
            out.push(layer);
            continue;
        }
        let converted =
            convert::convert_layer(store, &layer.descriptor, &layer.diff_id, &target)
                .with_context(|| format!("failed to convert layer {}", layer.descriptor.digest))?;
        out.push(kiln_worker::Layer {
            descriptor: converted.descriptor,
            diff_id: converted.diff_id,
        });
    }
    Ok(out)
}

/// The result of one target platform.
#[derive(Clone, Debug)]
pub struct ExportRef {
    /// The target platform (canonical).
    pub platform: Platform,
    /// The result snapshot (`None` = scratch, or `lazy`).
    pub snapshot: Option<SnapshotId>,
    /// The result is a base image the worker has not pulled: its layers are in the registry.
    pub lazy: Option<LazyImage>,
    /// The frontend's image config.
    pub image_config: ImageConfig,
    /// When the result was first built (seconds since the epoch).
    pub created: Option<u64>,
    /// The SLSA provenance predicate to attest for this platform's image (`attest:provenance`).
    pub provenance: Option<serde_json::Value>,
}

/// What every exporter works from.
pub struct ExportInput<'a> {
    /// The worker holding the result.
    pub worker: &'a dyn Worker,
    /// The results, one per target platform (exactly one when not `multi_platform`).
    pub refs: &'a [ExportRef],
    /// A multi-platform result (BuildKit's `refs` map with `refs.platforms`): image exporters
    /// write an index, file exporters one directory per platform.
    pub multi_platform: bool,
    /// The client's session, for file exporters.
    pub session: Option<&'a kiln_session::Session>,
    /// Where temporary files go.
    pub tmp_dir: &'a Path,
    /// The solve whose cache goes inline into image configs (`--cache-to
    /// type=inline`), if asked.
    pub inline_cache: Option<&'a SolveResult>,
}

impl ExportInput<'_> {
    /// The one result of a single-platform build.
    pub fn single(&self) -> anyhow::Result<&ExportRef> {
        match (self.multi_platform, self.refs) {
            (false, [one]) => Ok(one),
            _ => bail!("expected a single-platform result"),
        }
    }
}

/// Commits the result as an image: its manifest for a single-platform result, else one
/// manifest per platform and an index over them (each entry carrying its `platform`; OCI
/// index or Docker manifest list after the manifests' media types), as BuildKit's image
/// exporters do.
pub async fn commit_result(
    input: &ExportInput<'_>,
    options: &ExportOptions,
    progress: &VertexProgress,
) -> anyhow::Result<CommittedImage> {
    let attested = input.refs.iter().any(|r| r.provenance.is_some());
    if !input.multi_platform && !attested {
        let one = input.single()?;
        return commit_image(input.worker, one, options, input.inline_cache, progress).await;
    }
    // As BuildKit, attestations need an OCI index (a Docker manifest list cannot hold
    // them), so they switch the whole image to OCI media types.
    let attested_options;
    let options = if attested && !options.oci_media_types {
        attested_options = ExportOptions {
            oci_media_types: true,
            ..options.clone()
        };
        &attested_options
    } else {
        options
    };
    let mut manifests = Vec::with_capacity(input.refs.len());
    let mut attestations = Vec::new();
    let mut created = None;
    for one in input.refs {
        // Inline cache is refused for several platforms (`--cache-to` with a multi-platform
        // build), so none goes into these configs.
        let image = commit_image(input.worker, one, options, None, progress)
            .await
            .with_context(|| format!("failed to export the image for {}", one.platform.id()))?;
        let mut descriptor = image.manifest;
        descriptor.platform = Some(one.platform.canonical());
        if let Some(predicate) = &one.provenance {
            attestations.push(
                commit_attestation(input.worker, predicate, &descriptor, options, progress)
                    .with_context(|| {
                        format!(
                            "failed to write the provenance attestation for {}",
                            one.platform.id()
                        )
                    })?,
            );
        }
        manifests.push(descriptor);
        created = created.max(Some(image.created));
    }
    // Attestation manifests follow every image manifest, as in BuildKit's indexes.
    manifests.extend(attestations);
    let media_type = if options.oci_media_types {
        media_types::OCI_INDEX
    } else {
        media_types::DOCKER_MANIFEST_LIST
    };
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(media_type.to_string()),
        manifests,
        annotations: None,
    };
    let bytes = serde_json::to_vec(&index).context("failed to encode image index")?;
    let digest = input
        .worker
        .content()
        .write_blob(&bytes)
        .context("failed to write image index")?;
    let status = format!("exporting manifest list {digest}");
    progress.status(&status, &status, 0, None, true);
    Ok(CommittedImage {
        manifest: Descriptor::new(media_type, digest, bytes.len() as u64),
        config: None,
        created: created.unwrap_or_default(),
    })
}

/// Writes the attestation manifest of `image` (one platform's manifest): an OCI manifest of
/// platform `unknown/unknown` whose one layer is the in-toto statement of `predicate` about
/// `image`, as BuildKit's `commitAttestationsManifest`. Returns its index descriptor, carrying
/// the `vnd.docker.reference.*` annotations that tie it to `image`.
fn commit_attestation(
    worker: &dyn Worker,
    predicate: &serde_json::Value,
    image: &Descriptor,
    options: &ExportOptions,
    progress: &VertexProgress,
) -> anyhow::Result<Descriptor> {
    use crate::provenance;
    let platform = image.platform.clone().unwrap_or_else(Platform::host);
    let statement = provenance::statement(predicate, &image.digest, &options.names, &platform)?;
    let content = worker.content();
    let statement_digest = content
        .write_blob(&statement)
        .context("failed to write the in-toto statement")?;
    let mut layer = Descriptor::new(
        provenance::IN_TOTO_MEDIA_TYPE,
        statement_digest.clone(),
        statement.len() as u64,
    );
    layer.annotations = Some(BTreeMap::from([(
        provenance::PREDICATE_TYPE_ANNOTATION.to_string(),
        provenance::PREDICATE_TYPE.to_string(),
    )]));
    // The statement is not a tar: its digest stands for the diff id, as in BuildKit.
    let config = serde_json::json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [statement_digest.to_string()] },
    });
    let config_bytes = serde_json::to_vec(&config).context("failed to encode config")?;
    let config_digest = content
        .write_blob(&config_bytes)
        .context("failed to write the attestation config")?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.to_string()),
        config: Descriptor::new(
            media_types::OCI_CONFIG,
            config_digest,
            config_bytes.len() as u64,
        ),
        layers: vec![layer],
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest).context("failed to encode manifest")?;
    let digest = content
        .write_blob(&bytes)
        .context("failed to write the attestation manifest")?;
    let status = format!("exporting attestation manifest {digest}");
    progress.status(&status, &status, 0, None, true);
    let mut descriptor = Descriptor::new(media_types::OCI_MANIFEST, digest, bytes.len() as u64);
    descriptor.annotations = Some(BTreeMap::from([
        (
            provenance::REFERENCE_DIGEST_ANNOTATION.to_string(),
            image.digest.to_string(),
        ),
        (
            provenance::REFERENCE_TYPE_ANNOTATION.to_string(),
            provenance::ATTESTATION_MANIFEST.to_string(),
        ),
    ]));
    descriptor.platform = Some(Platform::new("unknown", "unknown", None));
    Ok(descriptor)
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
    if matches!(kind, ExporterKind::Local | ExporterKind::Tar) {
        return crate::fsexport::export(kind, index, attrs, input, vertex).await;
    }
    let options = ExportOptions::parse(kind, attrs)?;
    if kind == ExporterKind::Docker && input.multi_platform {
        bail!(
            "docker exporter does not currently support exporting manifest lists: \
             use the oci exporter (-o type=oci) or the image exporter for several platforms"
        );
    }
    if kind == ExporterKind::Docker
        && bool_attr(attrs, "tar", true)?
        && input.refs.iter().any(|r| r.provenance.is_some())
    {
        // A docker tarball names one manifest in manifest.json; BuildKit's docker exporter
        // drops attestations there, kiln refuses instead of losing them silently.
        bail!(
            "docker exporter cannot hold attestations: use the oci exporter (-o type=oci) \
             or the image exporter for a build with provenance"
        );
    }
    let image = commit_result(input, &options, vertex).await?;
    let mut names = options.names.clone();
    if options.name_canonical {
        for name in &options.names {
            names.push(canonical(name, &image.manifest.digest)?);
        }
    }
    let response = response(&image, &names)?;
    if options.push {
        // Lazy layers are mounted from the image's repository when the target is in the same
        // registry; otherwise (or when the registry refuses the mount) their bytes are needed.
        let same_registry = input
            .refs
            .iter()
            .filter_map(|r| r.lazy.as_ref())
            .all(|lazy| {
                options
                    .names
                    .iter()
                    .all(|name| name.domain() == lazy.reference.domain())
            });
        if !same_registry {
            fetch_all_lazy_layers(input, vertex).await?;
        }
        if let Err(e) = push(input.worker, &image, &options, vertex).await {
            if !missing_lazy_layers(input) {
                return Err(e);
            }
            tracing::debug!(error = %format!("{e:#}"), "push without the lazy layers failed, fetching them");
            fetch_all_lazy_layers(input, vertex).await?;
            push(input.worker, &image, &options, vertex).await?;
        }
    }
    if kind == ExporterKind::Image && input.worker.image_store().is_some() {
        fetch_all_lazy_layers(input, vertex).await?;
    }
    if kind == ExporterKind::Image {
        store_image(kind, attrs, input, &image, &options.names, vertex).await?;
    }
    if matches!(kind, ExporterKind::Docker | ExporterKind::Oci) {
        fetch_all_lazy_layers(input, vertex).await?;
    }
    if matches!(kind, ExporterKind::Docker | ExporterKind::Oci) && !bool_attr(attrs, "tar", true)? {
        let session = input
            .session
            .context("tar=false needs a session whose content store receives the image")?;
        let store = kiln_session::content::SessionContentStore::new(
            session.channel(),
            kiln_session::content::EXPORT_STORE,
        );
        write_to_session_store(input.worker, &image, &store, vertex).await?;
    }
    if matches!(kind, ExporterKind::Docker | ExporterKind::Oci) && bool_attr(attrs, "tar", true)? {
        let session = input
            .session
            .context("a tarball exporter needs a session to send the file to")?;
        let archive = kiln_image::archive::ArchiveOptions {
            docker_manifest: kind == ExporterKind::Docker,
            created: Some(image.created.clone()),
        };
        let file = archive_to_temp(
            input.worker,
            &image,
            &options.names,
            &archive,
            input.tmp_dir,
        )
        .await?;
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

/// Records the image's repository as the source of each of its layers, so a push to another
/// repository of the same registry mounts them instead of uploading bytes kiln never fetched.
fn record_sources(worker: &dyn Worker, image: &LazyImage) {
    let source = image.reference.name();
    for layer in &image.layers {
        if let Err(e) = worker
            .content()
            .add_source(&layer.descriptor.digest, &source)
        {
            tracing::warn!(digest = %layer.descriptor.digest, error = %e, "failed to record blob source");
        }
    }
}

/// Whether a lazy result has a layer blob the worker's content store lacks.
fn missing_lazy_layers(input: &ExportInput<'_>) -> bool {
    input
        .refs
        .iter()
        .filter_map(|r| r.lazy.as_ref())
        .flat_map(|lazy| &lazy.layers)
        .any(|layer| !input.worker.content().has(&layer.descriptor.digest))
}

/// [`fetch_lazy_layers`] for every lazy result of `input`.
async fn fetch_all_lazy_layers(
    input: &ExportInput<'_>,
    progress: &VertexProgress,
) -> anyhow::Result<()> {
    for lazy in input.refs.iter().filter_map(|r| r.lazy.as_ref()) {
        fetch_lazy_layers(input.worker, lazy, progress).await?;
    }
    Ok(())
}

/// Downloads the layer blobs of a base image the worker has not pulled into its content store
/// (only the ones it lacks, digests verified), from the repository the image came from: for
/// exporters that need the bytes (tarballs, a client's content store, an image store, layer
/// conversion). The image is not unpacked.
pub async fn fetch_lazy_layers(
    worker: &dyn Worker,
    image: &LazyImage,
    progress: &VertexProgress,
) -> anyhow::Result<()> {
    let missing: Vec<&kiln_worker::Layer> = image
        .layers
        .iter()
        .filter(|l| !worker.content().has(&l.descriptor.digest))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let resolver = Resolver::new(registry_hosts()).context("failed to create registry client")?;
    for layer in missing {
        let digest = &layer.descriptor.digest;
        let status = format!("fetching {digest}");
        progress.status(&status, &status, 0, Some(layer.descriptor.size), false);
        resolver
            .fetch_blob(&image.reference, &layer.descriptor, worker.content())
            .await
            .with_context(|| format!("failed to fetch layer {digest} of {}", image.reference))?;
        let size = layer.descriptor.size;
        progress.status(&status, &status, size, Some(size), true);
    }
    Ok(())
}

/// What [`write_to_session_store`] moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreWrite {
    /// Blobs written into the client's store.
    pub blobs_sent: usize,
    /// Bytes of the written blobs.
    pub bytes_sent: u64,
    /// Blobs the store already had (not sent).
    pub blobs_present: usize,
}

/// `oci`/`docker` with `tar=false` (reference §5.11): copies the image's blobs into the
/// session content store `export` — layers and config first, the manifest last, so a store
/// holding the manifest holds everything under it. Each blob is first asked for with `Info`
/// and skipped when present; a write answered `AlreadyExists` counts as present too, so this
/// behaves like BuildKit's copy (which opens a writer and takes `AlreadyExists` as done)
/// against any client store.
pub async fn write_to_session_store(
    worker: &dyn Worker,
    image: &CommittedImage,
    store: &kiln_session::content::SessionContentStore,
    vertex: &VertexProgress,
) -> anyhow::Result<StoreWrite> {
    let content = worker.content();
    let read_manifest = |digest: &Digest| -> anyhow::Result<ImageManifest> {
        let bytes = content
            .read(digest)
            .with_context(|| format!("failed to read manifest {digest}"))?;
        serde_json::from_slice(&bytes).with_context(|| format!("invalid manifest {digest}"))
    };
    // Children before parents: each manifest after its layers and config, an index last.
    let mut manifests = Vec::new();
    if media_types::is_index(&image.manifest.media_type) {
        let bytes = content
            .read(&image.manifest.digest)
            .with_context(|| format!("failed to read index {}", image.manifest.digest))?;
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .with_context(|| format!("invalid index {}", image.manifest.digest))?;
        manifests.extend(index.manifests);
    } else {
        manifests.push(image.manifest.clone());
    }
    let mut blobs: Vec<(&str, Digest, u64)> = Vec::new();
    for descriptor in &manifests {
        let manifest = read_manifest(&descriptor.digest)?;
        for layer in &manifest.layers {
            if !blobs.iter().any(|(_, d, _)| *d == layer.digest) {
                blobs.push(("layer", layer.digest.clone(), layer.size));
            }
        }
        blobs.push((
            "config",
            manifest.config.digest.clone(),
            manifest.config.size,
        ));
        blobs.push(("manifest", descriptor.digest.clone(), descriptor.size));
    }
    if media_types::is_index(&image.manifest.media_type) {
        blobs.push(("index", image.manifest.digest.clone(), image.manifest.size));
    }

    let status = "writing image to the client's content store";
    let total: u64 = blobs.iter().map(|(_, _, size)| size).sum();
    vertex.status(status, status, 0, Some(total), false);
    let mut done = StoreWrite::default();
    let mut progressed = 0;
    for (kind, digest, size) in &blobs {
        let text = digest.to_string();
        let present = store
            .info(&text)
            .await
            .with_context(|| format!("failed to ask the client's content store for {digest}"))?
            .is_some();
        if present {
            done.blobs_present += 1;
        } else {
            let file = tokio::fs::File::open(content.path(digest))
                .await
                .with_context(|| format!("failed to open {kind} {digest}"))?;
            let reference = format!("kiln-{kind}-{text}-{}", rand::random::<u32>());
            match store
                .write(&reference, &text, *size, file)
                .await
                .with_context(|| format!("failed to write {kind} {digest} to the client"))?
            {
                kiln_session::content::WriteOutcome::Written(bytes) => {
                    done.blobs_sent += 1;
                    done.bytes_sent += bytes;
                }
                kiln_session::content::WriteOutcome::AlreadyExists => done.blobs_present += 1,
            }
        }
        progressed += size;
        vertex.status(status, status, progressed, Some(total), false);
    }
    vertex.status(status, status, progressed, Some(total), true);
    tracing::info!(
        manifest = %image.manifest.digest,
        sent = done.blobs_sent,
        bytes = done.bytes_sent,
        present = done.blobs_present,
        "image written to the session content store"
    );
    Ok(done)
}

/// `type=image` with a worker that has an image store (the containerd
/// worker): name the image there under every name (or
/// `<dangling-name-prefix>@<digest>` when it has none) and, with
/// `unpack=true`, unpack it into the worker's snapshotter. Without an image
/// store (the OCI worker) `store` and `unpack` are ignored, as BuildKit does.
async fn store_image(
    kind: ExporterKind,
    attrs: &BTreeMap<String, String>,
    input: &ExportInput<'_>,
    image: &CommittedImage,
    names: &[Reference],
    vertex: &VertexProgress,
) -> anyhow::Result<()> {
    debug_assert_eq!(kind, ExporterKind::Image);
    let Some(store) = input.worker.image_store() else {
        return Ok(());
    };
    if !bool_attr(attrs, "store", true)? {
        return Ok(());
    }
    let mut stored: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    if stored.is_empty() {
        if let Some(prefix) = attrs.get("dangling-name-prefix").filter(|p| !p.is_empty()) {
            stored.push(format!("{prefix}@{}", image.manifest.digest));
        }
    }
    let unpack = bool_attr(attrs, "unpack", false)?;
    // The platform containers run: the host's when built, else the first one built (a
    // foreign platform's files unpack fine; only running them needs emulation).
    let host = Platform::host();
    let platform = input
        .refs
        .iter()
        .map(|r| &r.platform)
        .find(|p| host.matches(p))
        .or_else(|| input.refs.first().map(|r| &r.platform))
        .cloned()
        .unwrap_or(host);
    for name in &stored {
        let status = format!("naming to {name}");
        vertex.status(&status, &status, 0, None, false);
        store
            .create_image(name, &image.manifest, input.worker.content())
            .await
            .with_context(|| format!("failed to name the image {name}"))?;
        vertex.status(&status, &status, 0, None, true);
    }
    if unpack {
        if let Some(first) = stored.first() {
            let status = format!("unpacking to {first}");
            vertex.status(&status, &status, 0, None, false);
            store
                .unpack(first, &platform)
                .await
                .with_context(|| format!("failed to unpack {first}"))?;
            vertex.status(&status, &status, 0, None, true);
        }
    }
    Ok(())
}

/// `<name>@<digest>` (the tag dropped).
fn canonical(name: &Reference, digest: &Digest) -> anyhow::Result<Reference> {
    let text = format!("{}@{digest}", name.name());
    Reference::parse_normalized(&text).with_context(|| format!("invalid image name {text:?}"))
}

/// Pushes `image` to every name (by digest with `push-by-digest`).
/// Returns how many blobs were uploaded, for progress and tests.
pub async fn push(
    worker: &dyn Worker,
    image: &CommittedImage,
    options: &ExportOptions,
    vertex: &VertexProgress,
) -> anyhow::Result<usize> {
    if options.names.is_empty() {
        bail!("push requires a name: set name=<image> on the image exporter");
    }
    let mut hosts = REGISTRY_HOSTS.get().cloned().unwrap_or_default();
    if options.insecure {
        for name in &options.names {
            hosts.allow_insecure(name.domain());
        }
    }
    let resolver = Resolver::new(hosts).context("failed to create registry client")?;
    let mut uploaded = 0;
    for name in &options.names {
        let target = if options.push_by_digest {
            canonical(name, &image.manifest.digest)?
        } else {
            name.clone()
        };
        let status = format!("pushing {target}");
        vertex.status(&status, &status, 0, None, false);
        let report = resolver
            .push_image(&target, &image.manifest, worker.content())
            .await
            .with_context(|| format!("failed to push {target}"))?;
        uploaded += report.count(BlobPush::Uploaded);
        tracing::info!(
            image = %target,
            digest = %report.digest,
            uploaded = report.count(BlobPush::Uploaded),
            mounted = report.count(BlobPush::Mounted),
            existing = report.count(BlobPush::Existing),
            "pushed"
        );
        vertex.status(&status, &status, 0, None, true);
    }
    Ok(uploaded)
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
    if let Some(config) = &image.config {
        out.insert(
            "containerimage.config.digest".to_string(),
            config.to_string(),
        );
    }
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
    options: &kiln_image::archive::ArchiveOptions,
    tmp_dir: &Path,
) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(tmp_dir)
        .with_context(|| format!("failed to create {}", tmp_dir.display()))?;
    let store = worker.content().clone();
    let manifest = image.manifest.clone();
    let names = names.to_vec();
    let options = options.clone();
    let tmp_dir = tmp_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
        let mut file =
            tempfile::tempfile_in(&tmp_dir).context("failed to create temporary archive")?;
        {
            let mut writer = std::io::BufWriter::new(&mut file);
            kiln_image::archive::write_archive(&mut writer, &store, &manifest, &names, &options)
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

    use kiln_worker_oci::{OciWorker, OciWorkerConfig};

    fn vertex() -> VertexProgress {
        kiln_solver::ProgressWriter::discard().start_vertex("test", "test", Vec::new())
    }

    fn worker(root: &Path) -> OciWorker {
        OciWorker::open(OciWorkerConfig {
            root: root.to_path_buf(),
            runc_binary: "/usr/sbin/runc".into(),
            registry_hosts: RegistryHosts::new(),
            labels: BTreeMap::new(),
            platforms: None,
        })
        .unwrap()
    }

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn skopeo_digest(image: &str) -> String {
        let out = std::process::Command::new("skopeo")
            .args([
                "inspect",
                "--no-tags",
                "--tls-verify=false",
                "--format",
                "{{.Digest}}",
            ])
            .arg(format!("docker://{image}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A local-source snapshot holding two files with the given mtime.
    async fn dir_snapshot(worker: &OciWorker, root: &Path, mtime: u64) -> SnapshotId {
        let dir = root.join(format!("src-{mtime}"));
        std::fs::create_dir_all(dir.join("app")).unwrap();
        for (name, body) in [("app/a.txt", "alpha\n"), ("b.txt", "beta\n")] {
            std::fs::write(dir.join(name), body).unwrap();
            let file = std::fs::File::options()
                .write(true)
                .open(dir.join(name))
                .unwrap();
            file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))
                .unwrap();
        }
        worker.snapshot_from_dir(&dir).await.unwrap()
    }

    #[test]
    fn export_options_from_attrs() {
        let o = ExportOptions::parse(
            ExporterKind::Image,
            &attrs(&[
                ("name", "127.0.0.1:5000/a:1,127.0.0.1:5000/b"),
                ("push", "true"),
                ("push-by-digest", ""),
                ("compression", "zstd"),
                ("compression-level", "9"),
                ("source-date-epoch", "1700000000"),
                ("rewrite-timestamp", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(o.names.len(), 2);
        assert!(o.push && o.push_by_digest && o.rewrite_timestamp && !o.force_compression);
        assert!(o.oci_media_types, "zstd implies OCI media types");
        assert_eq!(o.compression.unwrap().effective_level(), 9);
        assert_eq!(o.source_date_epoch, Some(1_700_000_000));
        assert!(
            ExportOptions::parse(ExporterKind::Image, &attrs(&[("compression", "lz4")])).is_err()
        );
        assert!(
            ExportOptions::parse(ExporterKind::Image, &attrs(&[("compression-level", "x")]))
                .is_err()
        );
        let o = ExportOptions::parse(
            ExporterKind::Image,
            &attrs(&[("annotation.a", "1"), ("annotation-manifest.b", "2")]),
        )
        .unwrap();
        assert_eq!(
            o.manifest_annotations,
            BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())])
        );
        for refused in [
            "annotation-index.a",
            "annotation[linux/amd64].a",
            "annotation.",
        ] {
            let error = ExportOptions::parse(ExporterKind::Image, &attrs(&[(refused, "1")]))
                .unwrap_err()
                .to_string();
            assert!(error.contains("only annotation.KEY"), "{refused}: {error}");
        }
        // push is an image exporter attr only.
        let o = ExportOptions::parse(ExporterKind::Oci, &attrs(&[("push", "true")])).unwrap();
        assert!(!o.push && o.oci_media_types);
    }

    #[tokio::test]
    async fn push_every_name_then_nothing_to_upload_and_canonical_names() {
        let tmp = tempfile::tempdir().unwrap();
        let worker = worker(tmp.path());
        let busybox = Reference::parse_normalized("127.0.0.1:5000/busybox:latest").unwrap();
        let resolved = worker
            .resolve_image(&busybox, &kiln_image::oci::Platform::host())
            .await
            .unwrap();
        let base = worker
            .pull(&resolved, &kiln_worker::NoProgress)
            .await
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let repo = format!("127.0.0.1:5000/kiln-test/export-{nanos}");
        let refs = [ExportRef {
            platform: Platform::host().canonical(),
            snapshot: base.clone(),
            lazy: None,
            image_config: resolved.config.clone(),
            created: Some(1_600_000_000),
            provenance: None,
        }];
        let input = ExportInput {
            worker: &worker,
            refs: &refs,
            multi_platform: false,
            session: None,
            tmp_dir: tmp.path(),
            inline_cache: None,
        };
        let a = attrs(&[
            ("name", &format!("{repo}:one,{repo}:two")),
            ("push", "true"),
            ("name-canonical", "true"),
        ]);
        let response = export(ExporterKind::Image, 0, &a, &input, &vertex())
            .await
            .unwrap();
        let digest = &response["containerimage.digest"];
        assert_eq!(&skopeo_digest(&format!("{repo}:one")), digest);
        assert_eq!(&skopeo_digest(&format!("{repo}:two")), digest);
        assert_eq!(
            response["image.name"],
            format!("{repo}:one,{repo}:two,{repo}@{digest},{repo}@{digest}")
        );

        // The same image again: no blob is uploaded.
        let options = ExportOptions::parse(ExporterKind::Image, &a).unwrap();
        let image = commit_image(&worker, &refs[0], &options, None, &vertex())
            .await
            .unwrap();
        assert_eq!(&image.manifest.digest.to_string(), digest);
        assert_eq!(push(&worker, &image, &options, &vertex()).await.unwrap(), 0);

        // By digest: no tag needed, reachable as repo@digest.
        let by_digest = format!("{repo}-bydigest");
        let a = attrs(&[
            ("name", &by_digest),
            ("push", "true"),
            ("push-by-digest", "true"),
        ]);
        let response = export(ExporterKind::Image, 0, &a, &input, &vertex())
            .await
            .unwrap();
        let digest = &response["containerimage.digest"];
        assert_eq!(&skopeo_digest(&format!("{by_digest}@{digest}")), digest);
    }

    #[tokio::test]
    async fn same_epoch_gives_same_manifest_digest_and_compression_is_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let worker = worker(tmp.path());
        // Two "builds" of the same files at different times.
        let first = dir_snapshot(&worker, tmp.path(), 1_800_000_000).await;
        let second = dir_snapshot(&worker, tmp.path(), 1_900_000_000).await;
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            ..Default::default()
        };
        let commit = |snapshot: SnapshotId, created: u64, a: BTreeMap<String, String>| {
            let worker = &worker;
            let config = config.clone();
            async move {
                let options = ExportOptions::parse(ExporterKind::Image, &a).unwrap();
                let result = ExportRef {
                    platform: Platform::host().canonical(),
                    snapshot: Some(snapshot),
                    lazy: None,
                    image_config: config,
                    created: Some(created),
                    provenance: None,
                };
                commit_image(worker, &result, &options, None, &vertex())
                    .await
                    .unwrap()
            }
        };
        let epoch = attrs(&[
            ("source-date-epoch", "1700000000"),
            ("rewrite-timestamp", "true"),
        ]);
        let one = commit(first.clone(), 1_800_000_000, epoch.clone()).await;
        let two = commit(second.clone(), 1_900_000_000, epoch.clone()).await;
        assert_eq!(one.manifest.digest, two.manifest.digest);
        assert_eq!(one.created, "2023-11-14T22:13:20Z");
        // Without the rewrite the file times differ, and so do the layers.
        let plain = attrs(&[("source-date-epoch", "1700000000")]);
        let one = commit(first.clone(), 1, plain.clone()).await;
        let two = commit(second.clone(), 2, plain).await;
        assert_ne!(one.manifest.digest, two.manifest.digest);
        assert_eq!(one.created, "2023-11-14T22:13:20Z");

        // zstd: the layer is converted and typed accordingly.
        let zstd = commit(first, 1, attrs(&[("compression", "zstd")])).await;
        let manifest: ImageManifest =
            serde_json::from_slice(&worker.content().read(&zstd.manifest.digest).unwrap()).unwrap();
        assert_eq!(
            manifest.media_type.as_deref(),
            Some(media_types::OCI_MANIFEST)
        );
        assert_eq!(manifest.layers[0].media_type, media_types::OCI_LAYER_ZSTD);
        let blob = worker.content().read(&manifest.layers[0].digest).unwrap();
        assert_eq!(&blob[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    }
}
