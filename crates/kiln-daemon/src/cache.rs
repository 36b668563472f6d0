//! Remote cache: `--cache-to` (export) and `--cache-from` (import) for the
//! `registry`, `local` and `inline` backends.
//!
//! The cache is BuildKit's remote cache shape: a cache config blob
//! (`application/vnd.buildkit.cacheconfig.v0`, JSON `{layers, records}`)
//! plus the layer blobs, put in an OCI image manifest whose config is the
//! cache config (BuildKit's `image-manifest=true` layout). A layer entry is
//! `{blob, parent, annotations{mediaType, diffID, size, createdAt}}` with
//! `parent` the index of the layer below (-1 for none); a record is
//! `{digest, inputs: [[{link}]], layers: [{layer, createdAt}]}` whose result
//! is the chain ending at `layer`.
//!
//! Where kiln differs from BuildKit: a record's `digest` is kiln's own cache
//! key (`sha256:<key>`, which already covers the op and its inputs' keys), so
//! kilnd looks records up by digest alone; `inputs` links are written for
//! the shape but not needed on import. BuildKit and kiln therefore cannot
//! use each other's caches, but a kilnd imports what any kilnd exported.
//!
//! - `registry`: the manifest and blobs are pushed to `ref` with the image
//!   push code; import fetches the manifest, then the config, and leaves
//!   layer blobs for the worker to fetch only when a result is applied.
//! - `local`: export writes an OCI layout (`oci-layout`, `index.json` with
//!   the tag in `org.opencontainers.image.ref.name`, `blobs/`) as a tar sent
//!   over the session's `FileSend` with exporter id `cache-<n>`; the client
//!   unpacks it into `dest`. Import receives the client's `src` directory
//!   over `FileSync` (the client exposes it under the dir name in the
//!   `kiln.session-dir` attr) and copies blobs into the worker's store when
//!   a result is applied.
//!
//! - `inline` (`--cache-to type=inline`, or the build arg
//!   `BUILDKIT_INLINE_CACHE=1`): the records ride in the exported image's
//!   config under `moby.buildkit.cache.v0` (base64 of the JSON record list,
//!   as BuildKit writes it); a record's result `layer` is an index into the
//!   image's own layers, the chain being that layer and every one below it.
//!   Only steps whose result is a prefix of the image's layer chain can be
//!   carried (BuildKit's inline cache is `mode=min` too). Import is
//!   `--cache-from type=registry,ref=<image>`: a manifest whose config is an
//!   image config is read as an inline cache.
//!
//! `mode=min` (the default) writes results for the result vertex only,
//! `mode=max` for every vertex; records for every vertex are written in both.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageIndex, ImageManifest};
use kiln_image::reference::Reference;
use kiln_image::registry::{RegistryHosts, Resolver};
use kiln_image::Digest;
use kiln_proto::moby::buildkit::v1::CacheOptionsEntry;
use kiln_session::filesync::{self, Differ, ReceiveRequest};
use kiln_session::Session;
use kiln_solver::{
    BoxError, CacheImport, CacheKey, CacheVertex, ImportedResult, SolveResult, VertexProgress,
};
use kiln_worker::{Layer, Worker};
use serde::{Deserialize, Serialize};

/// Media type of the cache config blob.
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.buildkit.cacheconfig.v0";

/// The attr naming the session directory a `local` import reads.
pub const SESSION_DIR_ATTR: &str = "kiln.session-dir";

/// The index.json annotation holding a manifest's tag.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The build arg nerdctl/buildx users set to ask for an inline cache.
const INLINE_CACHE_BUILD_ARG: &str = "build-arg:BUILDKIT_INLINE_CACHE";

/// The cache config (`application/vnd.buildkit.cacheconfig.v0`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Layer blobs, each pointing at the one below it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    /// Cache records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
}

/// One layer of the cache config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The compressed blob.
    pub blob: Digest,
    /// Index of the layer below, -1 for none (absent means 0, as Go's
    /// `omitempty` writes it).
    #[serde(default)]
    pub parent: i64,
    /// What the blob is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

/// Facts about a layer blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerAnnotations {
    /// The blob's media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// Digest of the uncompressed tar.
    #[serde(rename = "diffID")]
    pub diff_id: Digest,
    /// Blob size in bytes.
    #[serde(default)]
    pub size: u64,
    /// When the layer was made (RFC 3339).
    #[serde(rename = "createdAt", default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// One cache record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Results: each names the top layer of a chain.
    #[serde(rename = "layers", default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResult>,
    /// The record's digest (kiln: `sha256:<cache key>`).
    pub digest: String,
    /// Per input, the records it can come from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

/// A result of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheResult {
    /// Index of the chain's top layer.
    pub layer: usize,
    /// When the result was made (RFC 3339).
    #[serde(rename = "createdAt", default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// A link from a record's input to another record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInput {
    /// Path selector (unused by kiln).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// Index of the input's record.
    pub link: usize,
}

/// What `mode=` asks a cache export to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Results of the result vertex only.
    Min,
    /// Results of every vertex.
    Max,
}

/// Where a cache goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A registry repository (`ref`).
    Registry {
        /// The manifest's reference.
        reference: Reference,
        /// `registry.insecure`.
        insecure: bool,
    },
    /// Records in the exported image's config (export only).
    Inline,
    /// An OCI layout on the client.
    Local {
        /// The tag in index.json (`tag`, default `latest`).
        tag: String,
        /// A manifest digest to import instead of the tag (`digest`).
        digest: Option<Digest>,
        /// Session directory name (import only).
        session_dir: Option<String>,
    },
}

