//! `kiln setup install-containerd-rootless`: containerd run by an unprivileged user under
//! RootlessKit, for Debian-like systems that ship `containerd` and `rootlesskit` but not
//! nerdctl's `containerd-rootless.sh` / `containerd-rootless-setuptool.sh`.
//!
//! The layout is the one those scripts make, so the rest of the rootless tooling (`kiln setup
//! nsenter`, `install-buildkit-containerd`, nerdctl) finds it:
//!
//! - RootlessKit's state dir `$XDG_RUNTIME_DIR/containerd-rootless` (its `child_pid` is what
//!   `nsenter` joins);
//! - inside the namespaces `$XDG_RUNTIME_DIR/containerd` is bind-mounted on `/run/containerd`,
//!   `$XDG_DATA_HOME/containerd` on `/var/lib/containerd`, `$XDG_DATA_HOME/cni` on
//!   `/var/lib/cni`, `$XDG_CONFIG_HOME/containerd` on `/etc/containerd` (what the script's
//!   child half does; here `kiln setup containerd-rootless-child`, then `exec containerd`);
//! - the socket `$XDG_RUNTIME_DIR/containerd/containerd.sock`, reachable from outside too.
//!
//! Unlike the script, a `config.toml` is written (`$XDG_CONFIG_HOME/containerd/config.toml`)
//! naming those paths as the host sees them, so snapshot mount sources containerd hands out
//! are valid in both mount namespaces, and with the CRI plugin off (it needs cgroup and CNI
//! set-up a rootless user lacks, and kiln does not use it).
//!
//! Network: `--net=host` by default. RootlessKit 1.x has no `--detach-netns`, so with
//! slirp4netns everything joining containerd's namespaces (kilnd, hence every pull and every
//! `RUN`) would sit behind slirp4netns and lose the host's loopback, where local registries
//! live. `--net=slirp4netns` gives the script's isolated network instead.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

use super::{command_line, require, Plan, PlannedFile, SetupEnv, SetupOptions};

/// The first line of the `config.toml` kiln writes; a file without it is the user's own and
/// is never overwritten.
pub const CONFIG_HEADER: &str = "# Written by `kiln setup install-containerd-rootless`.";

/// RootlessKit's network for rootless containerd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Net {
    /// The host's network namespace (default: local registries stay reachable).
    #[default]
    Host,
    /// A network namespace of its own behind slirp4netns, as containerd-rootless.sh.
    Slirp4netns,
}

/// Options of `install-containerd-rootless` / `uninstall-containerd-rootless`.
#[derive(Debug, Clone, Default, Args)]
pub struct ContainerdRootlessOptions {
    /// Without systemd: start containerd in the background instead of only printing its
    /// command.
    #[arg(long)]
    pub start: bool,
    /// RootlessKit network: host, or slirp4netns (must be installed).
    #[arg(long, value_enum, default_value_t = Net::Host)]
    pub net: Net,
}

impl ContainerdRootlessOptions {
    /// The generic install options (no `--rootful`: rootless only).
    pub fn setup_options(&self) -> SetupOptions {
        SetupOptions {
            start: self.start,
            ..SetupOptions::default()
        }
    }
}

/// The socket of rootless containerd as the host sees it.
pub fn socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("containerd/containerd.sock")
}

