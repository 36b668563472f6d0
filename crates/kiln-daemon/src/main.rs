//! `kilnd`: kiln's build daemon. Takes buildkitd's flags and
//! `buildkitd.toml`, serves BuildKit's `Control` API on the same sockets and
//! runs builds on the OCI worker.

mod cache;
mod config;
mod control;
mod debug;
mod exporter;
mod frontend;
mod fsexport;
mod gateway;
mod jobs;
mod listen;
mod locals;
mod policy;
mod provenance;
mod registry_auth;
mod secrets;
mod tuning;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Parser as _;
use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_proto::moby::buildkit::v1::control_server::ControlServer;
use kiln_session::SessionManager;
use kiln_solver::Solver;
use kiln_worker::Worker;
use kiln_worker_containerd::{ContainerdImageSource, ContainerdWorker, ContainerdWorkerConfig};
use kiln_worker_oci::{OciWorker, OciWorkerConfig, OciWorkerOptions, Snapshotter};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

use crate::config::{Config, Flags};
use crate::listen::Listener;

/// gRPC message size limit, both ways (BuildKit's).
const MAX_MESSAGE: usize = 16 << 20;

fn find_in_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// SIGTERM or SIGINT, with both handlers installed now: a signal that arrives once the
/// daemon has said it is ready (`READY=1`, the socket answering) must stop it cleanly
/// (`STOPPING=1`, sockets removed), never kill it with the default action.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

/// The `[registry."host"]` tables as the resolver's settings: CA files read, mirrors checked
/// (`host[:port]` only: a scheme or a path is refused rather than misread).
fn registry_hosts(
    registries: &std::collections::BTreeMap<String, config::RegistryConfig>,
) -> anyhow::Result<RegistryHosts> {
    let mut hosts = RegistryHosts::default();
    for (host, settings) in registries {
        hosts.insert(
            host.clone(),
            HostConfig {
                http: settings.http,
                insecure: settings.insecure,
            },
        );
        for mirror in &settings.mirrors {
            let valid = !mirror.is_empty()
                && !mirror.contains("://")
                && !mirror.contains('/')
                && kiln_image::reference::Reference::parse_normalized(&format!(
                    "{mirror}/kiln/probe:latest"
                ))
                .is_ok_and(|r| r.domain() == mirror);
            if !valid {
                anyhow::bail!(
                    "invalid mirror {mirror:?} of [registry.\"{host}\"]: expected host[:port] \
                     (set http = true under the mirror's own [registry.\"{mirror}\"] for plain http)"
                );
            }
        }
        if !settings.keypair.is_empty() {
            anyhow::bail!(
                "client certificates (keypair) of [registry.\"{host}\"] are not supported yet"
            );
        }
        if !settings.mirrors.is_empty() {
            hosts.set_mirrors(host.clone(), settings.mirrors.clone());
        }
        for path in &settings.ca {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "failed to read CA certificate {} of [registry.\"{host}\"]",
                    path.display()
                )
            })?;
            hosts.add_ca(host.clone(), pem);
        }
    }
    // Bad PEM is reported at start, not at the first pull.
    kiln_image::registry::Resolver::new(hosts.clone())
        .context("invalid [registry] settings in the config")?;
    Ok(hosts)
}

