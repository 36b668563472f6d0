//! Build orchestration: session + `Control.Status` + `Control.Solve`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::moby::buildkit::v1::control_client::ControlClient;
use kiln_proto::moby::buildkit::v1::{
    CacheOptions, CacheOptionsEntry, Exporter, SolveRequest, StatusRequest, StatusResponse,
};
use kiln_session::client::SessionBuilder;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::Error;

/// How long the status stream may stay silent after `Solve` returned before
/// the client stops waiting for it (buildctl's value).
const STATUS_DRAIN_IDLE: Duration = Duration::from_secs(5);

/// What to build and where the result goes.
#[derive(Debug, Clone, Default)]
pub struct SolveOptions {
    /// Frontend name, `dockerfile.v0` for Dockerfile builds.
    pub frontend: String,
    /// Frontend attributes (`filename`, `target`, `build-arg:K`, ...).
    pub frontend_attrs: BTreeMap<String, String>,
    /// Exporters as `(type, attrs)`, in order; the first is also sent in the
    /// deprecated single-exporter fields for older daemons.
    pub exporters: Vec<(String, BTreeMap<String, String>)>,
    /// Local directories served over the session (`context`, `dockerfile`).
    pub locals: BTreeMap<String, PathBuf>,
    /// File that receives a tar exporter's output over `FileSend`.
    pub output_file: Option<PathBuf>,
    /// Directory the `local` exporter's files are merged into over
    /// `FileSend` (wins over `output_file`).
    pub output_dir: Option<PathBuf>,
    /// Session shared key (cache hint for local sources).
    pub shared_key: String,
    /// Entitlements asked for (`network.host`, `security.insecure`).
    pub entitlements: Vec<String>,
    /// Cache importers as `(type, attrs)` (`--cache-from`).
    pub cache_imports: Vec<(String, BTreeMap<String, String>)>,
    /// Cache exporters as `(type, attrs)` (`--cache-to`).
    pub cache_exports: Vec<(String, BTreeMap<String, String>)>,
    /// Files receiving FileSend output by exporter id (kilnd sends a `local`
    /// cache export as exporter `cache-<n>`); other output goes to
    /// `output_file`.
    pub file_send_targets: BTreeMap<String, PathBuf>,
    /// Secrets served over the session by id (`--secret`).
    pub secrets: BTreeMap<String, kiln_session::secrets::SecretSource>,
    /// SSH agent sockets forwarded over the session by id (`--ssh`).
    pub ssh_agents: BTreeMap<String, PathBuf>,
    /// Source policy (`--source-policy-file`), sent as `SolveRequest.SourcePolicy`.
    pub source_policy: Option<kiln_proto::moby::buildkit::v1::sourcepolicy::Policy>,
    /// More session services to serve (e.g. the `export` content store of `tar=false`).
    pub session_services: kiln_session::client::ExtraServices,
}

fn cache_entries(entries: &[(String, BTreeMap<String, String>)]) -> Vec<CacheOptionsEntry> {
    entries
        .iter()
        .map(|(r#type, attrs)| CacheOptionsEntry {
            r#type: r#type.clone(),
            attrs: attrs.clone(),
        })
        .collect()
}

/// What a successful solve returns.
#[derive(Debug, Clone)]
pub struct SolveOutcome {
    /// The daemon's exporter response (`containerimage.digest`, `image.name`, ...).
    pub exporter_response: BTreeMap<String, String>,
    /// Transfer counters of the session.
    pub session_stats: kiln_session::client::SessionStats,
}