/// One `--cache-to` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheExport {
    /// Where it goes.
    pub backend: Backend,
    /// min or max.
    pub mode: Mode,
}

fn bool_attr(attrs: &BTreeMap<String, String>, key: &str) -> anyhow::Result<bool> {
    match attrs.get(key).map(String::as_str) {
        None => Ok(false),
        Some("" | "true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(other) => bail!("invalid value {other:?} for cache attr {key}"),
    }
}

fn backend(entry: &CacheOptionsEntry, export: bool) -> anyhow::Result<Backend> {
    let attrs = &entry.attrs;
    match entry.r#type.as_str() {
        "registry" => {
            let text = attrs
                .get("ref")
                .filter(|r| !r.is_empty())
                .context("registry cache needs ref=<image reference>")?;
            let reference = Reference::parse_normalized(text)
                .with_context(|| format!("invalid cache reference {text:?}"))?;
            Ok(Backend::Registry {
                reference,
                insecure: bool_attr(attrs, "registry.insecure")?,
            })
        }
        "local" => {
            let digest = attrs
                .get("digest")
                .filter(|d| !d.is_empty())
                .map(|d| d.parse::<Digest>())
                .transpose()
                .context("invalid digest attr of local cache")?;
            Ok(Backend::Local {
                tag: attrs
                    .get("tag")
                    .filter(|t| !t.is_empty())
                    .cloned()
                    .unwrap_or_else(|| "latest".to_string()),
                digest,
                session_dir: attrs.get(SESSION_DIR_ATTR).cloned(),
            })
        }
        "inline" if export => Ok(Backend::Inline),
        "inline" => bail!(
            "cache import type=inline does not exist: import an inline cache with \
             type=registry,ref=<image>"
        ),
        "gha" | "s3" | "azblob" => {
            let what = if export { "export" } else { "import" };
            bail!("cache {what} type={} is not supported yet", entry.r#type)
        }
        other => bail!("unknown cache type {other:?}"),
    }
}

/// Parses the `Cache.Exports` of a solve request, adding an `inline` export
/// when the frontend attrs carry `build-arg:BUILDKIT_INLINE_CACHE` set to
/// true (as BuildKit's controller does).
pub fn parse_exports(
    entries: &[CacheOptionsEntry],
    frontend_attrs: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<CacheExport>> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for entry in entries {
        if seen.contains(&entry.r#type) {
            bail!("duplicate cache exports");
        }
        seen.push(entry.r#type.clone());
        let mode = match entry.attrs.get("mode").map(String::as_str) {
            None | Some("" | "min") => Mode::Min,
            Some("max") => Mode::Max,
            Some(other) => bail!("invalid cache mode {other:?} (min or max)"),
        };
        out.push(CacheExport {
            backend: backend(entry, true)?,
            mode,
        });
    }
    let build_arg = frontend_attrs
        .get(INLINE_CACHE_BUILD_ARG)
        .map(|v| v.trim().to_ascii_lowercase());
    let wants_inline = matches!(build_arg.as_deref(), Some("1" | "t" | "true"));
    if wants_inline && !out.iter().any(|e| e.backend == Backend::Inline) {
        out.push(CacheExport {
            backend: Backend::Inline,
            mode: Mode::Min,
        });
    }
    Ok(out)
}

fn rfc3339(secs: u64) -> Option<String> {
    let secs = i64::try_from(secs).ok()?;
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn parse_time(text: Option<&str>) -> u64 {
    text.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .and_then(|t| u64::try_from(t.timestamp()).ok())
        .unwrap_or(0)
}

/// Builds the cache config for `vertices`: records for all, results (layer
/// chains from `chains`, by vertex index) where given.
fn build_config(vertices: &[CacheVertex], chains: &[Option<Vec<Layer>>]) -> CacheConfig {
    let mut config = CacheConfig::default();
    let mut layer_index: HashMap<(Digest, i64), usize> = HashMap::new();
    let mut record_index: HashMap<&CacheKey, usize> = HashMap::new();
    for (vertex, chain) in vertices.iter().zip(chains) {
        let created = rfc3339(vertex.created);
        let mut results = Vec::new();
        if let Some(chain) = chain.as_ref().filter(|c| !c.is_empty()) {
            let mut parent: i64 = -1;
            for layer in chain {
                let id = (layer.descriptor.digest.clone(), parent);
                let index = *layer_index.entry(id).or_insert_with(|| {
                    config.layers.push(CacheLayer {
                        blob: layer.descriptor.digest.clone(),
                        parent,
                        annotations: Some(LayerAnnotations {
                            media_type: layer.descriptor.media_type.clone(),
                            diff_id: layer.diff_id.clone(),
                            size: layer.descriptor.size,
                            created_at: created.clone(),
                        }),
                    });
                    config.layers.len() - 1
                });
                parent = index as i64;
            }
            results.push(CacheResult {
                layer: parent as usize,
                created_at: created.clone(),
            });
        }
        let inputs = vertex
            .inputs
            .iter()
            .map(|(key, _)| {
                record_index
                    .get(key)
                    .map(|&link| {
                        vec![CacheInput {
                            selector: String::new(),
                            link,
                        }]
                    })
                    .unwrap_or_default()
            })
            .collect();
        if record_index.contains_key(&vertex.key) {
            continue;
        }
        record_index.insert(&vertex.key, config.records.len());
        config.records.push(CacheRecord {
            results,
            digest: format!("sha256:{}", vertex.key),
            inputs,
        });
    }
    config
}

/// The result vertices whose output a cache can carry: one output, not
/// scratch.
fn single_output(vertex: &CacheVertex) -> Option<&kiln_worker::SnapshotId> {
    match vertex.outputs.as_slice() {
        [Some(snapshot)] => Some(snapshot),
        _ => None,
    }
}

/// Writes the cache of `result` into the worker's content store and returns
/// the manifest descriptor (config and layers are in the store too).
async fn commit(
    worker: &dyn Worker,
    result: &SolveResult,
    mode: Mode,
) -> anyhow::Result<Descriptor> {
    let mut chains = Vec::with_capacity(result.vertices.len());
    for vertex in &result.vertices {
        let wanted = mode == Mode::Max || vertex.is_result;
        let chain = match single_output(vertex).filter(|_| wanted) {
            Some(snapshot) => Some(
                worker
                    .layers(snapshot)
                    .await
                    .with_context(|| format!("failed to export the layers of {snapshot}"))?,
            ),
            None => None,
        };
        chains.push(chain);
    }
    let config = build_config(&result.vertices, &chains);
    let config_bytes = serde_json::to_vec(&config).context("failed to encode cache config")?;
    let store = worker.content();
    let config_digest = store
        .write_blob(&config_bytes)
        .context("failed to store cache config")?;
    let mut layers: Vec<Descriptor> = Vec::new();
    for layer in chains.iter().flatten().flatten() {
        if !layers.iter().any(|l| l.digest == layer.descriptor.digest) {
            let mut descriptor = layer.descriptor.clone();
            descriptor.annotations = None;
            descriptor.platform = None;
            layers.push(descriptor);
        }
    }
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.to_string()),
        config: Descriptor::new(
            CACHE_CONFIG_MEDIA_TYPE,
            config_digest,
            config_bytes.len() as u64,
        ),
        layers,
        annotations: None,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).context("failed to encode manifest")?;
    let manifest_digest = store
        .write_blob(&manifest_bytes)
        .context("failed to store cache manifest")?;
    Ok(Descriptor::new(
        media_types::OCI_MANIFEST,
        manifest_digest,
        manifest_bytes.len() as u64,
    ))
}

/// The steps of `result` an image made of `image_layers` can carry inline:
/// walking down from the result vertex through each vertex's first input
/// (the rootfs of a `RUN`, the destination of a `COPY`), every one-output
/// vertex whose layer chain is a prefix of the image's (by diff id, so
/// layers the exporter recompressed still match), paired with its chain's
/// length. Inputs first. Ancestors of the result are already compressed as
/// part of its chain, so asking for their layers costs nothing.
async fn inline_steps<'a>(
    worker: &dyn Worker,
    result: &'a SolveResult,
    image_layers: &[Layer],
) -> anyhow::Result<Vec<(&'a CacheVertex, usize)>> {
    let by_key: HashMap<&CacheKey, &CacheVertex> =
        result.vertices.iter().map(|v| (&v.key, v)).collect();
    let mut steps = Vec::new();
    let mut next = result.vertices.iter().find(|v| v.is_result);
    let mut seen = std::collections::HashSet::new();
    while let Some(vertex) = next {
        if !seen.insert(&vertex.key) {
            break;
        }
        let Some(snapshot) = single_output(vertex) else {
            break;
        };
        let chain = worker
            .layers(snapshot)
            .await
            .with_context(|| format!("failed to export the layers of {snapshot}"))?;
        let is_prefix = !chain.is_empty()
            && chain.len() <= image_layers.len()
            && chain
                .iter()
                .zip(image_layers)
                .all(|(a, b)| a.diff_id == b.diff_id);
        if is_prefix {
            steps.push((vertex, chain.len()));
        }
        next = vertex
            .inputs
            .first()
            .and_then(|(key, _)| by_key.get(key).copied());
    }
    steps.reverse();
    Ok(steps)
}

