//! `kiln`: the client. `kiln build` is `nerdctl build` (reference §1): flags are
//! parsed by clap ([`cli`]) and resolved into validated settings
//! ([`settings`]), the build daemon is found as nerdctl finds buildkitd
//! ([`discovery`]), the build runs over BuildKit's control API
//! (kiln-client) and the result lands in containerd (kiln-containerd):
//! directly when the worker shares our containerd, else through a tarball.
//! `kiln builder prune|du|info` administer the daemon ([`builder`]);
//! `kiln compose build` builds a compose project's services concurrently
//! ([`compose`]). When no daemon is found, `kiln build` starts kilnd
//! ([`autostart`]). `kiln completion bash|zsh|fish` prints a completion script.
//!
//! `--progress=auto` currently renders plain text whether or not stderr is a
//! terminal (no live TTY view yet). Data (the digest printed by `-q`) goes to
//! stdout; progress, `unpacking …`, `Loaded image: …`, warnings and errors go
//! to stderr.

mod autostart;
mod build;
mod builder;
mod cache;
mod cli;
mod compose;
mod discovery;
mod dockerfile;
mod metadata;
mod output;
mod policy;
mod secrets;
mod settings;
mod setup;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{BuilderCommand, Cli, Command, ComposeCommand};

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    kiln_client::set_client_tls(kiln_client::ClientTls {
        ca_cert: cli.tls.tlscacert.clone(),
        cert: cli.tls.tlscert.clone(),
        key: cli.tls.tlskey.clone(),
        server_name: cli.tls.tlsservername.clone(),
    });
    let env = |key: &str| std::env::var(key).ok();
    let globals = build::Globals {
        namespace: cli.namespace.clone(),
        address: cli.address.clone().unwrap_or_else(|| {
            let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from);
            cli::default_containerd_address(nix::unistd::geteuid().as_raw(), runtime_dir.as_deref())
        }),
        snapshotter: cli.snapshotter.clone(),
    };
    if let Some(args) = cli.build_args() {
        let settings = settings::resolve_build(args, &env)?;
        return build::run(&globals, settings).await;
    }
    match &cli.command {
        Command::Builder {
            command: BuilderCommand::Prune(args),
        } => builder::prune(&globals, args).await,
        Command::Builder {
            command: BuilderCommand::Du(args),
        } => builder::du(&globals, args).await,
        Command::Builder {
            command: BuilderCommand::Info(args),
        } => builder::info(&globals, args).await,
        Command::Compose(compose_args) => match &compose_args.command {
            ComposeCommand::Build(build_args) => {
                compose::build(&globals, compose_args, build_args, &env).await
            }
        },
        Command::Setup(args) => setup::run(args).await,
        Command::Completion { shell } => {
            let mut out = std::io::stdout().lock();
            out.write_all(&cli::completion_script(*shell))?;
            out.flush()?;
            Ok(())
        }
        _ => anyhow::bail!("unknown command"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.debug);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(hint) = err
                .downcast_ref::<discovery::DiscoveryError>()
                .and_then(|e| e.hint())
            {
                eprintln!("error: {hint}");
            }
            // The lines a rejected Dockerfile or a failing step points at come first, as
            // buildctl prints them.
            for excerpt in err
                .chain()
                .filter_map(|e| e.downcast_ref::<kiln_client::Error>())
                .flat_map(kiln_client::Error::source_excerpts)
            {
                eprint!("{}", excerpt.render());
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
