//! The builtin `dockerfile.v0` frontend: reads the Dockerfile and
//! `.dockerignore` over the session, resolves base images on the worker,
//! compiles to LLB (reference §5.10).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use kiln_dockerfile::{CompileOptions, ImageMetaResolver, NamedContext};

use crate::policy::SourcePolicy;
use kiln_image::oci::{ImageConfig, Platform};
use kiln_image::reference::Reference;
use kiln_image::Digest;
use kiln_proto::pb;
use kiln_session::filesync::{self, Differ, ReceiveRequest};
use kiln_session::Session;
use kiln_solver::ProgressWriter;
use kiln_worker::Worker;
use sha2::{Digest as _, Sha256};

/// What the frontend hands to the solver and the exporter: one build per target platform.
pub struct FrontendResult {
    /// The builds, in the order the platforms were asked for.
    pub platforms: Vec<PlatformBuild>,
    /// Whether the result is a multi-platform one (several platforms, or the `multi-platform`
    /// attr / `BUILDKIT_MULTI_PLATFORM` build-arg): BuildKit's `refs` map, exported as an index.
    pub multi_platform: bool,
}

/// The build of one target platform.
pub struct PlatformBuild {
    /// The target platform (canonical: `linux/arm64`, not `linux/arm64/v8`).
    pub platform: Platform,
    /// The LLB of the target stage.
    pub definition: pb::Definition,
    /// The image config of the target stage (rootfs filled by the exporter).
    pub image_config: ImageConfig,
}

/// A frontend failure the user caused (bad Dockerfile, missing file).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UserError {
    /// The message shown to the user.
    pub message: String,
}

/// A Dockerfile the frontend rejected, with the place it points at (sent to the client as
/// BuildKit's `errdefs.Source` detail, which clients render above the error).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DockerfileError {
    /// The offending lines (and word) of the Dockerfile.
    pub excerpt: kiln_llb::errdefs::Excerpt,
    /// What is wrong.
    pub message: String,
}

/// A stable vertex digest for daemon-side steps that are not LLB ops.
pub fn synthetic_digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for p in parts {
        hasher.update(p.as_bytes());
        hasher.update([0]);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Resolves base images on the worker, reporting each as
/// `[internal] load metadata for <ref>`.
struct WorkerResolver {
    worker: Arc<dyn Worker>,
    progress: ProgressWriter,
    build_ref: String,
    mode: ResolveMode,
    /// The build's source policy: applied before a base image is resolved, as BuildKit's
    /// frontend resolves through it.
    policy: Option<Arc<SourcePolicy>>,
    /// Name the platform in progress (a multi-platform build resolves once per platform).
    multi_platform: bool,
}

/// The frontend attr `image-resolve-mode` (`kiln build --pull[=false]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveMode {
    /// The worker's image store first (when it has one), then the
    /// registry. BuildKit asks the registry first; kiln does not, so a
    /// build FROM a local image never depends on a registry answering.
    Default,
    /// Registry (`--pull`).
    Pull,
    /// The worker's image store first, then the registry (`--pull=false`).
    Local,
}

impl ResolveMode {
    /// Parses the attr value.
    pub fn parse(value: Option<&str>) -> anyhow::Result<Self> {
        match value {
            None | Some("") | Some("default") => Ok(Self::Default),
            Some("pull") => Ok(Self::Pull),
            Some("local") => Ok(Self::Local),
            Some(other) => {
                bail!("invalid image-resolve-mode {other:?}: expected default, pull or local")
            }
        }
    }
}

