//! `kiln setup`: installs kilnd as a systemd service, the way nerdctl's
//! `containerd-rootless-setuptool.sh` installs buildkitd (reference §3).
//!
//! - `install-buildkit`: rootless, OCI worker. kilnd runs under its own
//!   RootlessKit (user namespace, host network), socket
//!   `$XDG_RUNTIME_DIR/buildkit/buildkitd.sock`, root `$XDG_DATA_HOME/buildkit`.
//! - `install-buildkit-containerd`: rootless, containerd worker. kilnd runs
//!   inside rootless containerd's namespaces (`kiln setup nsenter`, §3.5);
//!   `CONTAINERD_NAMESPACE=<ns>` gives unit `<ns>-buildkit.service`, socket
//!   `$XDG_RUNTIME_DIR/buildkit-<ns>/buildkitd.sock`, root
//!   `$XDG_DATA_HOME/buildkit-<ns>`; without it the `buildkit` namespace and
//!   §3.4's warning. `CONTAINERD_SNAPSHOTTER` is passed through.
//! - `--rootful` on either: `kilnd[-<ns>].service` + `kilnd[-<ns>].socket`
//!   (socket activation, `Type=notify`) under `/etc/systemd/system`; the
//!   containerd variant also writes `/etc/buildkit/buildkitd[-<ns>].toml`
//!   (`[worker.oci] enabled = false`, `[worker.containerd] enabled = true,
//!   namespace = "<ns>"`, namespace `default` unless `CONTAINERD_NAMESPACE`).
//!   `--root-prefix DIR` writes the files under DIR instead of `/` (contents
//!   keep the final paths), for packaging and tests.
//! - `uninstall-*`: stop, disable, remove the units (and the rootful TOML);
//!   data is never removed, the command to do it is printed. Without
//!   systemd, a daemon `--start` started (its pid file next to its data)
//!   is stopped.
//! - `install-containerd-rootless` (module [`containerd`]): rootless
//!   containerd under RootlessKit, for systems without nerdctl's
//!   `containerd-rootless-setuptool.sh`; `install-buildkit-containerd` then
//!   runs kilnd inside its namespaces and picks the snapshotter containerd
//!   could load there (overlayfs, else native) unless
//!   `CONTAINERD_SNAPSHOTTER` names one.
//!
//! Unlike the upstream tool, re-running an install rewrites what changed
//! (and says so) instead of skipping existing files. Without systemd,
//! the files are still written and the exact daemon command is printed
//! (`--start` runs it in the background instead).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

pub mod containerd;

use containerd::ContainerdRootlessOptions;

/// `kiln setup ...`
#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    /// Setup subcommand.
    #[command(subcommand)]
    pub command: SetupCommand,
}

/// The options every install/uninstall takes.
#[derive(Debug, Clone, Default, Args)]
pub struct SetupOptions {
    /// System-wide (root) service instead of a rootless user service.
    #[arg(long)]
    pub rootful: bool,
    /// Write the files under this directory instead of `/` (rootful only;
    /// the unit contents keep the final paths). No systemctl is run.
    #[arg(long, value_name = "DIR")]
    pub root_prefix: Option<PathBuf>,
    /// Without systemd: start the daemon in the background instead of only
    /// printing its command.
    #[arg(long)]
    pub start: bool,
}

