//! `kilnd`: kiln's build daemon. Takes buildkitd's flags and
//! `buildkitd.toml`, serves BuildKit's `Control` API on the same sockets and
//! runs builds on the OCI worker.

mod config;
mod control;
mod exporter;
mod frontend;
mod jobs;
mod listen;
mod locals;
mod usage;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Parser as _;
use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_proto::moby::buildkit::v1::control_server::ControlServer;
use kiln_session::SessionManager;
use kiln_solver::Solver;
use kiln_worker_oci::{OciWorker, OciWorkerConfig};
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

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn open_worker(config: &Config) -> anyhow::Result<OciWorker> {
    if config.oci.enabled == Some(false) {
        bail!("no worker found, rebuild the buildkit daemon? (the OCI worker is disabled and kiln has no other worker yet)");
    }
    let runc = match &config.oci.binary {
        Some(binary) => binary.clone(),
        None => match find_in_path(&["runc", "buildkit-runc"]) {
            Some(found) => found,
            None => bail!("no worker found, rebuild the buildkit daemon? (runc is not in PATH)"),
        },
    };
    let mut hosts = RegistryHosts::default();
    for (host, settings) in &config.registries {
        hosts.insert(
            host.clone(),
            HostConfig {
                http: settings.http,
                insecure: settings.insecure,
            },
        );
    }
    let platforms = if config.oci.platforms.is_empty() {
        None
    } else {
        Some(
            config
                .oci
                .platforms
                .iter()
                .map(|p| {
                    kiln_image::oci::Platform::parse(p)
                        .with_context(|| format!("invalid platform {p:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        )
    };
    OciWorker::open(OciWorkerConfig {
        root: config.root.clone(),
        runc_binary: runc,
        registry_hosts: hosts,
        labels: config.oci.labels.clone(),
        platforms,
    })
    .context("failed to start the OCI worker")
}

async fn run(config: Config) -> anyhow::Result<()> {
    let lock = listen::RootLock::acquire(&config.root)?;
    tracing::debug!(lock = %lock.path().display(), "locked the root");
    let worker = Arc::new(open_worker(&config)?);
    let solver =
        Arc::new(Solver::open(worker, &config.root).context("failed to open the solver state")?);
    let sessions = SessionManager::new();
    let service = Arc::new(control::ControlService::new(
        solver,
        sessions,
        config.root.clone(),
    ));

    let mut listeners = Vec::new();
    for address in &config.addresses {
        listeners.push(listen::bind(address, config.group)?);
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
        let router = tonic::transport::Server::builder().add_service(control);
        match listener {
            Listener::Unix(l, path) => {
                socket_paths.push(path);
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
    tracing::info!(addresses = ?config.addresses, root = %config.root.display(), "running server");

    tokio::select! {
        _ = shutdown_signal() => tracing::info!("stopping server"),
        Some(result) = servers.join_next() => {
            result.context("server task failed")?.context("server failed")?;
        }
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