/// The inline cache value (base64 of the JSON record list) for `steps`
/// (vertex, length of its chain in `image_layers`): each record's result
/// names the index of its top layer in the image. `None` when no step
/// matched.
fn inline_value(steps: &[(&CacheVertex, usize)], image_layers: &[Layer]) -> Option<String> {
    if steps.is_empty() {
        return None;
    }
    let vertices: Vec<CacheVertex> = steps.iter().map(|(v, _)| (*v).clone()).collect();
    let chains: Vec<Option<Vec<Layer>>> = steps
        .iter()
        .map(|(_, n)| Some(image_layers[..*n].to_vec()))
        .collect();
    let mut config = build_config(&vertices, &chains);
    // Every chain is a prefix of one list, so a layer's depth is its index
    // in the image.
    let mut depth: Vec<usize> = Vec::with_capacity(config.layers.len());
    for layer in &config.layers {
        let d = usize::try_from(layer.parent)
            .ok()
            .and_then(|p| depth.get(p))
            .map_or(0, |d| d + 1);
        depth.push(d);
    }
    for record in &mut config.records {
        for result in &mut record.results {
            result.layer = depth[result.layer];
        }
    }
    let json = serde_json::to_vec(&config.records).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(json))
}

/// The inline cache of `result` for an image whose layers are
/// `image_layers` (after any conversion), as the value of the config key
/// `moby.buildkit.cache.v0`; `None` when no step's result is part of the image.
pub async fn inline_cache(
    worker: &dyn Worker,
    result: &SolveResult,
    image_layers: &[Layer],
) -> anyhow::Result<Option<String>> {
    let steps = inline_steps(worker, result, image_layers).await?;
    Ok(inline_value(&steps, image_layers))
}

