//! Raw command-line arguments (step one of two: clap parses, `settings`
//! resolves and validates).

use clap::{Args, Parser, Subcommand};

/// kiln — builds container images from Dockerfiles (nerdctl build + BuildKit).
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, disable_help_subcommand = true)]
pub struct Cli {
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        global = true,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// containerd address (socket path, optionally `unix://`) [default:
    /// /run/containerd/containerd.sock; for a non-root user whose rootless
    /// containerd runs, $XDG_RUNTIME_DIR/containerd/containerd.sock]
    #[arg(long, global = true, env = "CONTAINERD_ADDRESS")]
    pub address: Option<String>,
    /// containerd snapshotter.
    #[arg(
        long,
        global = true,
        env = "CONTAINERD_SNAPSHOTTER",
        default_value = "overlayfs"
    )]
    pub snapshotter: String,
    /// Debug logging on stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    /// TLS to a `tcp://` build daemon (buildctl's TLS flags).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// buildctl's TLS flags, for a `tcp://` `--buildkit-host` (ignored for
/// unix sockets). Giving any of them turns TLS on.
#[derive(Debug, Default, Clone, Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) the daemon's certificate must chain to (default: the system CAs).
    #[arg(long, global = true, value_name = "FILE")]
    pub tlscacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for daemons requiring mutual TLS.
    #[arg(long, global = true, value_name = "FILE")]
    pub tlscert: Option<std::path::PathBuf>,
    /// Key (PEM) of --tlscert.
    #[arg(long, global = true, value_name = "FILE")]
    pub tlskey: Option<std::path::PathBuf>,
    /// Server name the daemon's certificate must carry (default: the host of the address).
    #[arg(long, global = true, value_name = "NAME")]
    pub tlsservername: Option<String>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image from a Dockerfile. Needs kilnd (or buildkitd) to be running.
    ///
    /// When discovery finds no daemon (and neither --buildkit-host nor
    /// BUILDKIT_HOST is set), kiln starts kilnd with the OCI worker on the
    /// default socket (root only) unless --no-start-daemon or
    /// KILN_NO_START_DAEMON=1 is given.
    ///
    /// If Dockerfile is not present and -f is not specified, it will look for
    /// Containerfile and build with it.
    Build(BuildArgs),
    /// Manage builds.
    Builder {
        /// Builder subcommand.
        #[command(subcommand)]
        command: BuilderCommand,
    },
    /// Compose: build the services of a compose project.
    Compose(ComposeArgs),
    /// Manage images.
    Image {
        /// Image subcommand.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Install or remove kilnd as a systemd service (rootless or rootful), and rootless containerd.
    Setup(crate::setup::SetupArgs),
    /// Print the shell completion script for bash, zsh or fish.
    ///
    /// bash: `source <(kiln completion bash)`; zsh: `kiln completion zsh >
    /// "${fpath[1]}/_kiln"`; fish: `kiln completion fish >
    /// ~/.config/fish/completions/kiln.fish`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// Shells `kiln completion` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

/// `kiln builder ...`
#[derive(Debug, Subcommand)]
pub enum BuilderCommand {
    /// Same as `kiln build`.
    Build(Box<BuildArgs>),
    /// Clean up the build cache.
    Prune(PruneArgs),
    /// Show the disk usage of the build cache (like `buildctl du`).
    Du(DaemonArgs),
    /// Show which build daemon is used and why, its workers, and how images land in containerd.
    Info(DaemonArgs),
}

/// The daemon selection flag shared by the builder commands.
#[derive(Debug, Default, Clone, Args)]
pub struct DaemonArgs {
    /// BuildKit address (`unix://<path>` or `tcp://host:port`).
    #[arg(long, value_name = "ADDRESS")]
    pub buildkit_host: Option<String>,
}

/// `kiln builder prune`.
#[derive(Debug, Default, Clone, Args)]
pub struct PruneArgs {
    /// Daemon selection.
    #[command(flatten)]
    pub daemon: DaemonArgs,
    /// Remove all unused build cache, not just dangling ones.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Do not prompt for confirmation.
    #[arg(short = 'f', long)]
    pub force: bool,
}

/// `kiln compose [-f FILE]... <command>`.
#[derive(Debug, Clone, Args)]
pub struct ComposeArgs {
    /// Compose file(s) (default: compose.yaml, compose.yml, docker-compose.yml, docker-compose.yaml).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Vec<String>,
    /// Project name (default: the project directory's name, normalized).
    #[arg(short = 'p', long = "project-name")]
    pub project_name: Option<String>,
    /// Compose subcommand.
    #[command(subcommand)]
    pub command: ComposeCommand,
}

/// `kiln compose ...`
#[derive(Debug, Clone, Subcommand)]
pub enum ComposeCommand {
    /// Build or rebuild services.
    Build(ComposeBuildArgs),
}

/// `kiln compose build [SERVICE...]` (reference §1.10).
#[derive(Debug, Default, Clone, Args)]
pub struct ComposeBuildArgs {
    /// Services to build (default: every service with a `build:` section).
    #[arg(value_name = "SERVICE")]
    pub services: Vec<String>,
    /// Set build-time variables for services.
    #[arg(long = "build-arg", value_name = "ARG")]
    pub build_arg: Vec<String>,
    /// Do not use cache when building the image.
    #[arg(long)]
    pub no_cache: bool,
    /// Progress output: auto, plain, quiet.
    #[arg(long, default_value = "")]
    pub progress: String,
    /// BuildKit address (`unix://<path>` or `tcp://host:port`).
    #[arg(long, value_name = "ADDRESS")]
    pub buildkit_host: Option<String>,
}

/// `kiln image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Same as `kiln build`.
    Build(BuildArgs),
}