/// The install plan: the user unit `containerd.service` and containerd's `config.toml`.
pub fn plan(env: &SetupEnv, net: Net) -> anyhow::Result<Plan> {
    if env.euid == 0 {
        bail!("Refusing to install rootless containerd as the root user");
    }
    require(&env.home, "HOME")?;
    let runtime_dir = require(&env.runtime_dir, "XDG_RUNTIME_DIR")?;
    let data_home = require(&env.data_home, "HOME")?;
    let config_home = require(&env.config_home, "HOME")?;
    let rootlesskit = env.rootlesskit.as_ref().context(
        "rootlesskit (https://github.com/rootless-containers/rootlesskit) needs to be present under $PATH (Debian: apt install rootlesskit uidmap)",
    )?;
    let containerd = env
        .containerd
        .as_ref()
        .context("containerd needs to be present under $PATH (Debian: apt install containerd)")?;
    let root = data_home.join("containerd");
    let state = runtime_dir.join("containerd");
    let socket = socket(runtime_dir);
    let config = config_home.join("containerd/config.toml");
    let config_text = format!(
        "{CONFIG_HEADER}\n\
         # Paths as the host sees them; inside RootlessKit's namespaces they are also mounted\n\
         # on /var/lib/containerd, /run/containerd and /etc/containerd.\n\
         version = 2\n\
         root = \"{root}\"\n\
         state = \"{state}\"\n\
         # CRI needs cgroup and CNI set-up a rootless user does not have; kiln does not use it.\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         \n\
         [grpc]\n\
         \x20 address = \"{socket}\"\n",
        root = root.display(),
        state = state.display(),
        socket = socket.display(),
    );
    let mut argv = vec![
        rootlesskit.display().to_string(),
        format!("--state-dir={}/containerd-rootless", runtime_dir.display()),
    ];
    match net {
        Net::Host => argv.push("--net=host".to_string()),
        Net::Slirp4netns => {
            if env.slirp4netns.is_none() {
                bail!("--net=slirp4netns needs slirp4netns under $PATH (Debian: apt install slirp4netns)");
            }
            argv.extend(
                [
                    "--net=slirp4netns",
                    "--mtu=65520",
                    "--slirp4netns-sandbox=auto",
                    "--slirp4netns-seccomp=auto",
                    "--disable-host-loopback",
                    "--port-driver=builtin",
                ]
                .map(str::to_string),
            );
        }
    }
    // /etc against a resolv.conf recreated on the host; /run and /var/lib so that
    // /run/containerd and /var/lib/containerd can be made in the namespace.
    argv.extend(
        [
            "--copy-up=/etc",
            "--copy-up=/run",
            "--copy-up=/var/lib",
            "--propagation=rslave",
        ]
        .map(str::to_string),
    );
    argv.extend([
        env.kiln.display().to_string(),
        "setup".to_string(),
        "containerd-rootless-child".to_string(),
        "--".to_string(),
        containerd.display().to_string(),
        format!("--config={}", config.display()),
    ]);
    let bin_dir = env
        .kiln
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let unit = "containerd.service".to_string();
    let unit_text = format!(
        "[Unit]\n\
         Description=containerd (Rootless, set up by kiln)\n\
         \n\
         [Service]\n\
         Environment=PATH={bin_dir}:/sbin:/usr/sbin:{path}\n\
         ExecStart={exec}\n\
         ExecReload=/bin/kill -s HUP $MAINPID\n\
         TimeoutSec=0\n\
         RestartSec=2\n\
         Restart=always\n\
         StartLimitBurst=3\n\
         StartLimitInterval=60s\n\
         LimitNOFILE=infinity\n\
         LimitNPROC=infinity\n\
         LimitCORE=infinity\n\
         TasksMax=infinity\n\
         Delegate=yes\n\
         Type=simple\n\
         KillMode=mixed\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        path = env.path,
        exec = command_line(&argv),
    );
    Ok(Plan {
        daemon: "containerd",
        rootful: false,
        start_unit: unit.clone(),
        units: vec![unit.clone()],
        files: vec![
            PlannedFile {
                path: config_home.join("systemd/user").join(&unit),
                content: unit_text,
            },
            PlannedFile {
                path: config,
                content: config_text,
            },
        ],
        warnings: Vec::new(),
        manual_command: argv,
        address: format!("unix://{}", socket.display()),
        data_dir: root,
    })
}

/// Refuses to overwrite a `config.toml` that kiln did not write.
pub fn check_config_is_ours(plan: &Plan) -> anyhow::Result<()> {
    for file in &plan.files {
        if !file.content.starts_with(CONFIG_HEADER) {
            continue;
        }
        if let Ok(existing) = std::fs::read_to_string(&file.path) {
            if !existing.starts_with(CONFIG_HEADER) {
                bail!(
                    "{} exists and was not written by kiln: move it away (kiln writes its own containerd config there) and run this again",
                    file.path.display()
                );
            }
        }
    }
    Ok(())
}