/// The parts of an image config an inline cache import reads.
#[derive(Debug, Deserialize)]
struct InlineImageConfig {
    #[serde(default)]
    rootfs: kiln_image::oci::RootFs,
    #[serde(default)]
    history: Vec<kiln_image::oci::History>,
    #[serde(rename = "moby.buildkit.cache.v0", default)]
    cache: Option<String>,
}

/// The cache config an image carries inline: the records from its config,
/// its layers (each on the one below) described by the manifest, diff ids
/// from the config's rootfs and times from its history. `None` when the
/// image carries no inline cache.
fn inline_config(
    manifest: &ImageManifest,
    config_bytes: &[u8],
) -> anyhow::Result<Option<CacheConfig>> {
    let image: InlineImageConfig =
        serde_json::from_slice(config_bytes).context("invalid image config")?;
    let Some(encoded) = image.cache.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    if image.rootfs.diff_ids.len() != manifest.layers.len() {
        bail!(
            "the image config lists {} diff ids for {} layers",
            image.rootfs.diff_ids.len(),
            manifest.layers.len()
        );
    }
    let json = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .context("inline cache is not base64")?;
    let records: Vec<CacheRecord> =
        serde_json::from_slice(&json).context("invalid inline cache records")?;
    let created: Vec<Option<String>> = image
        .history
        .iter()
        .filter(|h| !h.empty_layer)
        .map(|h| h.created.clone())
        .collect();
    let layers = manifest
        .layers
        .iter()
        .zip(&image.rootfs.diff_ids)
        .enumerate()
        .map(|(i, (descriptor, diff_id))| CacheLayer {
            blob: descriptor.digest.clone(),
            parent: i as i64 - 1,
            annotations: Some(LayerAnnotations {
                media_type: descriptor.media_type.clone(),
                diff_id: diff_id.clone(),
                size: descriptor.size,
                created_at: created.get(i).cloned().flatten(),
            }),
        })
        .collect();
    Ok(Some(CacheConfig { layers, records }))
}

/// Everything a cache export needs besides the solve result.
pub struct ExportTarget<'a> {
    /// The worker holding the result.
    pub worker: &'a dyn Worker,
    /// The client's session (for `local`).
    pub session: Option<&'a Session>,
    /// Where temporary files go.
    pub tmp_dir: &'a Path,
    /// The daemon's registry settings.
    pub hosts: RegistryHosts,
}

/// Exports the cache of `result` as `export` asks (the `n`th cache export of
/// the request).
pub async fn export(
    target: &ExportTarget<'_>,
    result: &SolveResult,
    export: &CacheExport,
    n: usize,
    vertex: &VertexProgress,
) -> anyhow::Result<()> {
    if export.backend == Backend::Inline {
        // Written into the image config by the image exporters.
        return Ok(());
    }
    let manifest = commit(target.worker, result, export.mode).await?;
    match &export.backend {
        Backend::Inline => {}
        Backend::Registry {
            reference,
            insecure,
        } => {
            let mut hosts = target.hosts.clone();
            if *insecure {
                hosts.allow_insecure(reference.domain());
            }
            let resolver = Resolver::new(hosts).context("failed to create registry client")?;
            let status = format!("writing cache manifest {}", manifest.digest);
            vertex.status(&status, &status, 0, None, false);
            resolver
                .push_image(reference, &manifest, target.worker.content())
                .await
                .with_context(|| format!("failed to push cache to {reference}"))?;
            vertex.status(&status, &status, 0, None, true);
        }
        Backend::Local { tag, .. } => {
            let session = target
                .session
                .context("a local cache export needs a session to send the cache to")?;
            let file =
                layout_to_temp(target.worker.content(), &manifest, tag, target.tmp_dir).await?;
            let status = "sending cache to client".to_string();
            vertex.status(&status, &status, 0, None, false);
            let sent = kiln_session::filesend::send_to(
                session.channel(),
                &format!("cache-{n}"),
                &BTreeMap::new(),
                tokio::fs::File::from_std(file),
            )
            .await
            .context("failed to send the cache to the client")?;
            vertex.status(&status, &status, sent, Some(sent), true);
        }
    }
    Ok(())
}