/// A random build ref, like BuildKit's identity.NewID (25 base-36 characters).
pub fn new_ref() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..25)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Runs one build on the daemon behind `client`.
///
/// Opens the session (serving `options.locals`, registry credentials from
/// the docker config (`$DOCKER_CONFIG`, `~/.docker/config.json`) and, when
/// set, receiving the exporter output into `options.output_file`), then runs `Control.Status`
/// and `Control.Solve` concurrently. Every status message is forwarded to
/// `progress`; the channel is dropped once the status stream ends (or stays
/// silent for 5 s after the solve). The session is closed after the solve. A
/// failed solve is [`Error::Solve`] carrying the daemon's gRPC status.
pub async fn solve(
    client: ControlClient<Channel>,
    options: SolveOptions,
    progress: mpsc::Sender<StatusResponse>,
) -> Result<SolveOutcome, Error> {
    // Registry credentials from the docker config, as buildctl always attaches them.
    let mut builder = SessionBuilder::new(options.shared_key.clone())
        .registry_auth(kiln_session::auth::DockerConfig::from_env());
    for (name, path) in &options.locals {
        builder = builder.local_dir(name.clone(), path.clone());
    }
    if let Some(path) = &options.output_file {
        builder = builder.file_send_path(path.clone());
    }
    for (id, path) in &options.file_send_targets {
        builder = builder.file_send_target(id.clone(), path.clone());
    }
    for (id, source) in &options.secrets {
        builder = builder.secret(id.clone(), source.clone());
    }
    for (id, socket) in &options.ssh_agents {
        builder = builder.ssh_agent(id.clone(), socket.clone());
    }
    if let Some(dir) = &options.output_dir {
        builder = builder.file_send_dir(dir.clone());
    }
    if !options.session_services.is_empty() {
        builder = builder.services(options.session_services.clone());
    }
    let session_id = builder.id().to_string();
    let session = builder
        .run(client.clone())
        .await
        .map_err(|source| Error::Session { source })?;

    let build_ref = new_ref();
    tracing::debug!(build_ref, session_id, "starting solve");

    let (solve_done_tx, solve_done_rx) = watch::channel(false);
    let status_task = tokio::spawn(forward_status(
        client.clone(),
        build_ref.clone(),
        progress,
        solve_done_rx,
    ));

    let mut exporters: Vec<Exporter> = options
        .exporters
        .iter()
        .map(|(r#type, attrs)| Exporter {
            r#type: r#type.clone(),
            attrs: attrs.clone(),
        })
        .collect();
    let (exporter_deprecated, exporter_attrs_deprecated) = match exporters.first() {
        Some(first) => (first.r#type.clone(), first.attrs.clone()),
        None => (String::new(), BTreeMap::new()),
    };
    let request = SolveRequest {
        r#ref: build_ref.clone(),
        session: session_id,
        frontend: options.frontend.clone(),
        frontend_attrs: options.frontend_attrs.clone(),
        exporter_deprecated,
        exporter_attrs_deprecated,
        exporters: std::mem::take(&mut exporters),
        entitlements: options.entitlements.clone(),
        cache: Some(CacheOptions {
            imports: cache_entries(&options.cache_imports),
            exports: cache_entries(&options.cache_exports),
            ..Default::default()
        }),
        source_policy: options.source_policy.clone(),
        ..Default::default()
    };
    let mut solve_client = client.clone();
    let result = solve_client.solve(request).await;
    let _ = solve_done_tx.send(true);

    // Status errors are secondary: the solve result decides the outcome.
    match status_task.await {
        Ok(Err(status)) => tracing::debug!(%status, "status stream ended with an error"),
        Err(join) => tracing::debug!(%join, "status task failed"),
        Ok(Ok(())) => {}
    }
    let session_stats = session.stats();
    if let Err(err) = session.close().await {
        tracing::debug!(%err, "closing the session failed");
    }

    let response = result.map_err(|status| Error::Solve { status })?;
    Ok(SolveOutcome {
        exporter_response: response.into_inner().exporter_response,
        session_stats,
    })
}

/// Forwards `Control.Status{ref}` messages to `progress` until the stream
/// ends, the receiver goes away, or the stream is idle for
/// [`STATUS_DRAIN_IDLE`] after the solve finished.
async fn forward_status(
    mut client: ControlClient<Channel>,
    build_ref: String,
    progress: mpsc::Sender<StatusResponse>,
    mut solve_done: watch::Receiver<bool>,
) -> Result<(), tonic::Status> {
    let mut stream = client
        .status(StatusRequest { r#ref: build_ref })
        .await?
        .into_inner();
    loop {
        let next = if *solve_done.borrow() {
            match tokio::time::timeout(STATUS_DRAIN_IDLE, stream.message()).await {
                Ok(next) => next?,
                Err(_) => return Ok(()),
            }
        } else {
            tokio::select! {
                next = stream.message() => next?,
                changed = solve_done.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            }
        };
        let Some(message) = next else {
            return Ok(());
        };
        if progress.send(message).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_random_base36() {
        let a = new_ref();
        let b = new_ref();
        assert_eq!(a.len(), 25);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
        assert_ne!(a, b);
    }
}
