//! `kiln build`: discovery → output plan → solve → landing (directly in
//! containerd, a docker tar loaded by the client, or a file / stdout).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use kiln_client::progress::{PlainPrinter, RawJsonPrinter, Renderer, TtyPrinter};
use kiln_client::{SolveOptions, StatusResponse};
use kiln_containerd::{Containerd, ImportOptions};
use tokio::sync::mpsc;

use crate::autostart;
use crate::discovery::{self, DiscoveryEnv};
use crate::dockerfile;
use crate::metadata;
use crate::output::choose_output;
use crate::settings::{BuildSettings, ExplicitOutput, OutputDest, ProgressMode};

/// Ping timeout per discovery candidate, and connect timeout for the build (buildctl's 5 s).
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);

/// containerd-side settings from the global flags.
#[derive(Debug, Clone)]
pub struct Globals {
    /// containerd namespace.
    pub namespace: String,
    /// containerd socket.
    pub address: String,
    /// containerd snapshotter.
    pub snapshotter: String,
}

/// Finds the build daemon (§2): flag, `BUILDKIT_HOST`, then the namespace's candidates.
pub async fn find_daemon(flag: Option<&str>, namespace: &str) -> anyhow::Result<String> {
    let env = DiscoveryEnv::from_process();
    let plan = discovery::plan(flag, &env, namespace)?;
    let host = discovery::discover(plan, env.is_rootless(), |host: String| async move {
        kiln_client::ping_address(&host, DAEMON_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|e| ping_error_text(&e))
    })
    .await?;
    Ok(host)
}

/// [`find_daemon`], and when the namespace's candidates all fail (never for
/// `--buildkit-host`/`BUILDKIT_HOST`) and `start` is set, starts kilnd
/// ([`autostart`]) and says so in one line on stderr.
pub async fn find_or_start_daemon(
    flag: Option<&str>,
    namespace: &str,
    start: bool,
) -> anyhow::Result<String> {
    let err = match find_daemon(flag, namespace).await {
        Ok(host) => return Ok(host),
        Err(err) => err,
    };
    let no_host = matches!(
        err.downcast_ref::<discovery::DiscoveryError>(),
        Some(discovery::DiscoveryError::NoHostAvailable { .. })
    );
    if !start || !no_host {
        return Err(err);
    }
    tracing::debug!("no build daemon found: {err:#}");
    let var = |key: &str| std::env::var(key).ok();
    let location = autostart::location(&DiscoveryEnv::from_process(), &var)?;
    let binary = autostart::find_kilnd()?;
    autostart::start(&binary, &location).await?;
    eprintln!("{}", autostart::started_message(&location));
    Ok(location.address)
}

/// The ping failure as shown after `failed to ping to host <h>: ` — the
/// causes only, since the line already names the host.
fn ping_error_text(err: &kiln_client::Error) -> String {
    use std::error::Error as _;
    match err {
        kiln_client::Error::Connect { .. } => match err.source() {
            Some(cause) => kiln_client::error_chain(cause),
            None => err.to_string(),
        },
        other => kiln_client::error_chain(other),
    }
}

/// How the result of a solve reaches the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landing {
    /// The daemon stored and unpacked the image in our containerd itself
    /// (`type=image,unpack=true`); extra tags are applied by the client.
    Direct,
    /// The exporter writes the image into our containerd through the session
    /// content store `export` (`tar=false`): only blobs containerd lacks cross;
    /// the client names and unpacks the image.
    Store,
    /// A tar received into a temporary file and loaded into containerd.
    Load,
    /// A tar written to stdout.
    Stdout,
    /// A tar written to this file.
    File(PathBuf),
    /// The `local` exporter's files, merged into this directory.
    Directory(PathBuf),
    /// Nothing comes back to the client (`type=image` with a daemon-side
    /// store or push).
    None,
}

/// The exporter to ask for and what the client does with its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputPlan {
    /// Exporter `(type, attrs)`.
    pub exporter: (String, BTreeMap<String, String>),
    /// What happens on the client afterwards.
    pub landing: Landing,
    /// Why (for `kiln builder info` and debug logs).
    pub reason: String,
}