/// Writes a tar of an OCI layout holding `manifest` (tagged `tag`) and every
/// blob it references to a temporary file (rewound, already unlinked).
async fn layout_to_temp(
    store: &ContentStore,
    manifest: &Descriptor,
    tag: &str,
    tmp_dir: &Path,
) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(tmp_dir)
        .with_context(|| format!("failed to create {}", tmp_dir.display()))?;
    let store = store.clone();
    let manifest = manifest.clone();
    let tag = tag.to_string();
    let tmp_dir = tmp_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
        let bytes = store
            .read(&manifest.digest)
            .context("failed to read cache manifest")?;
        let image: ImageManifest =
            serde_json::from_slice(&bytes).context("failed to parse cache manifest")?;
        let mut file = tempfile::tempfile_in(&tmp_dir).context("failed to create cache tar")?;
        {
            let mut tar = tar::Builder::new(std::io::BufWriter::new(&mut file));
            let mut append = |name: &str, data: &[u8]| -> anyhow::Result<()> {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, name, data)
                    .with_context(|| format!("failed to write {name} to the cache tar"))
            };
            append("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            let mut entry = manifest.clone();
            entry.annotations = Some(BTreeMap::from([(REF_NAME.to_string(), tag.clone())]));
            let index = ImageIndex {
                schema_version: 2,
                media_type: Some(media_types::OCI_INDEX.to_string()),
                manifests: vec![entry],
                annotations: None,
            };
            append(
                "index.json",
                &serde_json::to_vec(&index).context("failed to encode index.json")?,
            )?;
            for digest in std::iter::once(&manifest.digest)
                .chain(std::iter::once(&image.config.digest))
                .chain(image.layers.iter().map(|l| &l.digest))
            {
                let path = store.path(digest);
                let mut blob = std::fs::File::open(&path)
                    .with_context(|| format!("failed to open blob {}", path.display()))?;
                let size = blob.metadata().map(|m| m.len()).unwrap_or(0);
                let mut header = tar::Header::new_gnu();
                header.set_size(size);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(
                    &mut header,
                    format!("blobs/sha256/{}", digest.hex()),
                    &mut blob,
                )
                .with_context(|| format!("failed to write blob {digest} to the cache tar"))?;
            }
            tar.into_inner()
                .context("failed to finish the cache tar")?
                .into_inner()
                .map_err(|e| e.into_error())
                .context("failed to finish the cache tar")?;
        }
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
            .context("failed to rewind the cache tar")?;
        Ok(file)
    })
    .await
    .context("cache tar writer panicked")?
}

/// Turns a cache config into results by key, blobs described by `blobs`
/// (the manifest's layers) or the config's annotations.
fn index_config(
    config: &CacheConfig,
    blobs: &HashMap<Digest, Descriptor>,
    reference: &Reference,
) -> HashMap<CacheKey, ImportedResult> {
    let mut out = HashMap::new();
    for record in &config.records {
        let Some(key) = record
            .digest
            .strip_prefix("sha256:")
            .and_then(CacheKey::from_hex)
        else {
            continue;
        };
        let Some(result) = record.results.first() else {
            continue;
        };
        let mut chain = Vec::new();
        let mut next = Some(result.layer);
        let mut valid = true;
        while let Some(index) = next {
            let Some(layer) = config.layers.get(index) else {
                valid = false;
                break;
            };
            let Some(annotations) = &layer.annotations else {
                valid = false;
                break;
            };
            let descriptor = blobs.get(&layer.blob).cloned().unwrap_or_else(|| {
                Descriptor::new(
                    annotations.media_type.clone(),
                    layer.blob.clone(),
                    annotations.size,
                )
            });
            chain.push(Layer {
                descriptor,
                diff_id: annotations.diff_id.clone(),
            });
            // A parent at or above its child would loop.
            next = usize::try_from(layer.parent).ok().filter(|&p| p < index);
            if layer.parent >= 0 && next.is_none() {
                valid = false;
                break;
            }
        }
        if !valid || chain.is_empty() {
            continue;
        }
        chain.reverse();
        out.insert(
            key,
            ImportedResult {
                layers: chain,
                created: parse_time(result.created_at.as_deref()),
                reference: reference.clone(),
            },
        );
    }
    out
}

/// A cache read from a registry; layer blobs are fetched by the worker's
/// pull from the cache reference when a result is applied.
#[derive(Debug)]
struct RegistryImport {
    results: HashMap<CacheKey, ImportedResult>,
}

#[async_trait::async_trait]
impl CacheImport for RegistryImport {
    fn lookup(&self, key: &CacheKey) -> Option<ImportedResult> {
        self.results.get(key).cloned()
    }

    async fn prepare(&self, _layers: &[Layer], _content: &ContentStore) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A cache read from a directory the client sent; blobs are copied into the
/// worker's store when a result is applied.
#[derive(Debug)]
struct LocalImport {
    results: HashMap<CacheKey, ImportedResult>,
    dir: Arc<tempfile::TempDir>,
}

#[async_trait::async_trait]
impl CacheImport for LocalImport {
    fn lookup(&self, key: &CacheKey) -> Option<ImportedResult> {
        self.results.get(key).cloned()
    }