#[async_trait::async_trait]
impl ImageMetaResolver for WorkerResolver {
    async fn resolve_pinned(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<(Reference, Digest, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
        let reference = match &self.policy {
            None => reference.clone(),
            Some(policy) => {
                let identifier = format!("docker-image://{reference}");
                let (converted, _) = policy.evaluate(&identifier, &BTreeMap::new())?;
                match converted.strip_prefix("docker-image://") {
                    Some(name) if converted != identifier => Reference::parse_normalized(name)
                        .map_err(|e| format!("source policy converted {reference} to {converted}: {e}"))?,
                    Some(_) => reference.clone(),
                    None => {
                        return Err(format!(
                            "source policy converted {reference} to {converted}: only docker-image:// targets can replace an image"
                        )
                        .into())
                    }
                }
            }
        };
        let (digest, config) = self.resolve(&reference, platform).await?;
        Ok((reference.with_digest(digest.clone()), digest, config))
    }

    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<(Digest, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
        let name = if self.multi_platform {
            format!("[{} internal] load metadata for {reference}", platform.id())
        } else {
            format!("[internal] load metadata for {reference}")
        };
        let vertex = self.progress.start_vertex(
            &synthetic_digest(&[&self.build_ref, &name]),
            &name,
            Vec::new(),
        );
        // `--pull=false` and the default mode: the worker's own images
        // first, so a build FROM an image built earlier in the worker's
        // namespace never waits on a registry (kiln's documented choice for
        // `default`; BuildKit asks the registry first). `--pull` goes to
        // the registry.
        if matches!(self.mode, ResolveMode::Local | ResolveMode::Default) {
            if let Some(store) = self.worker.image_store() {
                if let Ok(Some(local)) = store.resolve_local(reference, platform).await {
                    vertex.done();
                    return Ok((local.manifest_digest.clone(), local.config_bytes.clone()));
                }
            }
        }
        match self.worker.resolve_image(reference, platform).await {
            Ok(resolved) => {
                vertex.done();
                Ok((
                    resolved.manifest_digest.clone(),
                    resolved.config_bytes.clone(),
                ))
            }
            Err(e) => {
                let base_images = self.worker.labels().remove(&format!(
                    "{}{}",
                    kiln_worker::LABEL_PREFIX,
                    kiln_worker_oci::BASE_IMAGES_LABEL
                ));
                // An authentication failure, or an image found without the wanted
                // platform, is about the registry's answer, not about where images
                // live: no note about image stores then.
                let unauthorized = matches!(&e, kiln_worker::Error::Resolve { source, .. }
                    if matches!(**source, kiln_image::Error::Registry(
                        kiln_image::registry::Error::Unauthorized { .. }
                        | kiln_image::registry::Error::Auth { .. }
                        | kiln_image::registry::Error::NoMatchingPlatform { .. })));
                // The worker's own "failed to resolve <ref>" is dropped: the compiler says it.
                let e = match &e {
                    kiln_worker::Error::Resolve { source, .. } => with_causes(source.as_ref()),
                    other => with_causes(other),
                };
                let message = match (self.worker.image_store(), base_images) {
                    _ if unauthorized => e,
                    // The documented limitation users hit most: an image
                    // built earlier lives in containerd, out of reach.
                    (None, None) => format!(
                        "{e}; note: the OCI worker cannot use images stored in containerd (such as images \
                         built earlier with kiln build): push the image to a registry, run kilnd with the \
                         containerd worker in that namespace, or let the OCI worker read them with \
                         --oci-worker-containerd-images=<namespace> ([worker.oci] containerd-images)",
                    ),
                    (None, Some(source)) => format!(
                        "{e}; note: the OCI worker looked for it in the registry and in {source} \
                         (its only containerd namespace): images of other namespaces are not visible"
                    ),
                    (Some(_), _) => e,
                };
                // The step is named by the reference; its error says it as BuildKit's does.
                vertex.failed(&format!("{reference}: {message}"));
                Err(message.into())
            }
        }
    }
}

/// Parses the `platform` attr (`linux/amd64,linux/arm64`; duplicates dropped) into canonical
/// platforms; none given means the host's.
pub fn target_platforms(attrs: &BTreeMap<String, String>) -> anyhow::Result<Vec<Platform>> {
    let mut platforms: Vec<Platform> = Vec::new();
    for text in attrs
        .get("platform")
        .map(String::as_str)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let platform = Platform::parse(text)
            .map(|p| p.canonical())
            .ok_or_else(|| UserError {
                message: format!("invalid platform {text:?} (expected os/arch[/variant])"),
            })?;
        if !platforms.contains(&platform) {
            platforms.push(platform);
        }
    }
    if platforms.is_empty() {
        platforms.push(Platform::host().canonical());
    }
    Ok(platforms)
}

