//! `kiln build`: discovery → solve (docker tar over FileSend) → load into containerd.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use kiln_client::progress::PlainPrinter;
use kiln_client::{SolveOptions, StatusResponse};
use kiln_containerd::{Containerd, ImportOptions};
use tokio::sync::mpsc;

use crate::discovery::{self, DiscoveryEnv};
use crate::dockerfile;
use crate::output::{choose_output, OutputChoice};
use crate::settings::{BuildSettings, ProgressMode};

/// Ping timeout per discovery candidate, and connect timeout for the build (buildctl's 5 s).
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Runs one build and lands the image in containerd.
pub async fn run(globals: &Globals, settings: BuildSettings) -> anyhow::Result<()> {
    for warning in &settings.warnings {
        eprintln!("warning: {warning}");
    }
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

    let host = find_daemon(settings.buildkit_host.as_deref(), &globals.namespace).await?;
    tracing::debug!(host, "using build daemon");

    // nerdctl connects to containerd before building, even for outputs that
    // do not need it; kiln always loads, so it needs it anyway.
    let containerd = Containerd::connect(&globals.address)
        .await
        .context("failed to connect to containerd")?;
    let containerd_uuid = containerd
        .server_uuid()
        .await
        .context("failed to read containerd's UUID")?;

    let mut client = kiln_client::connect(&host, DAEMON_TIMEOUT).await?;
    let workers = kiln_client::ping(&mut client).await?;
    let worker = workers
        .first()
        .ok_or_else(|| anyhow!("no worker available"))?;
    if worker.labels.is_empty() {
        bail!("worker doesn't have labels");
    }
    let choice = choose_output(
        &worker.labels,
        &containerd_uuid,
        &globals.namespace,
        &globals.snapshotter,
        &[],
    );
    // This slice always goes through the tar: the sharable `type=image,unpack=true`
    // path (BuildKit stores and unpacks the image itself) is not wired yet.
    let choice = match choice {
        OutputChoice::SharableImage => {
            tracing::debug!("worker shares our containerd; still using the docker tar path");
            OutputChoice::DockerTar
        }
        other => other,
    };
    let exporter = choice.exporter(&settings.tags);

    let output_dir = tempfile::Builder::new()
        .prefix("kiln-build-")
        .tempdir()
        .context("failed to create a temporary directory for the image archive")?;
    let archive_path = output_dir.path().join("image.tar");

    let mut frontend_attrs = BTreeMap::new();
    frontend_attrs.insert("filename".to_string(), dockerfile.filename.clone());
    frontend_attrs.extend(settings.frontend_attrs.clone());
    let mut locals = BTreeMap::new();
    locals.insert("context".to_string(), context_dir.clone());
    locals.insert("dockerfile".to_string(), dockerfile.dir.clone());
    let options = SolveOptions {
        frontend: "dockerfile.v0".to_string(),
        frontend_attrs,
        exporters: vec![exporter],
        locals,
        output_file: Some(archive_path.clone()),
        shared_key: context_dir.display().to_string(),
    };

    let show_progress = !settings.quiet && settings.progress != ProgressMode::Quiet;
    let (progress_tx, progress_rx) = mpsc::channel::<StatusResponse>(128);
    let renderer = tokio::spawn(render_progress(progress_rx, show_progress));
    let solved = kiln_client::solve(client, options, progress_tx).await;
    match renderer.await {
        Ok(Err(err)) => tracing::debug!(%err, "progress rendering failed"),
        Err(err) => tracing::debug!(%err, "progress task failed"),
        Ok(Ok(())) => {}
    }
    let outcome = solved?;
    tracing::debug!(response = ?outcome.exporter_response, stats = ?outcome.session_stats, "solve done");

    if choice.needs_loading() {
        load(&containerd, globals, &settings, &archive_path).await?;
    }
    Ok(())
}

/// Renders progress as plain text on stderr (`auto` is plain too, on a
/// terminal as well), or drains it when quiet.
async fn render_progress(
    mut progress: mpsc::Receiver<StatusResponse>,
    show: bool,
) -> std::io::Result<()> {
    let mut printer = show.then(|| PlainPrinter::new(std::io::stderr()));
    while let Some(message) = progress.recv().await {
        if let Some(printer) = printer.as_mut() {
            printer.handle(&message)?;
        }
    }
    if let Some(printer) = printer.as_mut() {
        printer.finish()?;
    }
    Ok(())
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
    let platform = kiln_containerd::Platform::host();
    let options = ImportOptions::new(
        settings.tags.first().cloned(),
        platform.clone(),
        &globals.snapshotter,
    );
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