    async fn prepare(&self, layers: &[Layer], content: &ContentStore) -> Result<(), BoxError> {
        let dir = self.dir.path().to_path_buf();
        let layers = layers.to_vec();
        let content = content.clone();
        tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
            for layer in &layers {
                let digest = &layer.descriptor.digest;
                if content.has(digest) {
                    continue;
                }
                let path = blob_path(&dir, digest);
                let mut blob = std::fs::File::open(&path)
                    .map_err(|e| format!("cache blob {}: {e}", path.display()))?;
                let mut writer = content.writer()?;
                std::io::copy(&mut blob, &mut writer)
                    .map_err(|e| format!("copying cache blob {digest}: {e}"))?;
                writer.commit(Some(digest))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("cache blob copy panicked: {e}"))?
    }
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Everything a cache import needs besides its entries.
pub struct ImportSource<'a> {
    /// The worker (its content store receives the config).
    pub worker: &'a dyn Worker,
    /// The client's session (for `local`).
    pub session: Option<&'a Session>,
    /// Where received directories go.
    pub tmp_dir: &'a Path,
    /// The daemon's registry settings.
    pub hosts: RegistryHosts,
}

/// Loads the caches `entries` name. A cache that does not exist yet (first
/// build) is skipped with a warning, as BuildKit does; a malformed entry is
/// an error.
pub async fn import(
    source: &ImportSource<'_>,
    entries: &[CacheOptionsEntry],
    vertex: &VertexProgress,
) -> anyhow::Result<Vec<Arc<dyn CacheImport>>> {
    let mut out: Vec<Arc<dyn CacheImport>> = Vec::new();
    for entry in entries {
        let backend = backend(entry, false)?;
        let loaded = match &backend {
            Backend::Registry {
                reference,
                insecure,
            } => import_registry(source, reference, *insecure, vertex).await,
            Backend::Inline => continue,
            Backend::Local {
                tag,
                digest,
                session_dir,
            } => import_local(source, tag, digest.as_ref(), session_dir.as_deref(), vertex).await,
        };
        match loaded {
            Ok(import) => out.push(import),
            Err(error) => {
                let text = format!("WARNING: failed to import cache: {error:#}\n");
                tracing::warn!(error = %format!("{error:#}"), "failed to import cache");
                vertex.log(2, text.as_bytes());
            }
        }
    }
    Ok(out)
}

async fn import_registry(
    source: &ImportSource<'_>,
    reference: &Reference,
    insecure: bool,
    vertex: &VertexProgress,
) -> anyhow::Result<Arc<dyn CacheImport>> {
    let mut hosts = source.hosts.clone();
    if insecure {
        hosts.allow_insecure(reference.domain());
    }
    let resolver = Resolver::new(hosts).context("failed to create registry client")?;
    let status = format!("importing cache manifest from {reference}");
    vertex.status(&status, &status, 0, None, false);
    let (bytes, media_type) = resolver
        .fetch_manifest_bytes(reference)
        .await
        .with_context(|| format!("failed to fetch cache manifest {reference}"))?;
    let store = source.worker.content();
    let (config, blobs) = match config_descriptor(&bytes, &media_type) {
        Ok(found) => found,
        Err(not_cache) => {
            // An image: its inline cache, if it carries one.
            let results = inline_results(&resolver, reference, &bytes, &media_type, store)
                .await
                .with_context(|| format!("failed to read the inline cache of {reference}"))?;
            vertex.status(&status, &status, 0, None, true);
            return match results {
                Some(results) => Ok(Arc::new(RegistryImport { results })),
                None => Err(not_cache.context(format!(
                    "{reference} is neither a cache manifest nor an image with an inline cache"
                ))),
            };
        }
    };
    resolver
        .fetch_blob(reference, &config, store)
        .await
        .with_context(|| format!("failed to fetch cache config {}", config.digest))?;
    let config_bytes = store
        .read(&config.digest)
        .with_context(|| format!("failed to read cache config {}", config.digest))?;
    let config: CacheConfig = serde_json::from_slice(&config_bytes)
        .with_context(|| format!("invalid cache config {}", config.digest))?;
    vertex.status(&status, &status, 0, None, true);
    Ok(Arc::new(RegistryImport {
        results: index_config(&config, &blobs, reference),
    }))
}

/// The results of the inline caches of the image `bytes` (a manifest, or an
/// index whose every image manifest is read) of `reference`; `None` when no
/// manifest carries one or `bytes` is no image.
async fn inline_results(
    resolver: &Resolver,
    reference: &Reference,
    bytes: &[u8],
    media_type: &str,
    store: &ContentStore,
) -> anyhow::Result<Option<HashMap<CacheKey, ImportedResult>>> {
    let manifests: Vec<Vec<u8>> = if media_types::is_index(media_type) {
        let index: ImageIndex = serde_json::from_slice(bytes).context("invalid index")?;
        let mut out = Vec::new();
        for child in index
            .manifests
            .iter()
            .filter(|m| media_types::is_manifest(&m.media_type))
        {
            let by_digest = reference.with_digest(child.digest.clone());
            let (child_bytes, _) = resolver
                .fetch_manifest_bytes(&by_digest)
                .await
                .with_context(|| format!("failed to fetch manifest {}", child.digest))?;
            out.push(child_bytes);
        }
        out
    } else if media_types::is_manifest(media_type) {
        vec![bytes.to_vec()]
    } else {
        return Ok(None);
    };
    let mut found: Option<HashMap<CacheKey, ImportedResult>> = None;
    for manifest_bytes in manifests {
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).context("invalid manifest")?;
        if manifest.layers.is_empty() {
            continue;
        }
        resolver
            .fetch_blob(reference, &manifest.config, store)
            .await
            .with_context(|| format!("failed to fetch image config {}", manifest.config.digest))?;
        let config_bytes = store
            .read(&manifest.config.digest)
            .with_context(|| format!("failed to read image config {}", manifest.config.digest))?;
        let Some(config) = inline_config(&manifest, &config_bytes)
            .with_context(|| format!("invalid image config {}", manifest.config.digest))?
        else {
            continue;
        };
        let blobs = manifest
            .layers
            .iter()
            .map(|d| (d.digest.clone(), d.clone()))
            .collect();
        found
            .get_or_insert_with(HashMap::new)
            .extend(index_config(&config, &blobs, reference));
    }
    Ok(found)
}