/// Whether the build asks for a multi-platform result: several platforms, the
/// `multi-platform` attr, or the `BUILDKIT_MULTI_PLATFORM` build-arg (as BuildKit).
fn multi_platform_requested(attrs: &BTreeMap<String, String>, platforms: usize) -> bool {
    let on = |key: &str| {
        attrs
            .get(key)
            .is_some_and(|v| matches!(v.trim(), "1" | "true" | ""))
    };
    platforms > 1 || on("multi-platform") || on("build-arg:BUILDKIT_MULTI_PLATFORM")
}

/// `error: cause: cause…`, each cause once (a cause whose text the message already holds, as
/// the resolver's own messages do, is not repeated).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}

/// The `context:<name>` attrs (`--build-context`): `local:<local>` and `docker-image://<ref>`;
/// the other sources BuildKit knows are refused by name, never ignored.
fn named_contexts(
    attrs: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, NamedContext>, String> {
    let mut contexts = BTreeMap::new();
    for (key, value) in attrs {
        let Some(name) = key.strip_prefix("context:") else {
            continue;
        };
        if name.contains("::") {
            return Err(format!(
                "named context {name:?}: per-platform contexts are not supported yet"
            ));
        }
        let context = if let Some(local) = value.strip_prefix("local:") {
            NamedContext::Local(local.to_string())
        } else if let Some(image) = value.strip_prefix("docker-image://") {
            NamedContext::Image(image.to_string())
        } else if value.starts_with("target:") {
            return Err(format!(
                "named context {name:?}: unsupported context source target"
            ));
        } else {
            let kind = value.split_once(':').map_or(value.as_str(), |(k, _)| k);
            return Err(format!(
                "named context {name:?}: {kind} sources ({value}) are not supported yet (local directories and docker-image:// are)"
            ));
        };
        contexts.insert(name.to_string(), context);
    }
    Ok(contexts)
}

/// Reads one small file set from a local of the session into `dir`.
async fn fetch_files(
    session: &Session,
    local: &str,
    files: Vec<String>,
    dir: &Path,
) -> anyhow::Result<()> {
    filesync::receive(
        session.channel(),
        ReceiveRequest {
            dir_name: local.to_string(),
            dest: dir.to_path_buf(),
            include_patterns: Vec::new(),
            exclude_patterns: Vec::new(),
            followpaths: files,
            differ: Differ::None,
        },
    )
    .await
    .with_context(|| format!("failed to read {local:?} from the client"))?;
    Ok(())
}

/// kiln's decision on `# syntax=<image>` (and `BUILDKIT_SYNTAX`): the
/// Dockerfile frontend images (`docker/dockerfile`, any tag or digest) are
/// what the builtin frontend implements, so they build with it; any other
/// frontend image would need kilnd to run it as a container speaking the
/// gateway API, which it does not do yet — that is an error, never a
/// silent fallback.
pub fn check_syntax(syntax: &str) -> Result<(), String> {
    let name = syntax.split('@').next().unwrap_or(syntax);
    let repository = match name.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => name,
    };
    let repository = repository
        .trim_start_matches("docker.io/")
        .trim_start_matches("index.docker.io/");
    if matches!(
        repository,
        "docker/dockerfile" | "docker/dockerfile-upstream"
    ) {
        Ok(())
    } else {
        Err(format!(
            "syntax {syntax:?}: external frontend images are not supported yet (kilnd builds with its builtin \
             Dockerfile frontend, which `# syntax=docker/dockerfile:1` selects)"
        ))
    }
}

/// The frontend attr `force-network-mode` (`kiln build --network`).
pub fn network_mode(value: Option<&str>) -> anyhow::Result<pb::NetMode> {
    match value {
        None | Some("") | Some("sandbox") | Some("default") => Ok(pb::NetMode::Unset),
        Some("none") => Ok(pb::NetMode::None),
        Some("host") => Ok(pb::NetMode::Host),
        Some(other) => Err(UserError {
            message: format!(
                "invalid force-network-mode {other:?}: expected sandbox, none or host"
            ),
        }
        .into()),
    }
}