/// What [`plan_output`] needs to know about containerd, when kiln talks to it.
#[derive(Debug, Clone)]
pub struct ContainerdView<'a> {
    /// containerd's UUID (`Containerd::server_uuid`).
    pub uuid: &'a str,
    /// Our namespace.
    pub namespace: &'a str,
    /// Our snapshotter.
    pub snapshotter: &'a str,
}

/// Chooses the exporter (reference §1.4). Without `--output`, the first
/// worker's labels decide between landing directly (`type=image,unpack=true`
/// when the worker shares our containerd, namespace and snapshotter) and a
/// docker tar loaded by the client. An explicit `--output` is passed through
/// with nerdctl's name suffix; when the image does not land in containerd
/// every tag is given to the exporter (so a tarball carries all of them).
pub fn plan_output(
    output: Option<&ExplicitOutput>,
    tags: &[String],
    platforms: &[kiln_image::oci::Platform],
    worker_labels: &BTreeMap<String, String>,
    containerd: &ContainerdView<'_>,
) -> OutputPlan {
    let name_suffix = |attrs: &mut BTreeMap<String, String>, all_tags: bool| match tags.first() {
        Some(first) => {
            let name = if all_tags {
                tags.join(",")
            } else {
                first.clone()
            };
            attrs.insert("name".to_string(), name);
        }
        None => {
            attrs.insert("dangling-name-prefix".to_string(), "<none>".to_string());
        }
    };
    match output {
        None => {
            let choice = choose_output(
                worker_labels,
                containerd.uuid,
                containerd.namespace,
                containerd.snapshotter,
                platforms,
            );
            let mut exporter = choice.exporter(tags);
            let (landing, reason) = if choice.needs_loading() {
                exporter.1.insert("tar".to_string(), "false".to_string());
                (
                    Landing::Store,
                    format!(
                        "{}: the exporter writes only the blobs containerd lacks into it \
                         over the session",
                        sharing_mismatch(worker_labels, containerd, platforms)
                    ),
                )
            } else {
                (
                    Landing::Direct,
                    "the worker uses this containerd (same UUID), namespace and snapshotter: \
                     the daemon stores and unpacks the image itself"
                        .to_string(),
                )
            };
            OutputPlan {
                exporter,
                landing,
                reason,
            }
        }
        Some(explicit) => {
            let mut attrs = explicit.attrs.clone();
            let (landing, all_tags) = match &explicit.dest {
                OutputDest::Load => (Landing::Load, false),
                OutputDest::Stdout => (Landing::Stdout, true),
                OutputDest::File(path) => (Landing::File(path.clone()), true),
                // `dest` is the client's path: kept here, not sent (buildctl).
                OutputDest::Directory(dir) => (Landing::Directory(dir.clone()), true),
                OutputDest::Daemon => (Landing::None, true),
            };
            name_suffix(&mut attrs, all_tags);
            OutputPlan {
                exporter: (explicit.kind.clone(), attrs),
                landing,
                reason: "--output given".to_string(),
            }
        }
    }
}