/// `kiln setup` subcommands (reference §3).
#[derive(Debug, Clone, Subcommand)]
pub enum SetupCommand {
    /// Install kilnd with the OCI worker (rootless unless --rootful).
    InstallBuildkit(SetupOptions),
    /// Install kilnd with the containerd worker (rootless unless --rootful);
    /// CONTAINERD_NAMESPACE and CONTAINERD_SNAPSHOTTER are honoured.
    InstallBuildkitContainerd(SetupOptions),
    /// Remove what install-buildkit installed (data is kept).
    UninstallBuildkit(SetupOptions),
    /// Remove what install-buildkit-containerd installed (data is kept).
    UninstallBuildkitContainerd(SetupOptions),
    /// Install rootless containerd: containerd under RootlessKit as this
    /// user (unit containerd.service, socket
    /// $XDG_RUNTIME_DIR/containerd/containerd.sock, data
    /// $XDG_DATA_HOME/containerd, config $XDG_CONFIG_HOME/containerd/config.toml).
    InstallContainerdRootless(ContainerdRootlessOptions),
    /// Remove what install-containerd-rootless installed (data is kept).
    UninstallContainerdRootless(ContainerdRootlessOptions),
    /// Run a command inside rootless containerd's namespaces (what the
    /// rootless containerd-worker unit's ExecStart runs, reference §3.5).
    Nsenter {
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// RootlessKit's child in the rootless containerd unit: bind-mounts the
    /// user's containerd directories on the conventional paths, then runs
    /// the command (containerd).
    #[command(hide = true)]
    ContainerdRootlessChild {
        /// containerd and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
}

/// Which worker the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    /// The OCI worker (runc + overlayfs).
    Oci,
    /// The containerd worker.
    Containerd,
}

/// Everything the plans depend on, read from the process once.
#[derive(Debug, Clone)]
pub struct SetupEnv {
    /// Effective uid.
    pub euid: u32,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub runtime_dir: Option<PathBuf>,
    /// `$XDG_DATA_HOME` (default `$HOME/.local/share`).
    pub data_home: Option<PathBuf>,
    /// `$XDG_CONFIG_HOME` (default `$HOME/.config`).
    pub config_home: Option<PathBuf>,
    /// `$CONTAINERD_NAMESPACE`.
    pub namespace: Option<String>,
    /// `$CONTAINERD_SNAPSHOTTER`.
    pub snapshotter: Option<String>,
    /// `$PATH` at install time.
    pub path: String,
    /// The kilnd binary the units run.
    pub kilnd: PathBuf,
    /// This kiln binary (for `kiln setup nsenter`).
    pub kiln: PathBuf,
    /// The rootlesskit binary, if in PATH.
    pub rootlesskit: Option<PathBuf>,
    /// The containerd binary, if in PATH.
    pub containerd: Option<PathBuf>,
    /// The slirp4netns binary, if in PATH.
    pub slirp4netns: Option<PathBuf>,
}

impl SetupEnv {
    /// Reads the environment; `kilnd` is the one next to this `kiln`, else
    /// the first in PATH.
    pub fn from_process() -> anyhow::Result<Self> {
        let var = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from);
        let kiln = std::env::current_exe()
            .context("failed to find the kiln executable")?
            .canonicalize()
            .context("failed to resolve the kiln executable")?;
        let sibling = kiln.with_file_name("kilnd");
        let kilnd = if sibling.is_file() {
            sibling
        } else {
            find_in_path("kilnd")
                .context("kilnd was found neither next to kiln nor in PATH: install it first")?
        };
        Ok(Self {
            euid: nix::unistd::geteuid().as_raw(),
            runtime_dir: var("XDG_RUNTIME_DIR").map(PathBuf::from),
            data_home: var("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".local/share"))),
            config_home: var("XDG_CONFIG_HOME")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".config"))),
            home,
            namespace: var("CONTAINERD_NAMESPACE").map(|v| v.to_string_lossy().into_owned()),
            snapshotter: var("CONTAINERD_SNAPSHOTTER").map(|v| v.to_string_lossy().into_owned()),
            path: std::env::var("PATH").unwrap_or_default(),
            kilnd,
            kiln,
            rootlesskit: find_in_path("rootlesskit"),
            containerd: find_in_path("containerd"),
            slirp4netns: find_in_path("slirp4netns"),
        })
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// One file an install writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Where it goes (final path, before any `--root-prefix`).
    pub path: PathBuf,
    /// Its content.
    pub content: String,
}

/// What an install or uninstall does, computed without side effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What runs (`kilnd`, `containerd`), for messages.
    pub daemon: &'static str,
    /// System-wide (`systemctl`) or user (`systemctl --user`).
    pub rootful: bool,
    /// The unit to start/enable (`kilnd.socket` when socket-activated).
    pub start_unit: String,
    /// Every unit name written, service first.
    pub units: Vec<String>,
    /// The files.
    pub files: Vec<PlannedFile>,
    /// Warnings to print first.
    pub warnings: Vec<String>,
    /// The daemon's command, as run without systemd (argv).
    pub manual_command: Vec<String>,
    /// The daemon's socket (`unix://…`).
    pub address: String,
    /// The daemon's state directory (never removed by uninstall).
    pub data_dir: PathBuf,
}

/// §3.4's warning when no namespace is given.
pub const NAMESPACE_WARNING: &str = "buildkitd has access to images in \"buildkit\" namespace by default. If you want to give buildkitd access to the images in \"default\" namespace, run this command with CONTAINERD_NAMESPACE=default";

fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        arg.to_string()
    } else {
        format!("\"{}\"", arg.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn command_line(argv: &[String]) -> String {
    argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

fn require<'a>(value: &'a Option<PathBuf>, name: &str) -> anyhow::Result<&'a PathBuf> {
    value.as_ref().with_context(|| match name {
        "XDG_RUNTIME_DIR" => "environment variable XDG_RUNTIME_DIR is not set, see https://rootlesscontaine.rs/getting-started/common/login/".to_string(),
        _ => format!("environment variable {name} is not set"),
    })
}

/// The rootless plan (reference §3.3, §3.4).
pub fn rootless_plan(worker: Worker, env: &SetupEnv) -> anyhow::Result<Plan> {
    require(&env.home, "HOME")?;
    let runtime_dir = require(&env.runtime_dir, "XDG_RUNTIME_DIR")?;
    let data_home = require(&env.data_home, "HOME")?;
    let config_home = require(&env.config_home, "HOME")?;
    let kilnd = env.kilnd.display().to_string();
    let mut warnings = Vec::new();
    let (unit, address, root, mut daemon) = match worker {
        Worker::Oci => {
            let address = format!("unix://{}/buildkit/buildkitd.sock", runtime_dir.display());
            let root = data_home.join("buildkit");
            let daemon = vec![
                kilnd,
                "--oci-worker=true".to_string(),
                "--containerd-worker=false".to_string(),
            ];
            ("buildkit.service".to_string(), address, root, daemon)
        }
        Worker::Containerd => {
            let mut daemon = vec![
                kilnd,
                "--oci-worker=false".to_string(),
                "--containerd-worker=true".to_string(),
                "--containerd-worker-rootless=true".to_string(),
            ];
            let (unit, address, root, namespace) = match &env.namespace {
                Some(ns) => (
                    format!("{ns}-buildkit.service"),
                    format!(
                        "unix://{}/buildkit-{ns}/buildkitd.sock",
                        runtime_dir.display()
                    ),
                    data_home.join(format!("buildkit-{ns}")),
                    ns.clone(),
                ),
                None => {
                    warnings.push(NAMESPACE_WARNING.to_string());
                    (
                        "buildkit.service".to_string(),
                        format!("unix://{}/buildkit/buildkitd.sock", runtime_dir.display()),
                        data_home.join("buildkit"),
                        "buildkit".to_string(),
                    )
                }
            };
            daemon.push(format!("--containerd-worker-namespace={namespace}"));
            if let Some(snapshotter) = &env.snapshotter {
                daemon.push(format!("--containerd-worker-snapshotter={snapshotter}"));
            }
            (unit, address, root, daemon)
        }
    };
    // kilnd's rootless defaults would give the same socket and root (the
    // unit's environment may lack the XDG variables of this shell, so they
    // stay explicit). Its default config, `$XDG_CONFIG_HOME/buildkit/
    // buildkitd.toml`, is named only when it exists now: a missing default
    // file is fine for kilnd, a missing explicit one is an error.
    daemon.push(format!("--addr={address}"));
    daemon.push(format!("--root={}", root.display()));
    let user_config = config_home.join("buildkit/buildkitd.toml");
    if user_config.is_file() {
        daemon.push(format!("--config={}", user_config.display()));
    }
    let wrapper: Vec<String> = match worker {
        Worker::Oci => {
            let rootlesskit = env
                .rootlesskit
                .as_ref()
                .context("rootlesskit (https://github.com/rootless-containers/rootlesskit) needs to be present under $PATH")?;
            vec![
                rootlesskit.display().to_string(),
                "--net=host".to_string(),
                "--copy-up=/etc".to_string(),
                "--copy-up=/run".to_string(),
                format!("--state-dir={}/kilnd-rootlesskit", runtime_dir.display()),
            ]
        }
        Worker::Containerd => vec![
            env.kiln.display().to_string(),
            "setup".to_string(),
            "nsenter".to_string(),
            "--".to_string(),
        ],
    };
    let argv: Vec<String> = wrapper.into_iter().chain(daemon).collect();
    let bin_dir = env
        .kilnd
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let part_of = match worker {
        Worker::Containerd => "PartOf=containerd.service\n",
        Worker::Oci => "",
    };
    let content = format!(
        "[Unit]\n\
         Description=BuildKit (Rootless)\n\
         {part_of}\n\
         [Service]\n\
         Environment=PATH={bin_dir}:/sbin:/usr/sbin:{path}\n\
         ExecStart={exec}\n\
         ExecReload=/bin/kill -s HUP $MAINPID\n\
         RestartSec=2\n\
         Restart=always\n\
         Type=simple\n\
         KillMode=mixed\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        path = env.path,
        exec = command_line(&argv),
    );
    Ok(Plan {
        daemon: "kilnd",
        rootful: false,
        start_unit: unit.clone(),
        units: vec![unit.clone()],
        files: vec![PlannedFile {
            path: config_home.join("systemd/user").join(&unit),
            content,
        }],
        warnings,
        manual_command: argv,
        address,
        data_dir: root,
    })
}

/// The rootful plan (reference §3.7): a socket-activated `Type=notify`
/// service, and for the containerd worker the `buildkitd.toml` of
/// nerdctl's docs.
pub fn rootful_plan(worker: Worker, env: &SetupEnv) -> Plan {
    let namespace = env
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    // One daemon per namespace: `default` takes the plain names.
    let suffix = match (worker, namespace.as_str()) {
        (Worker::Containerd, ns) if ns != "default" => format!("-{ns}"),
        _ => String::new(),
    };
    let service = format!("kilnd{suffix}.service");
    let socket = format!("kilnd{suffix}.socket");
    let socket_path = format!("/run/buildkit{suffix}/buildkitd.sock");
    let root = PathBuf::from(format!("/var/lib/buildkit{suffix}"));
    let config = PathBuf::from(format!("/etc/buildkit/buildkitd{suffix}.toml"));
    let mut argv = vec![
        env.kilnd.display().to_string(),
        "--addr".to_string(),
        "fd://".to_string(),
        "--root".to_string(),
        root.display().to_string(),
    ];
    let mut files = Vec::new();
    match worker {
        Worker::Oci => {
            argv.push("--oci-worker=true".to_string());
            argv.push("--containerd-worker=false".to_string());
        }
        Worker::Containerd => {
            argv.push("--config".to_string());
            argv.push(config.display().to_string());
            let mut toml = format!(
                "# Written by `kiln setup install-buildkit-containerd --rootful`.\n\
                 [worker.oci]\n\
                 enabled = false\n\
                 \n\
                 [worker.containerd]\n\
                 enabled = true\n\
                 # namespace to use for build containers and images (\"k8s.io\" for Kubernetes, incl. Rancher Desktop)\n\
                 namespace = \"{namespace}\"\n"
            );
            if let Some(snapshotter) = &env.snapshotter {
                let _ = writeln!(toml, "snapshotter = \"{snapshotter}\"");
            }
            files.push(PlannedFile {
                path: config.clone(),
                content: toml,
            });
        }
    }
    let exec = command_line(&argv);
    let service_text = format!(
        "[Unit]\n\
         Description=kilnd, BuildKit-compatible build daemon\n\
         Documentation=https://github.com/moby/buildkit\n\
         Requires={socket}\n\
         After={socket} network.target local-fs.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         ExecStartPre=-/sbin/modprobe overlay\n\
         ExecStart={exec}\n\
         Delegate=yes\n\
         KillMode=process\n\
         Restart=always\n\
         RestartSec=5\n\
         LimitNPROC=infinity\n\
         LimitCORE=infinity\n\
         LimitNOFILE=infinity\n\
         TasksMax=infinity\n\
         OOMScoreAdjust=-999\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    );
    let socket_text = format!(
        "[Unit]\n\
         Description=kilnd socket{for_ns}\n\
         \n\
         [Socket]\n\
         ListenStream={socket_path}\n\
         SocketMode=0660\n\
         \n\
         [Install]\n\
         WantedBy=sockets.target\n",
        for_ns = if suffix.is_empty() {
            String::new()
        } else {
            format!(" (containerd namespace {namespace})")
        }
    );
    let unit_dir = Path::new("/etc/systemd/system");
    files.insert(
        0,
        PlannedFile {
            path: unit_dir.join(&socket),
            content: socket_text,
        },
    );
    files.insert(
        0,
        PlannedFile {
            path: unit_dir.join(&service),
            content: service_text,
        },
    );
    // Without systemd the socket is bound by kilnd itself.
    let mut manual = argv;
    manual[2] = format!("unix://{socket_path}");
    Plan {
        daemon: "kilnd",
        rootful: true,
        start_unit: socket.clone(),
        units: vec![service, socket],
        files,
        warnings: Vec::new(),
        manual_command: manual,
        address: format!("unix://{socket_path}"),
        data_dir: root,
    }
}

/// Where `path` goes under `prefix` (`/` = itself).
fn prefixed(prefix: Option<&Path>, path: &Path) -> PathBuf {
    match prefix {
        Some(prefix) => prefix.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

fn systemctl(rootful: bool, args: &[&str]) -> std::io::Result<std::process::Output> {
    let mut command = Command::new("systemctl");
    if !rootful {
        command.arg("--user");
    }
    command.args(args).stdin(Stdio::null()).output()
}

/// Whether the systemd instance the plan targets answers.
fn systemd_available(rootful: bool) -> bool {
    if rootful {
        return Path::new("/run/systemd/system").is_dir();
    }
    systemctl(false, &["show-environment"]).is_ok_and(|o| o.status.success())
}

fn systemctl_checked(rootful: bool, args: &[&str]) -> anyhow::Result<()> {
    let output = systemctl(rootful, args)
        .with_context(|| format!("failed to run systemctl {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "systemctl {}{} failed: {}",
            if rootful { "" } else { "--user " },
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn check_user(options: &SetupOptions, env: &SetupEnv) -> anyhow::Result<()> {
    if options.rootful {
        if env.euid != 0 && options.root_prefix.is_none() {
            bail!("--rootful needs root (or --root-prefix to only write the files)");
        }
    } else {
        if env.euid == 0 {
            bail!("Refusing to install rootless kilnd as the root user (use --rootful for a system-wide service)");
        }
        if options.root_prefix.is_some() {
            bail!("--root-prefix is for --rootful installs");
        }
    }
    Ok(())
}

fn plan_for(worker: Worker, options: &SetupOptions, env: &SetupEnv) -> anyhow::Result<Plan> {
    check_user(options, env)?;
    if options.rootful {
        Ok(rootful_plan(worker, env))
    } else {
        rootless_plan(worker, env)
    }
}

/// Writes `plan`'s files (rewriting changed ones), then starts and enables
/// the unit through systemd, or prints (or runs) the daemon command.
pub fn install(plan: &Plan, options: &SetupOptions) -> anyhow::Result<()> {
    for warning in &plan.warnings {
        eprintln!("[WARNING] {warning}");
    }
    let prefix = options.root_prefix.as_deref();
    let mut changed = false;
    for file in &plan.files {
        let target = prefixed(prefix, &file.path);
        match std::fs::read_to_string(&target) {
            Ok(existing) if existing == file.content => {
                eprintln!("[INFO] Unchanged: {}", target.display());
                continue;
            }
            Ok(_) => eprintln!("[INFO] Updating {}", target.display()),
            Err(_) => eprintln!("[INFO] Creating {}", target.display()),
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        std::fs::write(&target, &file.content)
            .with_context(|| format!("failed to write {}", target.display()))?;
        changed = true;
    }
    let manual = command_line(&plan.manual_command);
    if prefix.is_some() {
        eprintln!(
            "[INFO] Files written under {}; systemd was not touched.",
            prefix
                .map(Path::display)
                .map(|d| d.to_string())
                .unwrap_or_default()
        );
        return Ok(());
    }
    if !systemd_available(plan.rootful) {
        let which = if plan.rootful {
            "systemd"
        } else {
            "systemd (systemctl --user)"
        };
        eprintln!("[WARNING] {which} is not available: the unit files were written but nothing was started.");
        if options.start {
            return start_detached(plan);
        }
        eprintln!("[INFO] Start the daemon yourself with:\n{manual}");
        eprintln!("[INFO] (or re-run with --start to start it in the background)");
        return Ok(());
    }
    if changed {
        systemctl_checked(plan.rootful, &["daemon-reload"])?;
    }
    let unit = plan.start_unit.as_str();
    let active =
        systemctl(plan.rootful, &["is-active", "--quiet", unit]).is_ok_and(|o| o.status.success());
    if active && changed {
        systemctl_checked(plan.rootful, &["restart", &plan.units[0]])?;
    } else if !active {
        if let Err(e) = systemctl_checked(plan.rootful, &["start", unit]) {
            let user = if plan.rootful { "" } else { "--user " };
            return Err(e.context(format!(
                "failed to start {unit}, see: journalctl -n 20 --no-pager {user}--unit {}",
                plan.units[0]
            )));
        }
    }
    systemctl_checked(plan.rootful, &["enable", unit])?;
    let user = if plan.rootful { "" } else { "--user " };
    eprintln!("[INFO] Installed \"{unit}\" successfully.");
    eprintln!("[INFO] To control \"{unit}\", run: systemctl {user}(start|stop|restart) {unit}");
    eprintln!("[INFO] {} listens on {}", plan.daemon, plan.address);
    Ok(())
}

/// The pid file of a daemon `--start`ed without systemd: `<data dir>.pid`,
/// holding `<pid> <start time>` (field 22 of `/proc/<pid>/stat`), so that
/// uninstall stops that process and never one that reused its pid.
fn pid_file(plan: &Plan) -> PathBuf {
    plan.data_dir.with_extension("pid")
}

/// The start time of process `pid` in clock ticks since boot.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Without systemd: stops the daemon `--start` started, if it still runs
/// (SIGTERM, then SIGKILL after 20 s), and removes its pid file.
fn stop_detached(plan: &Plan) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let path = pid_file(plan);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    if let (Some(Ok(pid)), Some(Ok(started))) = (fields.next(), fields.next()) {
        let pid = u32::try_from(pid).context("bad pid file")?;
        if process_start_time(pid) == Some(started) {
            let target = Pid::from_raw(pid as i32);
            kill(target, Signal::SIGTERM)
                .with_context(|| format!("failed to stop {} (pid {pid})", plan.daemon))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while process_start_time(pid) == Some(started) {
                if std::time::Instant::now() > deadline {
                    let _ = kill(target, Signal::SIGKILL);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            eprintln!("[INFO] Stopped {} (pid {pid})", plan.daemon);
        }
    }
    std::fs::remove_file(&path).with_context(|| format!("failed to remove {}", path.display()))
}

/// Without systemd: runs the daemon command in the background, its log in
/// `<data dir>.log`, its pid in `<data dir>.pid`, and waits for its socket.
fn start_detached(plan: &Plan) -> anyhow::Result<()> {
    // A daemon this command started before is replaced (its command may have changed).
    stop_detached(plan)?;
    let log_path = plan.data_dir.with_extension("log");
    if let Some(parent) = log_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;
    let mut command = Command::new(&plan.manual_command[0]);
    command
        .args(&plan.manual_command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // Its own session: the daemon outlives this command and its terminal.
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc_setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to run {}", plan.manual_command[0]))?;
    let started = process_start_time(child.id()).unwrap_or_default();
    let pid_path = pid_file(plan);
    std::fs::write(&pid_path, format!("{} {started}\n", child.id()))
        .with_context(|| format!("failed to write {}", pid_path.display()))?;
    let socket = plan.address.trim_start_matches("unix://");
    for _ in 0..300 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            eprintln!(
                "[INFO] Started {} (pid {}) on {}, log {}",
                plan.daemon,
                child.id(),
                plan.address,
                log_path.display()
            );
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let _ = std::fs::remove_file(&pid_path);
            bail!(
                "{} exited ({status}); see its log {}",
                plan.daemon,
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!(
        "{} did not listen on {} within 30s; see its log {}",
        plan.daemon,
        plan.address,
        log_path.display()
    )
}

fn libc_setsid() {
    let _ = nix::unistd::setsid();
}

/// Stops, disables and removes the plan's units (and the rootful TOML).
pub fn uninstall(plan: &Plan, options: &SetupOptions) -> anyhow::Result<()> {
    let prefix = options.root_prefix.as_deref();
    let systemd = prefix.is_none() && systemd_available(plan.rootful);
    let mut removed = false;
    for file in &plan.files {
        let target = prefixed(prefix, &file.path);
        let name = file
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !target.exists() {
            eprintln!("[INFO] {name} is not installed");
            continue;
        }
        if systemd && plan.units.contains(&name) {
            let _ = systemctl(plan.rootful, &["stop", &name]);
            let _ = systemctl(plan.rootful, &["disable", &name]);
        }
        std::fs::remove_file(&target)
            .with_context(|| format!("failed to remove {}", target.display()))?;
        eprintln!("[INFO] Uninstalled \"{name}\"");
        removed = true;
    }
    if systemd && removed {
        let _ = systemctl(plan.rootful, &["daemon-reload"]);
    }
    if prefix.is_none() {
        stop_detached(plan)?;
    }
    let rm = if plan.rootful {
        format!("rm -rf {}", plan.data_dir.display())
    } else {
        format!("rootlesskit rm -rf {}", plan.data_dir.display())
    };
    eprintln!("[INFO] To remove data, run: {rm}");
    Ok(())
}

/// `kiln setup nsenter -- CMD...` (reference §3.5): joins rootless
/// containerd's mount, user (and, without detached netns, network)
/// namespaces and runs CMD there.
fn nsenter(command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let runtime_dir = std::env::var("XDG_RUNTIME_DIR")
        .context("environment variable XDG_RUNTIME_DIR is not set, see https://rootlesscontaine.rs/getting-started/common/login/")?;
    let state = Path::new(&runtime_dir).join("containerd-rootless");
    let pid_file = state.join("child_pid");
    let pid = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("failed to read {} (is rootless containerd running? install it with `kiln setup install-containerd-rootless`)", pid_file.display()))?;
    let pid = pid.trim().to_string();
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .with_context(|| format!("failed to read the environment of process {pid}"))?;
    let mut nsenter = Command::new("nsenter");
    for entry in environ.split(|b| *b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some((key, value)) = entry.split_once('=') {
            if matches!(
                key,
                "ROOTLESSKIT_STATE_DIR" | "ROOTLESSKIT_PARENT_EUID" | "ROOTLESSKIT_PARENT_EGID"
            ) {
                nsenter.env(key, value);
            }
        }
    }
    let wd = std::env::current_dir().context("failed to read the working directory")?;
    nsenter
        .arg("--no-fork")
        .arg(format!("--wd={}", wd.display()))
        .arg("--preserve-credentials")
        .arg("-m");
    // A detached netns (RootlessKit 2) is not containerd's; with `--net=host`
    // the namespace is the host's, which setns refuses to an unprivileged
    // user and which we are in already.
    let same_netns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
        == std::fs::read_link("/proc/self/ns/net").ok();
    if !state.join("netns").exists() && !same_netns {
        nsenter.arg("-n");
    }
    nsenter.args(["-U", "-t", &pid, "--"]).args(command);
    let err = nsenter.exec();
    Err(err).context("failed to run nsenter")
}

/// The snapshotter the rootless containerd at `socket` could load:
/// `overlayfs` when its plugin initialised (containerd tries an overlay
/// mount in the user namespace at start-up), else `native`.
async fn probe_snapshotter(socket: &Path) -> anyhow::Result<String> {
    let address = socket.display().to_string();
    let containerd = kiln_containerd::Containerd::connect(&address)
        .await
        .with_context(|| format!("rootless containerd is not running at {address}: install it first with `kiln setup install-containerd-rootless` (or set CONTAINERD_SNAPSHOTTER)"))?;
    let plugins = containerd
        .snapshotters()
        .await
        .context("failed to list containerd's snapshotters")?;
    let status = |name: &str| {
        plugins
            .iter()
            .find(|(id, _)| id == name)
            .map(|(_, error)| error.clone())
    };
    match (status("overlayfs"), status("native")) {
        (Some(None), _) => Ok("overlayfs".to_string()),
        (overlay, Some(None)) => {
            let why = overlay.flatten().unwrap_or_else(|| "not built in".to_string());
            eprintln!("[INFO] containerd's overlayfs snapshotter is unavailable ({why}): using native");
            Ok("native".to_string())
        }
        _ => bail!("rootless containerd at {address} has neither the overlayfs nor the native snapshotter loaded; set CONTAINERD_SNAPSHOTTER"),
    }
}

/// Runs `kiln setup ...`.
pub async fn run(args: &SetupArgs) -> anyhow::Result<()> {
    let (worker, options, install_it) = match &args.command {
        SetupCommand::Nsenter { command } => return nsenter(command),
        SetupCommand::ContainerdRootlessChild { command } => {
            return containerd::child(&SetupEnv::from_process()?, command)
        }
        SetupCommand::InstallContainerdRootless(o)
        | SetupCommand::UninstallContainerdRootless(o) => {
            let env = SetupEnv::from_process()?;
            let plan = containerd::plan(&env, o.net)?;
            let options = o.setup_options();
            if matches!(args.command, SetupCommand::UninstallContainerdRootless(_)) {
                return uninstall(&plan, &options);
            }
            containerd::check_config_is_ours(&plan)?;
            install(&plan, &options)?;
            if let Some(runtime_dir) = &env.runtime_dir {
                let socket = containerd::socket(runtime_dir);
                if socket.exists() {
                    let chosen = probe_snapshotter(&socket).await?;
                    eprintln!("[INFO] Snapshotter: {chosen} (install-buildkit-containerd uses it unless CONTAINERD_SNAPSHOTTER is set)");
                }
            }
            return Ok(());
        }
        SetupCommand::InstallBuildkit(o) => (Worker::Oci, o, true),
        SetupCommand::InstallBuildkitContainerd(o) => (Worker::Containerd, o, true),
        SetupCommand::UninstallBuildkit(o) => (Worker::Oci, o, false),
        SetupCommand::UninstallBuildkitContainerd(o) => (Worker::Containerd, o, false),
    };
    let mut env = SetupEnv::from_process()?;
    if install_it && worker == Worker::Containerd && !options.rootful && env.snapshotter.is_none() {
        check_user(options, &env)?;
        let runtime_dir = require(&env.runtime_dir, "XDG_RUNTIME_DIR")?;
        let chosen = probe_snapshotter(&containerd::socket(runtime_dir)).await?;
        eprintln!("[INFO] Using containerd's {chosen} snapshotter");
        env.snapshotter = Some(chosen);
    }
    let plan = plan_for(worker, options, &env)?;
    if install_it {
        install(&plan, options)
    } else {
        uninstall(&plan, options)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn env(namespace: Option<&str>) -> SetupEnv {
        SetupEnv {
            euid: 1000,
            home: Some("/home/u".into()),
            runtime_dir: Some("/run/user/1000".into()),
            data_home: Some("/home/u/.local/share".into()),
            config_home: Some("/home/u/.config".into()),
            namespace: namespace.map(str::to_string),
            snapshotter: None,
            path: "/usr/bin:/bin".into(),
            kilnd: "/opt/kiln/bin/kilnd".into(),
            kiln: "/opt/kiln/bin/kiln".into(),
            rootlesskit: Some("/usr/bin/rootlesskit".into()),
            containerd: None,
            slirp4netns: None,
        }
    }

    #[test]
    fn rootless_oci_unit_is_the_reference_template() {
        let plan = rootless_plan(Worker::Oci, &env(None)).unwrap();
        assert_eq!(plan.units, vec!["buildkit.service"]);
        assert_eq!(
            plan.files[0].path,
            PathBuf::from("/home/u/.config/systemd/user/buildkit.service")
        );
        assert_eq!(
            plan.files[0].content,
            "[Unit]\n\
             Description=BuildKit (Rootless)\n\
             \n\
             [Service]\n\
             Environment=PATH=/opt/kiln/bin:/sbin:/usr/sbin:/usr/bin:/bin\n\
             ExecStart=/usr/bin/rootlesskit --net=host --copy-up=/etc --copy-up=/run --state-dir=/run/user/1000/kilnd-rootlesskit /opt/kiln/bin/kilnd --oci-worker=true --containerd-worker=false --addr=unix:///run/user/1000/buildkit/buildkitd.sock --root=/home/u/.local/share/buildkit\n\
             ExecReload=/bin/kill -s HUP $MAINPID\n\
             RestartSec=2\n\
             Restart=always\n\
             Type=simple\n\
             KillMode=mixed\n\
             \n\
             [Install]\n\
             WantedBy=default.target\n"
        );
        assert_eq!(
            plan.address,
            "unix:///run/user/1000/buildkit/buildkitd.sock"
        );
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn rootless_containerd_per_namespace() {
        let mut e = env(Some("test"));
        e.snapshotter = Some("native".into());
        let plan = rootless_plan(Worker::Containerd, &e).unwrap();
        assert_eq!(plan.units, vec!["test-buildkit.service"]);
        assert_eq!(
            plan.address,
            "unix:///run/user/1000/buildkit-test/buildkitd.sock"
        );
        assert_eq!(
            plan.data_dir,
            PathBuf::from("/home/u/.local/share/buildkit-test")
        );
        let text = &plan.files[0].content;
        assert!(text.contains("\nPartOf=containerd.service\n"), "{text}");
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        assert_eq!(
            exec,
            "/opt/kiln/bin/kiln setup nsenter -- /opt/kiln/bin/kilnd --oci-worker=false --containerd-worker=true --containerd-worker-rootless=true --containerd-worker-namespace=test --containerd-worker-snapshotter=native --addr=unix:///run/user/1000/buildkit-test/buildkitd.sock --root=/home/u/.local/share/buildkit-test"
        );
        assert!(plan.warnings.is_empty());

        let plan = rootless_plan(Worker::Containerd, &env(None)).unwrap();
        assert_eq!(plan.units, vec!["buildkit.service"]);
        assert_eq!(plan.warnings, vec![NAMESPACE_WARNING.to_string()]);
        assert!(plan.files[0]
            .content
            .contains("--containerd-worker-namespace=buildkit "));
    }

    #[test]
    fn rootless_needs_xdg_runtime_dir_and_a_non_root_user() {
        let mut e = env(None);
        e.runtime_dir = None;
        let err = rootless_plan(Worker::Oci, &e).unwrap_err().to_string();
        assert!(err.contains("XDG_RUNTIME_DIR is not set"), "{err}");
        let mut e = env(None);
        e.euid = 0;
        let err = plan_for(Worker::Oci, &SetupOptions::default(), &e)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Refusing to install rootless kilnd as the root user"));
        e.rootlesskit = None;
        e.euid = 1000;
        let err = rootless_plan(Worker::Oci, &e).unwrap_err().to_string();
        assert!(err.contains("rootlesskit"), "{err}");
    }

    #[test]
    fn rootful_units_and_toml() {
        let plan = rootful_plan(Worker::Containerd, &env(None));
        assert_eq!(plan.units, vec!["kilnd.service", "kilnd.socket"]);
        let paths: Vec<_> = plan.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/etc/systemd/system/kilnd.service"),
                PathBuf::from("/etc/systemd/system/kilnd.socket"),
                PathBuf::from("/etc/buildkit/buildkitd.toml"),
            ]
        );
        let service = &plan.files[0].content;
        for line in [
            "Requires=kilnd.socket",
            "After=kilnd.socket network.target local-fs.target",
            "Type=notify",
            "ExecStartPre=-/sbin/modprobe overlay",
            "ExecStart=/opt/kiln/bin/kilnd --addr fd:// --root /var/lib/buildkit --config /etc/buildkit/buildkitd.toml",
            "Delegate=yes",
            "KillMode=process",
            "Restart=always",
            "RestartSec=5",
            "LimitNPROC=infinity",
            "LimitCORE=infinity",
            "LimitNOFILE=infinity",
            "TasksMax=infinity",
            "OOMScoreAdjust=-999",
            "WantedBy=multi-user.target",
        ] {
            assert!(service.lines().any(|l| l == line), "{line}\n{service}");
        }
        let socket = &plan.files[1].content;
        for line in [
            "ListenStream=/run/buildkit/buildkitd.sock",
            "SocketMode=0660",
            "WantedBy=sockets.target",
        ] {
            assert!(socket.lines().any(|l| l == line), "{line}\n{socket}");
        }
        assert!(plan.files[2]
            .content
            .contains("[worker.oci]\nenabled = false\n\n[worker.containerd]\nenabled = true\n"));
        assert!(plan.files[2].content.contains("namespace = \"default\"\n"));
        assert_eq!(
            command_line(&plan.manual_command),
            "/opt/kiln/bin/kilnd --addr unix:///run/buildkit/buildkitd.sock --root /var/lib/buildkit --config /etc/buildkit/buildkitd.toml"
        );

        let plan = rootful_plan(Worker::Containerd, &env(Some("k8s.io")));
        assert_eq!(
            plan.units,
            vec!["kilnd-k8s.io.service", "kilnd-k8s.io.socket"]
        );
        assert_eq!(plan.address, "unix:///run/buildkit-k8s.io/buildkitd.sock");
        assert_eq!(
            plan.files[2].path,
            PathBuf::from("/etc/buildkit/buildkitd-k8s.io.toml")
        );
        let plan = rootful_plan(Worker::Oci, &env(Some("k8s.io")));
        assert_eq!(plan.files.len(), 2);
        assert!(plan.files[0]
            .content
            .contains("--oci-worker=true --containerd-worker=false\n"));
    }
}