fn parse_platforms(list: &[String]) -> anyhow::Result<Option<Vec<kiln_image::oci::Platform>>> {
    if list.is_empty() {
        return Ok(None);
    }
    list.iter()
        .map(|p| {
            kiln_image::oci::Platform::parse(p).with_context(|| format!("invalid platform {p:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Some)
}

/// Opens the worker builds run on. Like buildkitd, the OCI worker is the
/// default when it is enabled (`auto`: when runc is in PATH); the containerd
/// worker is used when the OCI worker is off and it is enabled (`auto`: when
/// its socket exists). kiln runs one worker per daemon: when both are
/// enabled explicitly, the OCI worker wins and a warning says so.
async fn open_worker(config: &Config, hosts: &RegistryHosts) -> anyhow::Result<Arc<dyn Worker>> {
    let runc = config
        .oci
        .binary
        .clone()
        .or_else(|| find_in_path(&["runc", "buildkit-runc"]));
    let containerd_address = config
        .containerd
        .address
        .clone()
        .unwrap_or_else(|| config::DEFAULT_CONTAINERD_ADDRESS.to_string());
    let oci_enabled = config.oci.enabled.unwrap_or(runc.is_some());
    let containerd_enabled = config
        .containerd
        .enabled
        .unwrap_or_else(|| Path::new(containerd_address.trim_start_matches("unix://")).exists());
    if oci_enabled {
        if config.containerd.enabled == Some(true) {
            tracing::warn!(
                "both workers are enabled: currently, only the default worker (OCI) can be used"
            );
        }
        let runc =
            runc.context("no worker found, rebuild the buildkit daemon? (runc is not in PATH)")?;
        let options = OciWorkerOptions {
            rootless: config.oci.rootless.unwrap_or(false),
            snapshotter: match config.oci.snapshotter.as_deref() {
                Some("overlayfs") => Some(Snapshotter::Overlayfs),
                Some("native") => Some(Snapshotter::Native),
                _ => None,
            },
        };
        let mut worker = OciWorker::open_with(
            OciWorkerConfig {
                root: config.root.clone(),
                runc_binary: runc,
                registry_hosts: hosts.clone(),
                labels: config.oci.labels.clone(),
                platforms: parse_platforms(&config.oci.platforms)?,
            },
            options,
        )
        .context("failed to start the OCI worker")?;
        if let Some(images) = &config.oci.containerd_images {
            let address = images
                .address
                .as_deref()
                .unwrap_or(config::DEFAULT_CONTAINERD_ADDRESS);
            let source = ContainerdImageSource::connect(address, &images.namespace)
                .await
                .with_context(|| {
                    format!(
                        "failed to reach containerd at {address} for the OCI worker's containerd-images"
                    )
                })?;
            tracing::info!(
                namespace = images.namespace,
                address,
                "the OCI worker reads base images from containerd (read-only) when registries fail"
            );
            worker = worker.with_base_images(Arc::new(source));
        }
        return Ok(Arc::new(worker));
    }
    if containerd_enabled {
        let runc =
            runc.context("the containerd worker runs steps with runc, which is not in PATH")?;
        let worker = ContainerdWorker::open(ContainerdWorkerConfig {
            root: config.root.clone(),
            address: containerd_address,
            namespace: config
                .containerd
                .namespace
                .clone()
                .unwrap_or_else(|| config::DEFAULT_CONTAINERD_NAMESPACE.to_string()),
            snapshotter: config
                .containerd
                .snapshotter
                .clone()
                .unwrap_or_else(|| config::DEFAULT_CONTAINERD_SNAPSHOTTER.to_string()),
            runc_binary: runc,
            rootless: config.containerd.rootless.unwrap_or(false),
            registry_hosts: hosts.clone(),
            labels: config.containerd.labels.clone(),
            platforms: parse_platforms(&config.containerd.platforms)?,
        })
        .await;
        match worker {
            Ok(worker) => return Ok(Arc::new(worker)),
            // `auto`, as buildkitd: a containerd that does not answer means
            // no containerd worker, not a failed start.
            Err(e) if config.containerd.enabled.is_none() => {
                tracing::warn!(error = %e, "containerd is not answering: the containerd worker is off");
            }
            Err(e) => return Err(e).context("failed to start the containerd worker"),
        }
    }
    bail!("no worker found, rebuild the buildkit daemon? (both the OCI and the containerd worker are disabled or unavailable)")
}

/// As rootless buildkitd: the default socket directory `$XDG_RUNTIME_DIR/buildkit` is made
/// `0700` and sticky, so the XDG runtime-dir cleanup (files untouched for 6 hours) leaves it.
fn protect_socket_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let result = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1700)));
    if let Err(e) = result {
        tracing::warn!(dir = %dir.display(), error = %e, "failed to protect the socket directory");
    }
}