/// Why the worker's result cannot land in our containerd directly.
pub fn sharing_mismatch(
    labels: &BTreeMap<String, String>,
    containerd: &ContainerdView<'_>,
    platforms: &[kiln_image::oci::Platform],
) -> String {
    use crate::output::{
        LABEL_CONTAINERD_NAMESPACE, LABEL_CONTAINERD_UUID, LABEL_EXECUTOR, LABEL_SNAPSHOTTER,
    };
    let checks = [
        (LABEL_EXECUTOR, "containerd"),
        (LABEL_CONTAINERD_UUID, containerd.uuid),
        (LABEL_CONTAINERD_NAMESPACE, containerd.namespace),
        (LABEL_SNAPSHOTTER, containerd.snapshotter),
    ];
    for (label, want) in checks {
        match labels.get(label) {
            None => return format!("the worker has no {label} label (want {want:?})"),
            Some(got) if got != want => {
                return format!("worker label {label} is {got:?}, not {want:?}")
            }
            Some(_) => {}
        }
    }
    match platforms {
        [] => "the worker does not share this containerd".to_string(),
        [p] => format!("the target platform {} is not the host's", p.id()),
        several => format!(
            "several target platforms ({}) make an index, landed as an OCI image",
            several
                .iter()
                .map(kiln_image::oci::Platform::id)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs one build and lands the result where `--output` (or the worker) says.
pub async fn run(globals: &Globals, settings: BuildSettings) -> anyhow::Result<()> {
    for warning in &settings.warnings {
        eprintln!("warning: {warning}");
    }
    crate::secrets::check_sources(&settings.secrets, &settings.ssh_agents)?;
    let context_dir = std::path::absolute(&settings.context)
        .with_context(|| format!("invalid build context {:?}", settings.context))?;
    if !context_dir.is_dir() {
        bail!(
            "invalid build context {:?}: not a directory",
            settings.context
        );
    }
    let dockerfile = dockerfile::locate(
        settings.file.as_deref(),
        &context_dir,
        &mut std::io::stdin().lock(),
    )?;
    for warning in &dockerfile.warnings {
        eprintln!("warning: {warning}");
    }
    if let Some(ExplicitOutput {
        dest: OutputDest::Stdout,
        ..
    }) = &settings.output
    {
        if std::io::stdout().is_terminal() {
            bail!(
                "refusing to write the tarball to a terminal: set dest=<file> or redirect stdout"
            );
        }
    }

    let host = find_or_start_daemon(
        settings.buildkit_host.as_deref(),
        &globals.namespace,
        settings.start_daemon,
    )
    .await?;
    tracing::debug!(host, "using build daemon");

    let mut client = kiln_client::connect(&host, DAEMON_TIMEOUT).await?;
    let workers = kiln_client::ping(&mut client).await?;
    let worker = workers
        .first()
        .ok_or_else(|| anyhow!("no worker available"))?;

    // containerd is needed to choose the output and to load; an explicit
    // output to a file or the daemon does not touch it.
    let needs_containerd = matches!(
        settings.output.as_ref().map(|o| &o.dest),
        None | Some(OutputDest::Load)
    );
    let (containerd, containerd_uuid) = if needs_containerd {
        let containerd = Containerd::connect(&globals.address)
            .await
            .context("failed to connect to containerd")?;
        let uuid = containerd
            .server_uuid()
            .await
            .context("failed to read containerd's UUID")?;
        (Some(containerd), uuid)
    } else {
        (None, String::new())
    };
    if settings.output.is_none() && worker.labels.is_empty() {
        bail!("worker doesn't have labels");
    }
    let plan = plan_output(
        settings.output.as_ref(),
        &settings.tags,
        &settings.platforms,
        &worker.labels,
        &ContainerdView {
            uuid: &containerd_uuid,
            namespace: &globals.namespace,
            snapshotter: &globals.snapshotter,
        },
    );
    tracing::debug!(?plan, "output plan");

    let mut plan = plan;
    let outcome = loop {
        let store = match (&plan.landing, &containerd) {
            (Landing::Store, Some(containerd)) => Some(
                kiln_containerd::ExportStore::open(containerd, &globals.namespace)
                    .await
                    .context("failed to prepare containerd to receive the image")?,
            ),
            _ => None,
        };
        let attempt = solve_plan(
            client.clone(),
            &plan,
            &settings,
            &dockerfile,
            &context_dir,
            store.as_ref(),
        )
        .await;
        let (outcome, output_file) = match attempt {
            Ok(done) => done,
            Err(err) => {
                if let Some(store) = &store {
                    store.abandon().await;
                }
                return Err(err);
            }
        };
        if let (Some(store), Some(containerd)) = (store, &containerd) {
            if store.stats().calls == 0 {
                // An older daemon ignores tar=false: it exported nothing to us.
                store.abandon().await;
                eprintln!(
                    "warning: the build daemon did not write the image into containerd \
                     (tar=false is not supported by it); building again to a tarball"
                );
                plan = tarball_plan(plan);
                continue;
            }
            land(
                containerd,
                globals,
                &settings,
                store,
                &outcome.exporter_response,
            )
            .await?;
        }
        break (outcome, output_file);
    };
    let (outcome, output_file) = outcome;

    match (&plan.landing, &containerd) {
        (Landing::Load, Some(containerd)) => {
            let path = output_file
                .as_ref()
                .map(|f| f.path.clone())
                .ok_or_else(|| anyhow!("no image archive was received"))?;
            load(containerd, globals, &settings, &path).await?;
        }
        (Landing::Direct, Some(containerd)) => {
            if let Some((first, rest)) = settings.tags.split_first() {
                for tag in rest {
                    containerd
                        .tag(&globals.namespace, first, tag)
                        .await
                        .context("unable to tag image")?;
                }
            }
            if settings.quiet {
                if let Some(digest) = outcome.exporter_response.get("containerimage.digest") {
                    println!("{digest}");
                }
            }
        }
        (Landing::Stdout, _) => {
            let path = output_file
                .as_ref()
                .map(|f| f.path.clone())
                .ok_or_else(|| anyhow!("no image archive was received"))?;
            let mut file = std::fs::File::open(&path)
                .with_context(|| format!("failed to open {}", path.display()))?;
            let mut stdout = std::io::stdout().lock();
            std::io::copy(&mut file, &mut stdout)
                .context("failed to write the tarball to stdout")?;
            stdout.flush()?;
        }
        _ => {}
    }
    write_result_files(&settings, &outcome.exporter_response)?;
    Ok(())
}

/// The plan `plan` falls back to when the daemon cannot write into our
/// content store: the tarball, loaded by the client.
fn tarball_plan(mut plan: OutputPlan) -> OutputPlan {
    plan.exporter.1.remove("tar");
    plan.landing = Landing::Load;
    plan.reason = format!("{} (fallback: the daemon ignored tar=false)", plan.reason);
    plan
}

/// Where a tarball exporter's output is received; the temporary directory
/// (when there is one) lives as long as this.
struct OutputFile {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// Runs the solve for `plan`, serving `store` over the session when given.
async fn solve_plan(
    client: kiln_client::ControlClient<tonic::transport::Channel>,
    plan: &OutputPlan,
    settings: &BuildSettings,
    dockerfile: &dockerfile::DockerfileLocation,
    context_dir: &std::path::Path,
    store: Option<&kiln_containerd::ExportStore>,
) -> anyhow::Result<(kiln_client::SolveOutcome, Option<OutputFile>)> {
    let output_dir = tempfile::Builder::new()
        .prefix("kiln-build-")
        .tempdir()
        .context("failed to create a temporary directory for the image archive")?;
    let output_file = match &plan.landing {
        Landing::Load | Landing::Stdout => Some(OutputFile {
            path: output_dir.path().join("image.tar"),
            _dir: Some(output_dir),
        }),
        Landing::File(path) => Some(OutputFile {
            path: std::path::absolute(path)
                .with_context(|| format!("invalid output file {}", path.display()))?,
            _dir: None,
        }),
        Landing::Direct | Landing::Store | Landing::Directory(_) | Landing::None => None,
    };
    let receive_dir = match &plan.landing {
        Landing::Directory(dir) => Some(
            std::path::absolute(dir)
                .with_context(|| format!("invalid output directory {}", dir.display()))?,
        ),
        _ => None,
    };
    let mut session_services = kiln_session::client::ExtraServices::default();
    if let Some(store) = store {
        session_services.add(store.service(), &kiln_session::content::METHODS);
    }

    let mut frontend_attrs = BTreeMap::new();
    frontend_attrs.insert("filename".to_string(), dockerfile.filename.clone());
    frontend_attrs.extend(settings.frontend_attrs.clone());
    let cache_tmp = tempfile::Builder::new()
        .prefix("kiln-cache-")
        .tempdir()
        .context("failed to create a temporary directory for the cache")?;
    let cache = crate::cache::plan(
        &settings.cache_imports,
        &settings.cache_exports,
        cache_tmp.path(),
    )?;
    let mut locals = cache.locals.clone();
    locals.insert("context".to_string(), context_dir.to_path_buf());
    locals.insert("dockerfile".to_string(), dockerfile.dir.clone());
    locals.extend(settings.named_locals.clone());
    let options = SolveOptions {
        frontend: "dockerfile.v0".to_string(),
        frontend_attrs,
        exporters: vec![plan.exporter.clone()],
        locals,
        output_file: output_file.as_ref().map(|f| f.path.clone()),
        output_dir: receive_dir,
        shared_key: context_dir.display().to_string(),
        entitlements: settings.entitlements.clone(),
        cache_imports: cache.imports.clone(),
        cache_exports: cache.exports.clone(),
        file_send_targets: cache.file_send_targets.clone(),
        source_policy: settings.source_policy.clone(),
        session_services,
        secrets: settings.secrets.clone(),
        ssh_agents: settings.ssh_agents.clone(),
    };

    let mode = if settings.quiet {
        ProgressMode::Quiet
    } else {
        settings.progress
    };
    let (progress_tx, progress_rx) = mpsc::channel::<StatusResponse>(128);
    let renderer = tokio::spawn(render_progress(progress_rx, mode));
    let solved = kiln_client::solve(client, options, progress_tx).await;
    match renderer.await {
        Ok(Err(err)) => tracing::debug!(%err, "progress rendering failed"),
        Err(err) => tracing::debug!(%err, "progress task failed"),
        Ok(Ok(())) => {}
    }
    let outcome = solved?;
    tracing::debug!(response = ?outcome.exporter_response, stats = ?outcome.session_stats, "solve done");
    cache.land()?;
    Ok((outcome, output_file))
}

/// `--metadata-file` and `--iidfile` (§1.8), written after the image has landed.
fn write_result_files(
    settings: &BuildSettings,
    response: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    if let Some(path) = &settings.metadata_file {
        let json = metadata::metadata_json(response)?;
        std::fs::write(path, json)
            .with_context(|| format!("failed to write metadata file {}", path.display()))?;
    }
    if let Some(path) = &settings.iidfile {
        let digest = metadata::image_digest(response)?;
        metadata::write_iidfile(path, digest)?;
    }
    Ok(())
}

/// The renderer for `mode` on stderr: `auto` and `tty` draw the live view
/// when stderr is a terminal and fall back to plain otherwise; colours
/// follow `NO_COLOR`.
fn renderer(mode: ProgressMode) -> Renderer<std::io::Stderr> {
    use std::io::IsTerminal;
    let stderr = std::io::stderr();
    let terminal = stderr.is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
    match mode {
        ProgressMode::Quiet => Renderer::Quiet,
        ProgressMode::RawJson => Renderer::RawJson(RawJsonPrinter::new(stderr)),
        ProgressMode::Plain => Renderer::Plain(PlainPrinter::new(stderr)),
        ProgressMode::Auto | ProgressMode::Tty if terminal => {
            let width = std::env::var("COLUMNS")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(80);
            let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            Renderer::Tty(TtyPrinter::new(stderr, width, color))
        }
        ProgressMode::Auto | ProgressMode::Tty => Renderer::Plain(PlainPrinter::new(stderr)),
    }
}

/// Renders progress on stderr in `mode`, redrawing the live view on a timer
/// so running steps' clocks advance.
async fn render_progress(
    mut progress: mpsc::Receiver<StatusResponse>,
    mode: ProgressMode,
) -> std::io::Result<()> {
    let mut renderer = renderer(mode);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(150));
    loop {
        tokio::select! {
            message = progress.recv() => match message {
                Some(message) => renderer.handle(&message)?,
                None => break,
            },
            _ = tick.tick() => renderer.tick()?,
        }
    }
    renderer.finish()
}

/// After a `tar=false` export into `store`: names the image (the first tag,
/// else `<snapshotter>@<digest>` as the load path does), unpacks it (layers
/// already unpacked are skipped), applies extra tags and says what crossed.
async fn land(
    containerd: &Containerd,
    globals: &Globals,
    settings: &BuildSettings,
    store: kiln_containerd::ExportStore,
    response: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let target = match response.get("containerimage.descriptor") {
        Some(encoded) => {
            let json = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .context("invalid containerimage.descriptor in the exporter response")?;
            serde_json::from_slice::<kiln_containerd::Descriptor>(&json)
                .context("invalid containerimage.descriptor in the exporter response")?
        }
        None => {
            store.abandon().await;
            bail!("the exporter response has no containerimage.descriptor: no image was built");
        }
    };
    if !store.has_blob(&target.digest).await? {
        store.abandon().await;
        bail!(
            "the build daemon reported image {} but did not write it into containerd",
            target.digest
        );
    }
    let stats = store.stats();
    let platforms = landing_platforms(settings);
    let platform = &platforms[0];
    let name = settings
        .tags
        .first()
        .cloned()
        .unwrap_or_else(|| format!("{}@{}", globals.snapshotter, target.digest));
    let images = store
        .finish(&target, std::slice::from_ref(&name), &platforms)
        .await
        .context("failed to name the image in containerd")?;
    let mut stdout = std::io::stdout();
    for image in &images {
        if !settings.quiet {
            eprintln!("unpacking {} ({})...", image.name, image.target.digest);
        }
        containerd
            .unpack(&globals.namespace, image, &globals.snapshotter, platform)
            .await
            .with_context(|| format!("failed to unpack {}", image.name))?;
        if settings.quiet {
            writeln!(stdout, "{}", image.target.digest)?;
        } else {
            eprintln!("landed {}: {}", image.name, stats.summary());
            eprintln!("Loaded image: {}", image.name);
        }
    }
    if let Some((first, rest)) = settings.tags.split_first() {
        for tag in rest {
            containerd
                .tag(&globals.namespace, first, tag)
                .await
                .context("unable to tag image")?;
        }
    }
    Ok(())
}

/// The platforms a landed image keeps, the one unpacked first: the `--platform` values (the
/// host's among them first, else the first given, as nerdctl unpacks the best match), or the
/// host's.
fn landing_platforms(settings: &BuildSettings) -> Vec<kiln_containerd::Platform> {
    let host = kiln_image::oci::Platform::host();
    let mut wanted = settings.platforms.clone();
    if let Some(at) = wanted.iter().position(|p| host.matches(p)) {
        let native = wanted.remove(at);
        wanted.insert(0, native);
    }
    if wanted.is_empty() {
        wanted.push(host);
    }
    wanted
        .iter()
        .map(|p| kiln_containerd::Platform::new(&p.os, &p.architecture, p.variant.as_deref()))
        .collect()
}

/// Imports the archive into containerd, unpacks it and applies extra tags (§1.5, §1.8).
async fn load(
    containerd: &Containerd,
    globals: &Globals,
    settings: &BuildSettings,
    archive_path: &std::path::Path,
) -> anyhow::Result<()> {
    let size = std::fs::metadata(archive_path)
        .map(|m| m.len())
        .unwrap_or(0);
    if size == 0 {
        bail!("no image was built");
    }
    let archive = std::fs::File::open(archive_path)
        .with_context(|| format!("failed to open {}", archive_path.display()))?;
    let mut platforms = landing_platforms(settings);
    let platform = platforms.remove(0);
    let mut options = ImportOptions::new(
        settings.tags.first().cloned(),
        platform.clone(),
        &globals.snapshotter,
    );
    options.more_platforms = platforms;
    let images = containerd
        .import_archive(&globals.namespace, archive, &options)
        .await
        .context("failed to import the image into containerd")?;
    let mut stdout = std::io::stdout();
    for image in &images {
        if !settings.quiet {
            eprintln!("unpacking {} ({})...", image.name, image.target.digest);
        }
        containerd
            .unpack(&globals.namespace, image, &globals.snapshotter, &platform)
            .await
            .with_context(|| format!("failed to unpack {}", image.name))?;
        // Data (the digest) on stdout; the human message on stderr with the progress.
        if settings.quiet {
            writeln!(stdout, "{}", image.target.digest)?;
        } else {
            eprintln!("Loaded image: {}", image.name);
        }
    }
    if let Some((first, rest)) = settings.tags.split_first() {
        for tag in rest {
            containerd
                .tag(&globals.namespace, first, tag)
                .await
                .context("unable to tag image")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{
        LABEL_CONTAINERD_NAMESPACE, LABEL_CONTAINERD_UUID, LABEL_EXECUTOR, LABEL_SNAPSHOTTER,
    };
    use crate::settings::parse_output;

    const VIEW: ContainerdView<'static> = ContainerdView {
        uuid: "uuid-1",
        namespace: "default",
        snapshotter: "overlayfs",
    };

    fn labels(executor: &str) -> BTreeMap<String, String> {
        [
            (LABEL_EXECUTOR, executor),
            (LABEL_CONTAINERD_UUID, "uuid-1"),
            (LABEL_CONTAINERD_NAMESPACE, "default"),
            (LABEL_SNAPSHOTTER, "overlayfs"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn tags() -> Vec<String> {
        vec![
            "docker.io/library/a:latest".into(),
            "docker.io/library/b:1".into(),
        ]
    }

    #[test]
    fn containerd_worker_lands_directly() {
        let plan = plan_output(None, &tags(), &[], &labels("containerd"), &VIEW);
        assert_eq!(plan.landing, Landing::Direct);
        assert_eq!(plan.exporter.0, "image");
        assert_eq!(plan.exporter.1["unpack"], "true");
        // Only the first tag names the image; the others are tagged by the client.
        assert_eq!(plan.exporter.1["name"], "docker.io/library/a:latest");
    }

    #[test]
    fn oci_worker_writes_into_the_content_store_and_says_why() {
        let plan = plan_output(None, &tags(), &[], &labels("oci"), &VIEW);
        assert_eq!(plan.landing, Landing::Store);
        assert_eq!(plan.exporter.0, "docker");
        assert_eq!(plan.exporter.1["tar"], "false");
        let fallback = tarball_plan(plan.clone());
        assert_eq!(fallback.landing, Landing::Load);
        assert!(!fallback.exporter.1.contains_key("tar"));
        assert!(plan.reason.contains("\"oci\""), "{}", plan.reason);
        let other = ContainerdView {
            uuid: "uuid-2",
            ..VIEW
        };
        let plan = plan_output(None, &[], &[], &labels("containerd"), &other);
        assert_eq!(plan.landing, Landing::Store);
        assert_eq!(plan.exporter.1["dangling-name-prefix"], "<none>");
        assert!(plan.reason.contains("uuid"), "{}", plan.reason);
        let foreign = kiln_image::oci::Platform::parse(
            if kiln_image::oci::Platform::host().architecture == "s390x" {
                "linux/amd64"
            } else {
                "linux/s390x"
            },
        )
        .unwrap();
        let plan = plan_output(
            None,
            &[],
            std::slice::from_ref(&foreign),
            &labels("containerd"),
            &VIEW,
        );
        assert_eq!(plan.landing, Landing::Store);
        assert!(plan.reason.contains("platform"), "{}", plan.reason);
        // Several platforms: an OCI index through the store, never a docker tar.
        let both = [kiln_image::oci::Platform::host(), foreign];
        let plan = plan_output(None, &[], &both, &labels("containerd"), &VIEW);
        assert_eq!(plan.landing, Landing::Store);
        assert_eq!(plan.exporter.0, "oci");
        assert!(
            plan.reason.contains("several target platforms"),
            "{}",
            plan.reason
        );
    }

    #[test]
    fn explicit_outputs() {
        let out = parse_output("type=docker,dest=x.tar").unwrap();
        let plan = plan_output(Some(&out), &tags(), &[], &labels("containerd"), &VIEW);
        assert_eq!(plan.landing, Landing::File("x.tar".into()));
        assert_eq!(plan.exporter.0, "docker");
        // A tarball carries every tag.
        assert_eq!(
            plan.exporter.1["name"],
            "docker.io/library/a:latest,docker.io/library/b:1"
        );
        let out = parse_output("type=oci").unwrap();
        let plan = plan_output(Some(&out), &tags(), &[], &labels("oci"), &VIEW);
        assert_eq!(plan.landing, Landing::Load);
        assert_eq!(plan.exporter.1["name"], "docker.io/library/a:latest");
        let out = parse_output("dir").unwrap();
        let plan = plan_output(Some(&out), &[], &[], &labels("oci"), &VIEW);
        assert_eq!(plan.exporter.0, "local");
        assert!(
            !plan.exporter.1.contains_key("dest"),
            "dest stays client-side"
        );
        assert_eq!(plan.exporter.1["dangling-name-prefix"], "<none>");
        assert_eq!(plan.landing, Landing::Directory("dir".into()));
        let out = parse_output("type=tar,dest=-").unwrap();
        let plan = plan_output(Some(&out), &[], &[], &labels("oci"), &VIEW);
        assert_eq!(plan.landing, Landing::Stdout);
    }
}