/// `kiln build [flags] PATH`: every flag of `nerdctl build` (reference §1.2).
///
/// Flags this slice does not implement are still parsed so that using one is
/// an explicit error rather than an unknown-flag or a silent no-op.
#[derive(Debug, Default, Clone, Args)]
pub struct BuildArgs {
    /// Build context directory.
    #[arg(value_name = "PATH")]
    pub context: Vec<String>,

    /// BuildKit address (`unix://<path>` or `tcp://host:port`).
    #[arg(long, value_name = "ADDRESS")]
    pub buildkit_host: Option<String>,
    /// When discovery finds no daemon, fail instead of starting kilnd
    /// (kiln's extension; also `KILN_NO_START_DAEMON=1`).
    #[arg(long)]
    pub no_start_daemon: bool,
    /// Name and optionally a tag in the `name:tag` format (repeatable).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tag: Vec<String>,
    /// Name of the Dockerfile (relative to the working directory; `-` = stdin).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        allow_hyphen_values = true
    )]
    pub file: Option<String>,
    /// Set the target build stage to build.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Set build-time variables (`K=V`, or `K` to take the value from the environment).
    #[arg(long = "build-arg", value_name = "ARG")]
    pub build_arg: Vec<String>,
    /// Progress output: auto, plain, quiet (tty, rawjson not yet).
    #[arg(long, default_value = "auto", value_name = "MODE")]
    pub progress: String,
    /// Suppress the build output and print the image digest on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Deprecated no-op (`--rm=false` prints a warning).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub rm: Option<bool>,

    /// Do not use cache when building the image.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub no_cache: Option<bool>,
    /// Do not cache the named stages (repeatable or comma-separated; as buildx's
    /// `--no-cache-filter`, not a nerdctl flag). `--no-cache` (every stage) wins.
    #[arg(long, value_name = "STAGE")]
    pub no_cache_filter: Vec<String>,
    /// Output destination: `type=image|docker|oci|tar[,dest=<file>|-]`,
    /// `type=local,dest=<dir>`, or a bare path (= `type=local,dest=<path>`).
    /// `type=docker|oci` without `dest` is loaded into containerd; `tar`
    /// without `dest` (or `dest=-`) goes to stdout, never a terminal.
    /// `local` merges the files into the directory, owned by the caller.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    /// SLSA provenance attestation: `true`, `false`, or `mode=min|max[,builder-id=<uri>]`
    /// (= `--attest type=provenance,…`; the image and oci exporters then write an index with
    /// an attestation manifest per platform).
    #[arg(long)]
    pub provenance: Option<String>,
    /// Always (`--pull`) or never (`--pull=false`) pull base images.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub pull: Option<bool>,
    /// Secret to expose to the build: `id=<id>,src=<file>`, `id=<id>,env=<VAR>` (buildctl syntax).
    #[arg(long)]
    pub secret: Vec<String>,
    /// Extra privileged entitlement (not supported yet).
    #[arg(long)]
    pub allow: Vec<String>,
    /// Attestation parameters `type=X[,...]`: `type=provenance[,mode=min|max]`; `type=sbom` is
    /// refused (it needs a scanner image kiln does not run).
    #[arg(long)]
    pub attest: Vec<String>,
    /// SSH agent to forward: `default` (`$SSH_AUTH_SOCK`) or `<id>=<socket>`; key files are not supported yet.
    #[arg(long)]
    pub ssh: Vec<String>,
    /// SBOM attestation shorthand (refused unless `false`: BuildKit runs a scanner image,
    /// docker/buildkit-syft-scanner, which kiln does not).
    #[arg(long)]
    pub sbom: Option<String>,
    /// External cache sources (`ref` alone means `type=registry,ref=<ref>`; an image pushed
    /// with an inline cache is a cache source too).
    #[arg(long)]
    pub cache_from: Vec<String>,
    /// Cache export destinations (`type=registry,ref=…`, `type=local,dest=…`, `mode=min|max`,
    /// or `type=inline` into the exported image; `ref` alone means `type=registry,ref=<ref>`).
    #[arg(long)]
    pub cache_to: Vec<String>,
    /// Networking mode for RUN: default, none or host.
    #[arg(long)]
    pub network: Option<String>,
    /// Set target platform for build (e.g. linux/amd64); several (comma-separated or the flag
    /// repeated) build a multi-platform image index. Without binfmt emulation a RUN for a
    /// foreign platform fails: run steps in `FROM --platform=$BUILDPLATFORM` stages instead.
    #[arg(long, value_delimiter = ',')]
    pub platform: Vec<String>,
    /// Additional build contexts: `name=DIR` (served as a local), `name=docker-image://REF`.
    #[arg(long)]
    pub build_context: Vec<String>,
    /// Write the image digest (the manifest digest, as nerdctl) to a file.
    #[arg(long)]
    pub iidfile: Option<String>,
    /// Write the build result metadata (buildctl's JSON) to a file.
    #[arg(long)]
    pub metadata_file: Option<String>,
    /// Image metadata labels `k=v`.
    #[arg(long)]
    pub label: Vec<String>,
    /// Custom host-to-IP mappings `host:ip`.
    #[arg(long)]
    pub add_host: Vec<String>,
    /// Source policy file (BuildKit's JSON: allow, deny or convert sources); default
    /// `$EXPERIMENTAL_BUILDKIT_SOURCE_POLICY`.
    #[arg(long)]
    pub source_policy_file: Option<String>,
}