/// The bind mounts the child makes: (source as the host sees it, conventional path).
fn child_mounts(env: &SetupEnv) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    let runtime_dir = require(&env.runtime_dir, "XDG_RUNTIME_DIR")?;
    let data_home = require(&env.data_home, "HOME")?;
    let config_home = require(&env.config_home, "HOME")?;
    Ok(vec![
        (runtime_dir.join("containerd"), "/run/containerd"),
        (data_home.join("containerd"), "/var/lib/containerd"),
        (data_home.join("cni"), "/var/lib/cni"),
        (config_home.join("containerd"), "/etc/containerd"),
    ])
}

/// `kiln setup containerd-rootless-child -- containerd ...`: RootlessKit's child. Makes the
/// conventional paths point at the user's directories (bind mounts in the namespace's own
/// mount table; RootlessKit's copy-up left symlinks to the host's entries there), then
/// becomes `command`.
pub fn child(env: &SetupEnv, command: &[String]) -> anyhow::Result<()> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os("ROOTLESSKIT_STATE_DIR").is_none() {
        bail!("containerd-rootless-child runs as RootlessKit's child only (the containerd.service unit written by `kiln setup install-containerd-rootless` starts it)");
    }
    for (source, target) in child_mounts(env)? {
        let target = Path::new(target);
        // A copied-up entry is a symlink to the host's: replace it by a directory of ours.
        if std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(target)
                .with_context(|| format!("failed to remove {}", target.display()))?;
        }
        for dir in [&source, &target.to_path_buf()] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
        }
        mount(
            Some(&source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "failed to bind-mount {} on {}",
                source.display(),
                target.display()
            )
        })?;
    }
    let err = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    Err(err).with_context(|| format!("failed to run {}", command[0]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::tests::env;

    #[test]
    fn unit_and_config_follow_the_rootless_layout() {
        let mut e = env(None);
        e.containerd = Some("/usr/bin/containerd".into());
        let plan = super::plan(&e, Net::Host).unwrap();
        assert_eq!(plan.units, vec!["containerd.service"]);
        assert_eq!(
            plan.address,
            "unix:///run/user/1000/containerd/containerd.sock"
        );
        assert_eq!(
            plan.files[0].path,
            PathBuf::from("/home/u/.config/systemd/user/containerd.service")
        );
        let exec = plan.files[0]
            .content
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        assert_eq!(
            exec,
            "/usr/bin/rootlesskit --state-dir=/run/user/1000/containerd-rootless --net=host --copy-up=/etc --copy-up=/run --copy-up=/var/lib --propagation=rslave /opt/kiln/bin/kiln setup containerd-rootless-child -- /usr/bin/containerd --config=/home/u/.config/containerd/config.toml"
        );
        assert_eq!(
            plan.files[1].path,
            PathBuf::from("/home/u/.config/containerd/config.toml")
        );
        let config = &plan.files[1].content;
        assert!(config.starts_with(CONFIG_HEADER), "{config}");
        let parsed: toml::Table = toml::from_str(config).unwrap();
        assert_eq!(parsed["version"].as_integer(), Some(2));
        assert_eq!(
            parsed["root"].as_str(),
            Some("/home/u/.local/share/containerd")
        );
        assert_eq!(parsed["state"].as_str(), Some("/run/user/1000/containerd"));
        assert_eq!(
            parsed["grpc"]["address"].as_str(),
            Some("/run/user/1000/containerd/containerd.sock")
        );
        assert_eq!(
            parsed["disabled_plugins"].as_array().unwrap()[0].as_str(),
            Some("io.containerd.grpc.v1.cri")
        );

        let err = plan_err(&e, Net::Slirp4netns);
        assert!(err.contains("slirp4netns under $PATH"), "{err}");
        e.slirp4netns = Some("/usr/bin/slirp4netns".into());
        let slirp = super::plan(&e, Net::Slirp4netns).unwrap();
        assert!(command_line(&slirp.manual_command).contains(" --net=slirp4netns --mtu=65520 "));

        e.containerd = None;
        assert!(plan_err(&e, Net::Host).contains("containerd needs to be present"));
        e.euid = 0;
        assert!(plan_err(&e, Net::Host).starts_with("Refusing to install rootless containerd"));
    }

    fn plan_err(e: &SetupEnv, net: Net) -> String {
        super::plan(e, net).unwrap_err().to_string()
    }
}