/// The tcp:// listeners' TLS: the server identity and, with a CA, required
/// client certificates (mutual TLS; tonic sets ALPN `h2`).
fn server_tls(files: &config::TlsFiles) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("failed to read the TLS {what} {}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(
        read(&files.cert, "certificate")?,
        read(&files.key, "key")?,
    );
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &files.ca {
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
            ca,
            "CA certificate",
        )?));
    }
    Ok(tls.timeout(std::time::Duration::from_secs(10)))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = shutdown_signal().context("failed to install the signal handlers")?;
    let lock = listen::RootLock::acquire(&config.root)?;
    tracing::debug!(lock = %lock.path().display(), "locked the root");
    let hosts = registry_hosts(&config.registries)?;
    exporter::set_registry_hosts(hosts.clone());
    let worker = open_worker(&config, &hosts).await?;
    // The table of the worker in use: its parallelism bound and its garbage collection.
    let (gc_enabled, tuning) = if worker.image_store().is_some() {
        (config.containerd.gc, &config.containerd.tuning)
    } else {
        (config.oci.gc, &config.oci.tuning)
    };
    let solver = Arc::new(
        Solver::open(worker, &config.root)
            .context("failed to open the solver state")?
            .with_max_parallelism(tuning.max_parallelism.unwrap_or(0)),
    );
    let worker_id = solver.worker().id().to_string();
    let sessions = SessionManager::new();
    // The configured garbage-collection policies (buildkitd's defaults for the disk holding
    // the root when none is), applied at start and every minute; ListWorkers reports them.
    let gc_policy = tuning
        .gc_policy(&config.root)
        .context("invalid garbage-collection settings in the worker table")?;
    let _gc =
        (gc_enabled != Some(false)).then(|| usage::spawn_gc(solver.clone(), gc_policy.clone()));
    let service = Arc::new(
        control::ControlService::new(solver, sessions, config.root.clone())
            .with_entitlements(config.entitlements.clone())
            .with_gc_policy(gc_policy),
    );

    let tls = config.tls.as_ref().map(server_tls).transpose()?;
    if let Some(dir) = &config.rootless_socket_dir {
        protect_socket_dir(dir);
    }
    let mut listeners = Vec::new();
    for address in &config.addresses {
        listeners.push(listen::bind(address, config.group, tls.is_some())?);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let mut socket_paths = Vec::new();
    for listener in listeners {
        let control = ControlServer::from_arc(service.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let bridge =
            kiln_proto::moby::buildkit::v1::frontend::llb_bridge_server::LlbBridgeServer::new(
                gateway::GatewayService::new(service.clone()),
            )
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut builder = tonic::transport::Server::builder();
        if let (Listener::Tcp(_), Some(tls)) = (&listener, &tls) {
            builder = builder
                .tls_config(tls.clone())
                .context("failed to set up TLS")?;
        }
        let router = builder.add_service(control).add_service(bridge);
        match listener {
            Listener::Unix(l, path) => {
                socket_paths.push(path);
                servers.spawn(
                    router.serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown),
                );
            }
            Listener::InheritedUnix(l) => {
                servers.spawn(
                    router.serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown),
                );
            }
            Listener::Tcp(l) => {
                servers.spawn(
                    router.serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown),
                );
            }
        }
    }
    if let Some(address) = &config.debug_address {
        let info = debug::DebugInfo {
            root: config.root.clone(),
            addresses: config.addresses.clone(),
            worker: worker_id.clone(),
        };
        let server = debug::bind(address, info).await?;
        tokio::spawn(server);
        tracing::info!(address, "debug handlers listening");
    }
    tracing::info!(addresses = ?config.addresses, root = %config.root.display(), rootless = config.rootless, "running server");
    if let Err(e) = listen::notify_ready() {
        tracing::warn!("{e:#}");
    }

    tokio::select! {
        _ = shutdown => tracing::info!("stopping server"),
        Some(result) = servers.join_next() => {
            result.context("server task failed")?.context("server failed")?;
        }
    }
    if let Err(e) = listen::notify_stopping() {
        tracing::debug!("{e:#}");
    }
    let _ = stop_tx.send(true);
    let drain = async { while servers.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    for path in socket_paths {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    let config = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kilnd: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    init_logging(&config);
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "kilnd: rootless mode requires to be executed as the mapped root in a user namespace; you may use RootlessKit for setting up the namespace"
        );
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kilnd: failed to start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kilnd: {e:#}");
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries(toml_text: &str) -> std::collections::BTreeMap<String, config::RegistryConfig> {
        #[derive(serde::Deserialize)]
        struct File {
            registry: std::collections::BTreeMap<String, config::RegistryConfig>,
        }
        toml::from_str::<File>(toml_text).unwrap().registry
    }

    #[test]
    fn registry_settings_are_checked_at_start() {
        let ok = registries("[registry.\"example.invalid\"]\nmirrors = [\"127.0.0.1:5000\"]\n");
        assert!(registry_hosts(&ok).is_ok());
        for bad in ["http://127.0.0.1:5000", "mirror.example/prefix", ""] {
            let list = registries(&format!(
                "[registry.\"docker.io\"]\nmirrors = [\"{bad}\"]\n"
            ));
            let error = registry_hosts(&list).unwrap_err().to_string();
            assert!(error.starts_with("invalid mirror"), "{bad}: {error}");
        }
        let missing = registries("[registry.\"r.example\"]\nca = [\"/nonexistent/ca.pem\"]\n");
        let error = format!("{:#}", registry_hosts(&missing).unwrap_err());
        assert!(
            error.starts_with(
                "failed to read CA certificate /nonexistent/ca.pem of [registry.\"r.example\"]"
            ),
            "{error}"
        );
        let keypair =
            registries("[[registry.\"r.example\".keypair]]\nkey = \"/k.pem\"\ncert = \"/c.pem\"\n");
        let error = registry_hosts(&keypair).unwrap_err().to_string();
        assert!(error.contains("not supported yet"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("bad.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bad = registries(&format!(
            "[registry.\"r.example\"]\nca = [\"{}\"]\n",
            pem.display()
        ));
        let error = format!("{:#}", registry_hosts(&bad).unwrap_err());
        assert!(
            error.contains("invalid CA certificate for registry r.example"),
            "{error}"
        );
    }
}