/// The completion script of `kiln` for `shell`.
pub fn completion_script(shell: CompletionShell) -> Vec<u8> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kiln", &mut out);
    out
}

impl Cli {
    /// The build arguments, whichever of the three spellings was used;
    /// `None` for the other commands.
    pub fn build_args(&self) -> Option<&BuildArgs> {
        match &self.command {
            Command::Builder {
                command: BuilderCommand::Build(args),
            } => Some(args.as_ref()),
            Command::Build(args)
            | Command::Image {
                command: ImageCommand::Build(args),
            } => Some(args),
            _ => None,
        }
    }
}

/// The containerd socket when neither `--address` nor `CONTAINERD_ADDRESS` names one: a
/// non-root user's rootless containerd (`$XDG_RUNTIME_DIR/containerd/containerd.sock`, where
/// `kiln setup install-containerd-rootless` and containerd-rootless.sh put it) when its socket
/// exists, as nerdctl reaches it; else the system one.
pub fn default_containerd_address(euid: u32, runtime_dir: Option<&std::path::Path>) -> String {
    if euid != 0 {
        if let Some(socket) = runtime_dir.map(|dir| dir.join("containerd/containerd.sock")) {
            if socket.exists() {
                return socket.display().to_string();
            }
        }
    }
    "/run/containerd/containerd.sock".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completion_scripts_mention_the_commands() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            assert!(script.contains("build"), "{shell:?}");
            assert!(script.contains("compose"), "{shell:?}");
            assert!(script.contains("no-start-daemon"), "{shell:?}");
        }
        let cli = parse(&["completion", "zsh"]);
        assert!(matches!(
            cli.command,
            Command::Completion {
                shell: CompletionShell::Zsh
            }
        ));
        assert!(Cli::try_parse_from(["kiln", "completion", "tcsh"]).is_err());
    }

    #[test]
    fn three_spellings_of_build() {
        for args in [
            &["build", "-t", "x", "."][..],
            &["builder", "build", "-t", "x", "."][..],
            &["image", "build", "-t", "x", "."][..],
        ] {
            let cli = parse(args);
            assert_eq!(cli.build_args().unwrap().tag, vec!["x"]);
            assert_eq!(cli.build_args().unwrap().context, vec!["."]);
        }
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse(&[
            "build",
            "--namespace",
            "ns1",
            "--snapshotter=native",
            ".",
            "--debug",
        ]);
        assert_eq!(cli.namespace, "ns1");
        assert_eq!(cli.snapshotter, "native");
        assert!(cli.debug);
        let cli = parse(&["-n", "ns2", "build", "."]);
        assert_eq!(cli.namespace, "ns2");
    }

    #[test]
    fn file_dash_and_repeatables() {
        let cli = parse(&[
            "build",
            "-f",
            "-",
            "--build-arg",
            "A=1",
            "--build-arg=B",
            "-t",
            "a",
            "--tag=b",
            ".",
        ]);
        let b = cli.build_args().unwrap();
        assert_eq!(b.file.as_deref(), Some("-"));
        assert_eq!(b.build_arg, vec!["A=1", "B"]);
        assert_eq!(b.tag, vec!["a", "b"]);
    }

    #[test]
    fn bool_flags_take_optional_values() {
        let cli = parse(&["build", "--no-cache", "--rm=false", "."]);
        assert_eq!(cli.build_args().unwrap().no_cache, Some(true));
        assert_eq!(cli.build_args().unwrap().rm, Some(false));
        assert_eq!(cli.build_args().unwrap().context, vec!["."]);
        let cli = parse(&["build", "--platform", "linux/amd64,linux/arm64", "."]);
        assert_eq!(cli.build_args().unwrap().platform.len(), 2);
    }

    #[test]
    fn rootless_users_default_to_their_containerd() {
        let dir = tempfile::tempdir().unwrap();
        let system = "/run/containerd/containerd.sock";
        assert_eq!(default_containerd_address(1000, Some(dir.path())), system);
        std::fs::create_dir(dir.path().join("containerd")).unwrap();
        std::fs::write(dir.path().join("containerd/containerd.sock"), b"").unwrap();
        let user = dir.path().join("containerd/containerd.sock");
        assert_eq!(
            default_containerd_address(1000, Some(dir.path())),
            user.display().to_string()
        );
        assert_eq!(default_containerd_address(0, Some(dir.path())), system);
        assert_eq!(default_containerd_address(1000, None), system);
    }
}