/// The frontend attr `add-hosts` (`host=ip,host2=ip2`; `kiln build --add-host`).
pub fn extra_hosts(value: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
    let mut hosts = Vec::new();
    for entry in value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let Some((host, ip)) = entry.split_once('=').or_else(|| entry.split_once(':')) else {
            return Err(UserError {
                message: format!("invalid add-hosts entry {entry:?}: expected host=ip"),
            }
            .into());
        };
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(UserError {
                message: format!("invalid IP address {ip:?} in add-hosts entry {entry:?}"),
            }
            .into());
        }
        hosts.push((host.to_string(), ip.to_string()));
    }
    Ok(hosts)
}

/// The stages named by the frontend attr `no-cache=<stage>,…` (`--no-cache-filter`); empty when
/// the attr is absent or empty (`no-cache=""` is every stage: the solver's `no_cache`, see
/// [`no_cache_all`]).
pub fn no_cache_stages(attrs: &BTreeMap<String, String>) -> Vec<String> {
    attrs
        .get("no-cache")
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the frontend attrs ask to ignore the cache for every step: `no-cache` present with no
/// stage named, as in BuildKit's Dockerfile frontend.
pub fn no_cache_all(attrs: &BTreeMap<String, String>) -> bool {
    attrs.contains_key("no-cache") && no_cache_stages(attrs).is_empty()
}

/// Parses `.dockerignore` text into patterns (comments and blanks dropped).
pub fn dockerignore_patterns(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Runs the Dockerfile frontend up to the LLB.
#[allow(clippy::too_many_arguments)]
pub async fn dockerfile(
    worker: Arc<dyn Worker>,
    session: &Session,
    attrs: &BTreeMap<String, String>,
    progress: &ProgressWriter,
    build_ref: &str,
    tmp_root: &Path,
    policy: Option<Arc<SourcePolicy>>,
) -> anyhow::Result<FrontendResult> {
    let filename = attrs
        .get("filename")
        .filter(|f| !f.is_empty())
        .cloned()
        .unwrap_or_else(|| "Dockerfile".to_string());
    let dockerfile_key = attrs
        .get("dockerfilekey")
        .cloned()
        .unwrap_or_else(|| "dockerfile".to_string());
    let context_key = attrs
        .get("contextkey")
        .cloned()
        .unwrap_or_else(|| "context".to_string());
    if filename.contains("..") || filename.starts_with('/') {
        return Err(UserError {
            message: format!("invalid dockerfile name {filename:?}"),
        }
        .into());
    }
    std::fs::create_dir_all(tmp_root)
        .with_context(|| format!("failed to create {}", tmp_root.display()))?;

    // Dockerfile (and <Dockerfile>.dockerignore).
    let name = format!("[internal] load build definition from {filename}");
    let vertex = progress.start_vertex(&synthetic_digest(&[build_ref, &name]), &name, Vec::new());
    let dir = tempfile::tempdir_in(tmp_root).context("failed to create temporary directory")?;
    let own_ignore = format!("{filename}.dockerignore");
    if let Err(e) = fetch_files(
        session,
        &dockerfile_key,
        vec![filename.clone(), own_ignore.clone()],
        dir.path(),
    )
    .await
    {
        vertex.failed(&format!("{e:#}"));
        return Err(e);
    }
    let source = match std::fs::read(dir.path().join(&filename)) {
        Ok(bytes) => bytes,
        Err(e) => {
            let message = format!("failed to read dockerfile: open {filename}: {e}");
            vertex.failed(&message);
            return Err(UserError { message }.into());
        }
    };
    let status = format!("transferring {dockerfile_key}: {}B", source.len());
    vertex.status(&status, &status, source.len() as u64, None, true);
    vertex.done();
    let own_ignore_text = std::fs::read_to_string(dir.path().join(&own_ignore)).ok();

    // .dockerignore from the context, unless the Dockerfile has its own.
    let excludes = match own_ignore_text {
        Some(text) => dockerignore_patterns(&text),
        None => {
            let name = "[internal] load .dockerignore".to_string();
            let vertex =
                progress.start_vertex(&synthetic_digest(&[build_ref, &name]), &name, Vec::new());
            let ignore_dir =
                tempfile::tempdir_in(tmp_root).context("failed to create temporary directory")?;
            if let Err(e) = fetch_files(
                session,
                &context_key,
                vec![".dockerignore".to_string()],
                ignore_dir.path(),
            )
            .await
            {
                vertex.failed(&format!("{e:#}"));
                return Err(e);
            }
            let text = std::fs::read_to_string(ignore_dir.path().join(".dockerignore"))
                .unwrap_or_default();
            let status = format!("transferring {context_key}: {}B", text.len());
            vertex.status(&status, &status, text.len() as u64, None, true);
            vertex.done();
            dockerignore_patterns(&text)
        }
    };

    let text = String::from_utf8(source.clone()).map_err(|_| UserError {
        message: format!("{filename}: not valid UTF-8"),
    })?;
    let parsed = kiln_dockerfile::parse(&text).map_err(|e| DockerfileError {
        excerpt: e.location().excerpt(&filename, text.as_bytes()),
        message: e.to_string(),
    })?;
    let syntax = attrs
        .get("build-arg:BUILDKIT_SYNTAX")
        .or_else(|| parsed.directives.get("syntax"));
    if let Some(syntax) = syntax {
        check_syntax(syntax).map_err(|message| UserError {
            message: format!("{filename}: {message}"),
        })?;
    }
    let mut build_args = BTreeMap::new();
    let mut labels = BTreeMap::new();
    for (key, value) in attrs {
        if let Some(arg) = key.strip_prefix("build-arg:") {
            build_args.insert(arg.to_string(), value.clone());
        } else if let Some(label) = key.strip_prefix("label:") {
            labels.insert(label.to_string(), value.clone());
        }
    }
    let named_contexts = named_contexts(attrs).map_err(|message| UserError { message })?;
    let platforms = target_platforms(attrs)?;
    let multi_platform = multi_platform_requested(attrs, platforms.len());
    // BUILDPLATFORM is where the steps run: the worker's first platform, as BuildKit.
    let build_platform = worker
        .platforms()
        .first()
        .cloned()
        .unwrap_or_else(Platform::host)
        .canonical();
    let template = CompileOptions {
        filename: filename.clone(),
        source,
        target: attrs.get("target").filter(|t| !t.is_empty()).cloned(),
        build_args,
        labels,
        platform: build_platform.clone(),
        build_platform,
        multi_platform,
        session_id: session.id().to_string(),
        context_name: context_key,
        excludes,
        network: network_mode(attrs.get("force-network-mode").map(String::as_str))?,
        extra_hosts: extra_hosts(attrs.get("add-hosts").map(String::as_str))?,
        named_contexts,
        no_cache_stages: no_cache_stages(attrs),
    };
    let resolver = WorkerResolver {
        worker,
        progress: progress.clone(),
        build_ref: build_ref.to_string(),
        mode: ResolveMode::parse(attrs.get("image-resolve-mode").map(String::as_str))?,
        policy,
        multi_platform,
    };
    // One compile per target platform; each resolves its own base images (the manifest of
    // that platform), and the solver runs what the platforms share (a `--platform=$BUILDPLATFORM`
    // stage) once.
    let mut builds = Vec::with_capacity(platforms.len());
    for platform in platforms {
        let options = CompileOptions {
            platform: platform.clone(),
            ..template.clone()
        };
        let compiled = kiln_dockerfile::compile(&parsed, &options, &resolver)
            .await
            .map_err(|e| {
                let mut message = with_causes(&e);
                if multi_platform {
                    message.push_str(&format!(" (building for {})", platform.id()));
                }
                match e.location(&parsed, &text) {
                    Some(location) => DockerfileError {
                        excerpt: location.excerpt(&filename, text.as_bytes()),
                        message,
                    }
                    .into(),
                    None => anyhow::Error::from(UserError { message }),
                }
            })?;
        builds.push(PlatformBuild {
            platform,
            definition: compiled.definition,
            image_config: compiled.image_config,
        });
    }
    Ok(FrontendResult {
        platforms: builds,
        multi_platform,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cache_for_all_or_named_stages() {
        let attrs = |value: Option<&str>| -> BTreeMap<String, String> {
            value
                .map(|v| BTreeMap::from([("no-cache".to_string(), v.to_string())]))
                .unwrap_or_default()
        };
        let table: [(Option<&str>, bool, &[&str]); 4] = [
            (None, false, &[]),
            (Some(""), true, &[]),
            (Some("build"), false, &["build"]),
            (Some(" Build , test ,"), false, &["build", "test"]),
        ];
        for (value, all, stages) in table {
            assert_eq!(no_cache_all(&attrs(value)), all, "{value:?}");
            assert_eq!(no_cache_stages(&attrs(value)), stages, "{value:?}");
        }
    }

    #[test]
    fn dockerignore_lines() {
        assert_eq!(
            dockerignore_patterns("# c\n\n a \n!b\n"),
            vec!["a".to_string(), "!b".to_string()]
        );
    }

    #[test]
    fn syntax_directive() {
        for ok in [
            "docker/dockerfile:1",
            "docker/dockerfile:1.7-labs",
            "docker.io/docker/dockerfile:1@sha256:0123",
            "docker/dockerfile",
        ] {
            assert!(check_syntax(ok).is_ok(), "{ok}");
        }
        let err = check_syntax("example.com/frontend:1").unwrap_err();
        assert!(err.contains("not supported yet"), "{err}");
        assert!(check_syntax("127.0.0.1:5000/docker/dockerfile:1").is_err());
    }

    #[test]
    fn network_and_hosts_attrs() {
        assert_eq!(network_mode(None).unwrap(), pb::NetMode::Unset);
        assert_eq!(network_mode(Some("none")).unwrap(), pb::NetMode::None);
        assert_eq!(network_mode(Some("host")).unwrap(), pb::NetMode::Host);
        assert!(network_mode(Some("bridge")).is_err());
        assert_eq!(
            extra_hosts(Some("db=10.1.2.3,web=::1")).unwrap(),
            vec![
                ("db".to_string(), "10.1.2.3".to_string()),
                ("web".to_string(), "::1".to_string())
            ]
        );
        assert!(extra_hosts(Some("db=notanip")).is_err());
        assert!(extra_hosts(None).unwrap().is_empty());
    }

    #[test]
    fn resolve_modes() {
        assert_eq!(ResolveMode::parse(None).unwrap(), ResolveMode::Default);
        assert_eq!(ResolveMode::parse(Some("pull")).unwrap(), ResolveMode::Pull);
        assert_eq!(
            ResolveMode::parse(Some("local")).unwrap(),
            ResolveMode::Local
        );
        assert!(ResolveMode::parse(Some("never")).is_err());
    }

    #[test]
    fn platform_attr() {
        let mut attrs = BTreeMap::new();
        assert_eq!(
            target_platforms(&attrs).unwrap(),
            vec![Platform::host().canonical()]
        );
        assert!(!multi_platform_requested(&attrs, 1));
        attrs.insert("platform".into(), "linux/arm64".into());
        assert_eq!(target_platforms(&attrs).unwrap()[0].id(), "linux/arm64");
        attrs.insert(
            "platform".into(),
            "linux/arm64/v8, linux/amd64,linux/aarch64".into(),
        );
        let ids: Vec<String> = target_platforms(&attrs)
            .unwrap()
            .iter()
            .map(Platform::id)
            .collect();
        assert_eq!(ids, ["linux/arm64", "linux/amd64"]);
        assert!(multi_platform_requested(&attrs, 2));
        attrs.insert("platform".into(), "linux".into());
        let err = target_platforms(&attrs).unwrap_err().to_string();
        assert!(err.contains("invalid platform \"linux\""), "{err}");
        let mut attrs = BTreeMap::new();
        attrs.insert("build-arg:BUILDKIT_MULTI_PLATFORM".into(), "1".into());
        assert!(multi_platform_requested(&attrs, 1));
    }
}