/// The cache config descriptor and the layer descriptors of a cache
/// manifest (image-manifest layout) or index (BuildKit's default layout).
fn config_descriptor(
    bytes: &[u8],
    media_type: &str,
) -> anyhow::Result<(Descriptor, HashMap<Digest, Descriptor>)> {
    let is_index = media_types::is_index(media_type)
        || serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some());
    let (config, others) = if is_index {
        let index: ImageIndex = serde_json::from_slice(bytes).context("invalid index")?;
        let (config, others): (Vec<Descriptor>, Vec<Descriptor>) = index
            .manifests
            .into_iter()
            .partition(|d| d.media_type == CACHE_CONFIG_MEDIA_TYPE);
        (config.into_iter().next(), others)
    } else {
        let manifest: ImageManifest = serde_json::from_slice(bytes).context("invalid manifest")?;
        let config =
            (manifest.config.media_type == CACHE_CONFIG_MEDIA_TYPE).then_some(manifest.config);
        (config, manifest.layers)
    };
    let config = config.context("no cache config in the manifest: not a cache")?;
    let blobs = others.into_iter().map(|d| (d.digest.clone(), d)).collect();
    Ok((config, blobs))
}

async fn import_local(
    source: &ImportSource<'_>,
    tag: &str,
    digest: Option<&Digest>,
    session_dir: Option<&str>,
    vertex: &VertexProgress,
) -> anyhow::Result<Arc<dyn CacheImport>> {
    let session = source
        .session
        .context("a local cache import needs a session to read the directory from")?;
    let name = session_dir.context("local cache import without a session directory name")?;
    std::fs::create_dir_all(source.tmp_dir)
        .with_context(|| format!("failed to create {}", source.tmp_dir.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("cache-import-")
        .tempdir_in(source.tmp_dir)
        .context("failed to create a directory for the imported cache")?;
    let status = "importing cache from client directory".to_string();
    vertex.status(&status, &status, 0, None, false);
    let stats = filesync::receive(
        session.channel(),
        ReceiveRequest {
            dir_name: name.to_string(),
            dest: dir.path().to_path_buf(),
            include_patterns: Vec::new(),
            exclude_patterns: Vec::new(),
            followpaths: Vec::new(),
            differ: Differ::None,
        },
    )
    .await
    .context("failed to receive the cache directory")?;
    vertex.status(
        &status,
        &status,
        stats.bytes_received,
        Some(stats.bytes_received),
        true,
    );
    let root = dir.path().to_path_buf();
    let index_path = root.join("index.json");
    let index_bytes = std::fs::read(&index_path)
        .with_context(|| format!("no cache in the directory ({})", "index.json"))?;
    let index: ImageIndex =
        serde_json::from_slice(&index_bytes).context("invalid index.json in the cache")?;
    let chosen = index
        .manifests
        .iter()
        .find(|m| match digest {
            Some(d) => m.digest == *d,
            None => m
                .annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .is_some_and(|t| t == tag),
        })
        .with_context(|| match digest {
            Some(d) => format!("no manifest {d} in the cache's index.json"),
            None => format!("no tag {tag:?} in the cache's index.json"),
        })?;
    let manifest_bytes = std::fs::read(blob_path(&root, &chosen.digest))
        .with_context(|| format!("missing cache manifest blob {}", chosen.digest))?;
    let (config, blobs) =
        config_descriptor(&manifest_bytes, &chosen.media_type).context("invalid cache manifest")?;
    let config_bytes = std::fs::read(blob_path(&root, &config.digest))
        .with_context(|| format!("missing cache config blob {}", config.digest))?;
    let config: CacheConfig =
        serde_json::from_slice(&config_bytes).context("invalid cache config")?;
    // Blobs come from the directory, never from this placeholder.
    let reference = Reference::parse_normalized("kiln.invalid/local-cache:latest")
        .context("invalid placeholder reference")?;
    Ok(Arc::new(LocalImport {
        results: index_config(&config, &blobs, &reference),
        dir: Arc::new(dir),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, attrs: &[(&str, &str)]) -> CacheOptionsEntry {
        CacheOptionsEntry {
            r#type: kind.to_string(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn exports_parse_modes_and_refuse_duplicates() {
        let exports = parse_exports(
            &[
                entry(
                    "registry",
                    &[("ref", "127.0.0.1:5000/c:t"), ("mode", "max")],
                ),
                entry("local", &[("dest", "/x")]),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(exports[0].mode, Mode::Max);
        assert_eq!(exports[1].mode, Mode::Min);
        assert!(matches!(&exports[1].backend, Backend::Local { tag, .. } if tag == "latest"));
        let dup = parse_exports(
            &[
                entry("local", &[("dest", "/a")]),
                entry("local", &[("dest", "/b")]),
            ],
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(dup.to_string(), "duplicate cache exports");
        let none = BTreeMap::new();
        let inline = parse_exports(&[entry("inline", &[])], &none).unwrap();
        assert_eq!(inline[0].backend, Backend::Inline);
        let gha = parse_exports(&[entry("gha", &[])], &none).unwrap_err();
        assert!(gha.to_string().contains("not supported yet"), "{gha}");
        assert!(parse_exports(&[entry("registry", &[])], &none).is_err());
        assert!(parse_exports(&[entry("local", &[("mode", "all")])], &none).is_err());
        // The build arg buildx users set adds one inline export, once.
        let arg = BTreeMap::from([(
            "build-arg:BUILDKIT_INLINE_CACHE".to_string(),
            "true".to_string(),
        )]);
        assert_eq!(
            parse_exports(&[], &arg).unwrap()[0].backend,
            Backend::Inline
        );
        assert_eq!(
            parse_exports(&[entry("inline", &[])], &arg).unwrap().len(),
            1
        );
        let off = BTreeMap::from([(
            "build-arg:BUILDKIT_INLINE_CACHE".to_string(),
            "0".to_string(),
        )]);
        assert!(parse_exports(&[], &off).unwrap().is_empty());
    }

    fn layer(n: u8) -> Layer {
        Layer {
            descriptor: Descriptor::new(
                media_types::OCI_LAYER_GZIP,
                Digest::of(&[n]),
                10 + n as u64,
            ),
            diff_id: Digest::of(&[n, n]),
        }
    }

    #[test]
    fn config_round_trips_chains_by_key() {
        let key = |s: &str| CacheKey::from_parts([("k", s.as_bytes())]);
        let vertices = vec![
            CacheVertex {
                key: key("base"),
                inputs: vec![],
                outputs: vec![Some("s1".into())],
                created: 1_700_000_000,
                is_result: false,
            },
            CacheVertex {
                key: key("run"),
                inputs: vec![(key("base"), 0)],
                outputs: vec![Some("s2".into())],
                created: 1_700_000_100,
                is_result: true,
            },
        ];
        let chains = vec![Some(vec![layer(1)]), Some(vec![layer(1), layer(2)])];
        let config = build_config(&vertices, &chains);
        assert_eq!(
            config.layers.len(),
            2,
            "the shared base layer is written once"
        );
        assert_eq!(config.layers[0].parent, -1);
        assert_eq!(config.layers[1].parent, 0);
        assert_eq!(
            config.records[1].inputs,
            vec![vec![CacheInput {
                selector: String::new(),
                link: 0
            }]]
        );
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"diffID\""), "{json}");
        let parsed: CacheConfig = serde_json::from_str(&json).unwrap();
        let reference = Reference::parse_normalized("127.0.0.1:5000/c:t").unwrap();
        let results = index_config(&parsed, &HashMap::new(), &reference);
        let run = &results[&key("run")];
        assert_eq!(run.layers, vec![layer(1), layer(2)]);
        assert_eq!(run.created, 1_700_000_100);
        assert_eq!(results[&key("base")].layers, vec![layer(1)]);
    }

    #[test]
    fn min_mode_keeps_records_without_results() {
        let key = CacheKey::from_parts([("k", b"x".as_slice())]);
        let vertices = vec![CacheVertex {
            key: key.clone(),
            inputs: vec![],
            outputs: vec![Some("s".into())],
            created: 0,
            is_result: false,
        }];
        let config = build_config(&vertices, &[None]);
        assert_eq!(config.records.len(), 1);
        assert!(config.records[0].results.is_empty());
        let reference = Reference::parse_normalized("127.0.0.1:5000/c:t").unwrap();
        assert!(index_config(&config, &HashMap::new(), &reference).is_empty());
    }

    #[test]
    fn inline_cache_round_trips_through_an_image_config() {
        let key = |s: &str| CacheKey::from_parts([("k", s.as_bytes())]);
        let vertex = |name: &str, input: Option<&str>, created: u64| CacheVertex {
            key: key(name),
            inputs: input.map(|i| vec![(key(i), 0)]).unwrap_or_default(),
            outputs: vec![Some(name.into())],
            created,
            is_result: false,
        };
        let base = vertex("base", None, 1_700_000_000);
        let run = vertex("run", Some("base"), 1_700_000_100);
        // The image's layers: two base layers, then the RUN layer.
        let image = vec![layer(1), layer(2), layer(3)];
        let value = inline_value(&[(&base, 2), (&run, 3)], &image).unwrap();
        let records: Vec<CacheRecord> = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(&value)
                .unwrap(),
        )
        .unwrap();
        // Result layers are indexes into the image's layers, as BuildKit writes them.
        assert_eq!(records[0].results[0].layer, 1);
        assert_eq!(records[1].results[0].layer, 2);
        assert_eq!(records[1].inputs[0][0].link, 0);

        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.to_string()),
            config: Descriptor::new(media_types::OCI_CONFIG, Digest::of(b"c"), 1),
            layers: image.iter().map(|l| l.descriptor.clone()).collect(),
            annotations: None,
        };
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": image.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()},
            "moby.buildkit.cache.v0": value,
        });
        let parsed = inline_config(&manifest, config.to_string().as_bytes())
            .unwrap()
            .unwrap();
        let reference = Reference::parse_normalized("127.0.0.1:5000/app:1").unwrap();
        let blobs = manifest
            .layers
            .iter()
            .map(|d| (d.digest.clone(), d.clone()))
            .collect();
        let results = index_config(&parsed, &blobs, &reference);
        assert_eq!(results[&key("base")].layers, image[..2].to_vec());
        assert_eq!(results[&key("run")].layers, image);
        assert_eq!(results[&key("run")].reference, reference);

        // An image without the key carries no cache; a lying rootfs is an error.
        let plain = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": []}});
        let mut empty = manifest.clone();
        empty.layers.clear();
        assert!(inline_config(&empty, plain.to_string().as_bytes())
            .unwrap()
            .is_none());
        let lying = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": []}, "moby.buildkit.cache.v0": "W10="});
        assert!(inline_config(&manifest, lying.to_string().as_bytes()).is_err());
        assert!(inline_value(&[], &image).is_none());
    }

    #[test]
    fn go_omitted_parent_means_zero() {
        let json = r#"{"layers":[{"blob":"sha256:0000000000000000000000000000000000000000000000000000000000000000","parent":-1,"annotations":{"mediaType":"m","diffID":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1}},{"blob":"sha256:2222222222222222222222222222222222222222222222222222222222222222","annotations":{"mediaType":"m","diffID":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":2}}]}"#;
        let config: CacheConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config.layers[1].parent, 0);
    }
}
