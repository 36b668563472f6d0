//! `buildkitd.toml` and buildkitd's flags (reference §4.2–4.3), resolved
//! into one [`Config`]: the file first, then every flag that was given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Deserialize;

use crate::tuning::WorkerTuning;

/// The daemon's flags, named as buildkitd's.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kilnd",
    version,
    about = "kiln's build daemon, speaking BuildKit's API"
)]
pub struct Flags {
    /// Path to the TOML configuration (default /etc/buildkit/buildkitd.toml; rootless
    /// `$XDG_CONFIG_HOME/buildkit/buildkitd.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Enable debug output in logs.
    #[arg(long)]
    pub debug: bool,
    /// Path to state directory.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Listening address (unix://, tcp:// or fd://), repeatable.
    #[arg(long = "addr")]
    pub addr: Vec<String>,
    /// Log formatter: json or text.
    #[arg(long = "log-format")]
    pub log_format: Option<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long = "log-level", env = "BUILDKITD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Group (name or gid) owning the unix sockets.
    #[arg(long)]
    pub group: Option<String>,
    /// Enable the OCI worker (true, false or auto).
    #[arg(long = "oci-worker")]
    pub oci_worker: Option<String>,
    /// Path to the runc binary of the OCI worker.
    #[arg(long = "oci-worker-binary")]
    pub oci_worker_binary: Option<PathBuf>,
    /// Snapshotter of the OCI worker (auto, overlayfs or native).
    #[arg(long = "oci-worker-snapshotter")]
    pub oci_worker_snapshotter: Option<String>,
    /// Run the OCI worker's containers rootless (default: true in a user namespace).
    #[arg(long = "oci-worker-rootless", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub oci_worker_rootless: Option<bool>,
    /// Extra worker labels (key=value), repeatable.
    #[arg(long = "oci-worker-labels")]
    pub oci_worker_labels: Vec<String>,
    /// kiln's extension: let the OCI worker read base images (read-only) from this containerd
    /// namespace when the registry cannot resolve them (containerd at
    /// /run/containerd/containerd.sock unless `[worker.oci] containerd-images` names another).
    #[arg(long = "oci-worker-containerd-images")]
    pub oci_worker_containerd_images: Option<String>,
    /// Enable the containerd worker (true, false or auto).
    #[arg(long = "containerd-worker")]
    pub containerd_worker: Option<String>,
    /// containerd socket of the containerd worker.
    #[arg(long = "containerd-worker-addr")]
    pub containerd_worker_addr: Option<String>,
    /// containerd namespace of the containerd worker (default buildkit).
    #[arg(long = "containerd-worker-namespace")]
    pub containerd_worker_namespace: Option<String>,
    /// containerd snapshotter of the containerd worker (default overlayfs).
    #[arg(long = "containerd-worker-snapshotter")]
    pub containerd_worker_snapshotter: Option<String>,
    /// Run the containerd worker's containers rootless (default: true in a user namespace,
    /// i.e. kilnd inside rootless containerd's namespaces).
    #[arg(long = "containerd-worker-rootless", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub containerd_worker_rootless: Option<bool>,
    /// Extra containerd worker labels (key=value), repeatable.
    #[arg(long = "containerd-worker-labels")]
    pub containerd_worker_labels: Vec<String>,
    /// Allow an insecure entitlement (security.insecure, network.host), repeatable.
    #[arg(long = "allow-insecure-entitlement")]
    pub allow_insecure_entitlement: Vec<String>,
    /// Debug HTTP address (`host:port`; off by default): serves `/debug/health`,
    /// `/debug/vars` and `/metrics`.
    #[arg(long = "debugaddr", env = "BUILDKITD_DEBUGADDR")]
    pub debugaddr: Option<String>,
    /// Certificate (PEM) the tcp:// listeners serve TLS with.
    #[arg(long = "tlscert")]
    pub tlscert: Option<PathBuf>,
    /// Private key (PEM) of --tlscert.
    #[arg(long = "tlskey")]
    pub tlskey: Option<PathBuf>,
    /// CA certificate (PEM): when given, clients must present a certificate it signed.
    #[arg(long = "tlscacert")]
    pub tlscacert: Option<PathBuf>,
}

/// `[registry."host"]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RegistryConfig {
    /// Plain HTTP.
    pub http: bool,
    /// Skip TLS verification.
    pub insecure: bool,
    /// Pull mirrors (`host[:port]`), tried in order before the host.
    pub mirrors: Vec<String>,
    /// Extra CA certificate files (PEM) trusted for TLS to this host.
    pub ca: Vec<PathBuf>,
    /// Client certificates (`[[registry."host".keypair]]`): refused at start, not supported yet.
    pub keypair: Vec<toml::Value>,
}

/// `[worker.oci]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct OciWorkerConfig {
    /// Enabled (unset = auto).
    pub enabled: Option<bool>,
    /// runc binary.
    pub binary: Option<PathBuf>,
    /// Snapshotter.
    pub snapshotter: Option<String>,
    /// Rootless containers (unset = true in a user namespace).
    pub rootless: Option<bool>,
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
    /// Platforms (`linux/amd64`).
    pub platforms: Vec<String>,
    /// kiln's extension, `containerd-images = { address = "…", namespace = "…" }`: a
    /// containerd namespace the OCI worker reads base images from (read-only) when the
    /// registry cannot resolve them.
    #[serde(rename = "containerd-images")]
    pub containerd_images: Option<ContainerdImagesConfig>,
    /// Garbage collection of the build cache (default on).
    pub gc: Option<bool>,
    /// `max-parallelism` and the garbage-collection limits and policies.
    #[serde(flatten)]
    pub tuning: WorkerTuning,
}

/// `[worker.oci] containerd-images` (kiln's extension).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerdImagesConfig {
    /// containerd socket (default /run/containerd/containerd.sock).
    pub address: Option<String>,
    /// The namespace holding the images (required).
    pub namespace: String,
}

/// `[worker.containerd]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ContainerdWorkerConfig {
    /// Enabled (unset = auto).
    pub enabled: Option<bool>,
    /// containerd socket.
    pub address: Option<String>,
    /// containerd namespace.
    pub namespace: Option<String>,
    /// containerd snapshotter.
    pub snapshotter: Option<String>,
    /// Rootless containers (unset = true in a user namespace).
    pub rootless: Option<bool>,
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
    /// Platforms (`linux/amd64`).
    pub platforms: Vec<String>,
    /// Garbage collection of the build cache (default on).
    pub gc: Option<bool>,
    /// `max-parallelism` and the garbage-collection limits and policies.
    #[serde(flatten)]
    pub tuning: WorkerTuning,
}

/// Default containerd socket of the containerd worker.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Default containerd namespace of the containerd worker (not `default`!).
pub const DEFAULT_CONTAINERD_NAMESPACE: &str = "buildkit";
/// Default snapshotter of the containerd worker.
pub const DEFAULT_CONTAINERD_SNAPSHOTTER: &str = "overlayfs";

/// `[worker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct WorkersConfig {
    /// The OCI worker.
    pub oci: OciWorkerConfig,
    /// The containerd worker.
    pub containerd: ContainerdWorkerConfig,
}

/// `[grpc]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GrpcConfig {
    /// Listen addresses.
    pub address: Vec<String>,
    /// Socket group id.
    pub gid: Option<u32>,
    /// `debugAddress`: the debug HTTP listener.
    #[serde(rename = "debugAddress")]
    pub debug_address: Option<String>,
    /// `[grpc.tls]`.
    pub tls: GrpcTlsConfig,
}

/// `[grpc.tls]`: the tcp:// listeners' TLS files.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GrpcTlsConfig {
    /// Server certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Server key (PEM).
    pub key: Option<PathBuf>,
    /// CA of the client certificates (PEM); set = mutual TLS.
    pub ca: Option<PathBuf>,
}

/// TLS of the tcp:// listeners, resolved from the flags and `[grpc.tls]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
    /// CA that must have signed client certificates (mutual TLS), if any.
    pub ca: Option<PathBuf>,
}

/// `[log]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: Option<String>,
    /// Level.
    pub level: Option<String>,
}

/// The TOML file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    /// State directory.
    pub root: Option<PathBuf>,
    /// Debug logging.
    pub debug: bool,
    /// `insecure-entitlements`.
    #[serde(rename = "insecure-entitlements")]
    pub insecure_entitlements: Vec<String>,
    /// `[grpc]`.
    pub grpc: GrpcConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[registry."host"]`.
    pub registry: BTreeMap<String, RegistryConfig>,
    /// `[worker]`.
    pub worker: WorkersConfig,
}

/// Everything the daemon runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Whether the rootless defaults (reference §2.3) applied.
    pub rootless: bool,
    /// The rootless default socket's directory (`$XDG_RUNTIME_DIR/buildkit`) when it is
    /// listened on: made `0700` and sticky, as buildkitd does.
    pub rootless_socket_dir: Option<PathBuf>,
    /// State directory.
    pub root: PathBuf,
    /// Listen addresses.
    pub addresses: Vec<String>,
    /// Log level filter.
    pub log_level: String,
    /// `json` or `text`.
    pub log_format: String,
    /// Socket group.
    pub group: Option<u32>,
    /// TLS of the tcp:// listeners (none = plaintext).
    pub tls: Option<TlsFiles>,
    /// The debug HTTP listener (`host:port`), off when `None`.
    pub debug_address: Option<String>,
    /// Insecure entitlements builds may ask for.
    pub entitlements: Vec<String>,
    /// Registry host settings.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// OCI worker settings.
    pub oci: OciWorkerConfig,
    /// containerd worker settings (address, namespace and snapshotter
    /// always filled in).
    pub containerd: ContainerdWorkerConfig,
}

/// Default config file path (rootful).
pub const DEFAULT_CONFIG: &str = "/etc/buildkit/buildkitd.toml";
/// Default state directory (rootful).
pub const DEFAULT_ROOT: &str = "/var/lib/buildkit";
/// Default listen address (rootful).
pub const DEFAULT_ADDRESS: &str = "unix:///run/buildkit/buildkitd.sock";

fn parse_tristate(flag: &str, value: &str) -> anyhow::Result<Option<bool>> {
    match value {
        "true" | "1" => Ok(Some(true)),
        "false" | "0" => Ok(Some(false)),
        "auto" | "" => Ok(None),
        other => bail!("invalid value {other:?} for --{flag}: expected true, false or auto"),
    }
}

fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").context("failed to read /etc/group")?;
    for line in groups.lines() {
        let mut fields = line.split(':');
        if fields.next() == Some(group) {
            if let Some(gid) = fields.nth(1).and_then(|g| g.parse().ok()) {
                return Ok(gid);
            }
        }
    }
    bail!("group {group:?} not found")
}

/// What kilnd uses without flags or file settings: buildkitd's rootful paths, or for a
/// rootless daemon the XDG ones (reference §2.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// The rootless defaults apply.
    pub rootless: bool,
    /// This process runs in a non-initial user namespace (the OCI worker's rootless default).
    pub in_user_namespace: bool,
    /// The config file.
    pub config: PathBuf,
    /// The state directory.
    pub root: PathBuf,
    /// The listen address.
    pub address: String,
}

impl Defaults {
    /// buildkitd's rootful defaults.
    pub fn rootful() -> Self {
        Self {
            rootless: false,
            in_user_namespace: false,
            config: PathBuf::from(DEFAULT_CONFIG),
            root: PathBuf::from(DEFAULT_ROOT),
            address: DEFAULT_ADDRESS.to_string(),
        }
    }

    /// The defaults of this process, from its user namespace, euid and environment.
    pub fn detect() -> Self {
        Self::from_env(
            kiln_worker_oci::userns::running_in_user_namespace(),
            nix::unistd::geteuid().as_raw(),
            |name| std::env::var(name).ok().filter(|v| !v.is_empty()),
        )
    }

    /// The defaults for a process in (or not in) a user namespace with `euid` and the
    /// environment `env`. Rootless, as BuildKit decides it: not root, or a RootlessKit child
    /// (`ROOTLESSKIT_STATE_DIR`), or in a user namespace with `$USER` set and not `root`.
    pub fn from_env(in_userns: bool, euid: u32, env: impl Fn(&str) -> Option<String>) -> Self {
        let user = env("USER");
        let rootless = euid != 0
            || env("ROOTLESSKIT_STATE_DIR").is_some()
            || (in_userns && user.as_deref().is_some_and(|u| u != "root"));
        let mut defaults = Self::rootful();
        defaults.in_user_namespace = in_userns;
        if !rootless {
            return defaults;
        }
        defaults.rootless = true;
        // XDG variables may hold a `:`-list; the first element counts.
        let first = |name: &str| {
            env(name).and_then(|v| {
                v.split(':')
                    .next()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
        };
        let home = first("HOME");
        let runtime_dir = first("XDG_RUNTIME_DIR").or_else(|| {
            // RootlessKit's child without XDG_RUNTIME_DIR: the parent's /run/user/<uid>.
            env("ROOTLESSKIT_PARENT_EUID")
                .or_else(|| (euid != 0).then(|| euid.to_string()))
                .map(|uid| PathBuf::from(format!("/run/user/{uid}")))
        });
        if let Some(dir) = runtime_dir {
            defaults.address = format!("unix://{}/buildkit/buildkitd.sock", dir.display());
        }
        if let Some(data) =
            first("XDG_DATA_HOME").or_else(|| home.as_ref().map(|h| h.join(".local/share")))
        {
            defaults.root = data.join("buildkit");
        }
        if let Some(config) =
            first("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")))
        {
            defaults.config = config.join("buildkit/buildkitd.toml");
        }
        defaults
    }
}

impl Config {
    /// Loads the file (the default path may be missing; an explicit one may
    /// not), then applies the flags, over this process' [`Defaults`].
    pub fn load(flags: &Flags) -> anyhow::Result<Self> {
        Self::load_with(flags, &Defaults::detect())
    }

    /// [`Config::load`] over the given defaults.
    pub fn load_with(flags: &Flags, defaults: &Defaults) -> anyhow::Result<Self> {
        let (path, explicit) = match &flags.config {
            Some(p) => (p.clone(), true),
            None => (defaults.config.clone(), false),
        };
        let file = read_file_config(&path, explicit)?;

        let debug_address = flags
            .debugaddr
            .clone()
            .or(file.grpc.debug_address.clone())
            .filter(|a| !a.is_empty());
        let tls = resolve_tls(flags, &file.grpc.tls)?;
        let mut containerd = file.worker.containerd.clone();
        if let Some(v) = &flags.containerd_worker {
            containerd.enabled = parse_tristate("containerd-worker", v)?;
        }
        if let Some(a) = &flags.containerd_worker_addr {
            containerd.address = Some(a.clone());
        }
        if let Some(n) = &flags.containerd_worker_namespace {
            containerd.namespace = Some(n.clone());
        }
        if let Some(s) = &flags.containerd_worker_snapshotter {
            containerd.snapshotter = Some(s.clone());
        }
        for label in &flags.containerd_worker_labels {
            let Some((k, v)) = label.split_once('=') else {
                bail!("invalid worker label {label:?}: expected key=value");
            };
            containerd.labels.insert(k.to_string(), v.to_string());
        }
        containerd
            .address
            .get_or_insert_with(|| DEFAULT_CONTAINERD_ADDRESS.to_string());
        containerd
            .namespace
            .get_or_insert_with(|| DEFAULT_CONTAINERD_NAMESPACE.to_string());
        let snapshotter = containerd
            .snapshotter
            .get_or_insert_with(|| DEFAULT_CONTAINERD_SNAPSHOTTER.to_string());
        if snapshotter.contains('/') || snapshotter.is_empty() {
            bail!("bad snapshotter name {snapshotter:?}");
        }
        if let Some(rootless) = flags.containerd_worker_rootless {
            containerd.rootless = Some(rootless);
        }
        if containerd.rootless == Some(true) && !defaults.in_user_namespace {
            bail!("the rootless containerd worker requires to be executed as the mapped root in a user namespace (rootless containerd's, see `kiln setup nsenter`)");
        }
        containerd
            .rootless
            .get_or_insert(defaults.in_user_namespace);
        let mut oci = file.worker.oci.clone();
        if let Some(v) = &flags.oci_worker {
            oci.enabled = parse_tristate("oci-worker", v)?;
        }
        if let Some(binary) = &flags.oci_worker_binary {
            oci.binary = Some(binary.clone());
        }
        if let Some(s) = &flags.oci_worker_snapshotter {
            oci.snapshotter = Some(s.clone());
        }
        if let Some(s) = &oci.snapshotter {
            if !matches!(s.as_str(), "auto" | "overlayfs" | "native") {
                bail!("snapshotter {s:?} is not supported yet by the OCI worker (auto, overlayfs or native)");
            }
        }
        if let Some(rootless) = flags.oci_worker_rootless {
            oci.rootless = Some(rootless);
        }
        if oci.rootless == Some(true) && !defaults.in_user_namespace {
            bail!("the rootless OCI worker requires to be executed as the mapped root in a user namespace; you may use RootlessKit for setting up the namespace");
        }
        oci.rootless.get_or_insert(defaults.in_user_namespace);
        if let Some(namespace) = &flags.oci_worker_containerd_images {
            oci.containerd_images
                .get_or_insert_with(Default::default)
                .namespace = namespace.clone();
        }
        if let Some(images) = &mut oci.containerd_images {
            if images.namespace.is_empty() {
                bail!("[worker.oci] containerd-images needs a namespace");
            }
            images
                .address
                .get_or_insert_with(|| DEFAULT_CONTAINERD_ADDRESS.to_string());
        }
        for label in &flags.oci_worker_labels {
            let Some((k, v)) = label.split_once('=') else {
                bail!("invalid worker label {label:?}: expected key=value");
            };
            oci.labels.insert(k.to_string(), v.to_string());
        }

        let addresses = if !flags.addr.is_empty() {
            flags.addr.clone()
        } else if !file.grpc.address.is_empty() {
            file.grpc.address.clone()
        } else {
            vec![defaults.address.clone()]
        };
        for address in &addresses {
            if !address.contains("://") {
                bail!("address {address} does not contain proto, you meant unix://{address} ?");
            }
        }
        if addresses.iter().filter(|a| a.starts_with("fd://")).count() > 1 {
            bail!("fd:// may be given once (it is the first socket systemd passes)");
        }
        let log_level = if flags.debug || file.debug {
            "debug".to_string()
        } else {
            let level = flags
                .log_level
                .clone()
                .or(file.log.level.clone())
                .unwrap_or_else(|| "info".to_string());
            // logrus' names, as buildkitd takes them, onto tracing's levels.
            match level.to_ascii_lowercase().as_str() {
                "trace" | "debug" | "info" | "error" => level.to_ascii_lowercase(),
                "warn" | "warning" => "warn".to_string(),
                "fatal" | "panic" => "error".to_string(),
                _ => bail!("invalid log level {level:?}: expected trace, debug, info, warn, error, fatal or panic"),
            }
        };
        let log_format = flags
            .log_format
            .clone()
            .or(file.log.format.clone())
            .unwrap_or_else(|| "text".to_string());
        if log_format != "text" && log_format != "json" {
            bail!("invalid log format {log_format:?}: expected text or json");
        }
        let group = match &flags.group {
            Some(g) => Some(resolve_group(g)?),
            None => file.grpc.gid,
        };
        let mut entitlements = file.insecure_entitlements.clone();
        entitlements.extend(flags.allow_insecure_entitlement.iter().cloned());
        for entitlement in &entitlements {
            if !matches!(
                entitlement.as_str(),
                "security.insecure" | "network.host" | "device"
            ) {
                bail!("invalid entitlement : {entitlement}");
            }
        }
        let rootless_socket_dir = if defaults.rootless && addresses.contains(&defaults.address) {
            defaults
                .address
                .strip_prefix("unix://")
                .and_then(|p| Path::new(p).parent())
                .map(Path::to_path_buf)
        } else {
            None
        };
        Ok(Self {
            rootless: defaults.rootless,
            rootless_socket_dir,
            entitlements,
            root: flags
                .root
                .clone()
                .or(file.root.clone())
                .unwrap_or_else(|| defaults.root.clone()),
            addresses,
            log_level,
            log_format,
            group,
            tls,
            debug_address,
            registries: file.registry.clone(),
            oci,
            containerd,
        })
    }
}

/// Flags over `[grpc.tls]`; a certificate needs its key and the reverse,
/// and a CA alone (client verification without a server identity) is refused.
fn resolve_tls(flags: &Flags, file: &GrpcTlsConfig) -> anyhow::Result<Option<TlsFiles>> {
    let cert = flags.tlscert.clone().or(file.cert.clone());
    let key = flags.tlskey.clone().or(file.key.clone());
    let ca = flags.tlscacert.clone().or(file.ca.clone());
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key, ca })),
        (None, None) if ca.is_none() => Ok(None),
        (None, None) => {
            bail!("--tlscacert needs --tlscert and --tlskey (the server's own certificate)")
        }
        (Some(_), None) => bail!("--tlscert needs --tlskey"),
        (None, Some(_)) => bail!("--tlskey needs --tlscert"),
    }
}

fn read_file_config(path: &Path, explicit: bool) -> anyhow::Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("failed to parse config {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(e).with_context(|| format!("failed to read config {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            r#"
root = "/from/file"
[grpc]
address = ["unix:///file.sock"]
[registry."127.0.0.1:5000"]
http = true
[worker.oci]
labels = { a = "b" }
"#,
        )
        .unwrap();
        let flags = Flags::parse_from([
            "kilnd",
            "--config",
            path.to_str().unwrap(),
            "--root",
            "/from/flag",
            "--oci-worker-labels",
            "c=d",
        ]);
        let config = Config::load(&flags).unwrap();
        assert_eq!(config.root, PathBuf::from("/from/flag"));
        assert_eq!(config.addresses, vec!["unix:///file.sock".to_string()]);
        assert!(config.registries["127.0.0.1:5000"].http);
        assert_eq!(config.oci.labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(config.oci.labels.get("c").map(String::as_str), Some("d"));
    }

    #[test]
    fn tls_from_flags_over_file_and_log_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "[grpc]\ndebugAddress = \"127.0.0.1:6060\"\n[grpc.tls]\ncert = \"/f/cert.pem\"\nkey = \"/f/key.pem\"\nca = \"/f/ca.pem\"\n[log]\nformat = \"json\"\nlevel = \"warning\"\n",
        )
        .unwrap();
        let config_path = path.to_str().unwrap();
        let config = Config::load(&Flags::parse_from(["kilnd", "--config", config_path])).unwrap();
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "/f/cert.pem".into(),
                key: "/f/key.pem".into(),
                ca: Some("/f/ca.pem".into()),
            })
        );
        assert_eq!(config.debug_address.as_deref(), Some("127.0.0.1:6060"));
        assert_eq!(
            (config.log_format.as_str(), config.log_level.as_str()),
            ("json", "warn")
        );
        let config = Config::load(&Flags::parse_from([
            "kilnd",
            "--config",
            config_path,
            "--tlscert=/x/c.pem",
            "--log-format=text",
            "--debugaddr=",
        ]))
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/x/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/f/key.pem"));
        assert_eq!(config.log_format, "text");
        assert_eq!(config.debug_address, None);

        let missing = dir.path().join("none.toml");
        let missing = missing.to_str().unwrap();
        std::fs::write(missing, "").unwrap();
        let load = |extra: &[&str]| {
            let mut args = vec!["kilnd", "--config", missing];
            args.extend_from_slice(extra);
            Config::load(&Flags::parse_from(args)).map_err(|e| e.to_string())
        };
        assert_eq!(
            load(&["--tlscert=/c"]).unwrap_err(),
            "--tlscert needs --tlskey"
        );
        assert!(load(&["--tlscacert=/c"])
            .unwrap_err()
            .contains("needs --tlscert"));
        assert!(load(&[]).unwrap().tls.is_none());
        assert!(load(&["--log-format=xml"])
            .unwrap_err()
            .contains("text or json"));
        assert!(load(&["--log-level=loud"])
            .unwrap_err()
            .contains("invalid log level"));
    }

    #[test]
    fn containerd_worker_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "[worker.oci]\nenabled = false\n[worker.containerd]\nenabled = true\nnamespace = \"default\"\n",
        )
        .unwrap();
        let flags = Flags::parse_from(["kilnd", "--config", path.to_str().unwrap()]);
        let config = Config::load(&flags).unwrap();
        assert_eq!(config.oci.enabled, Some(false));
        assert_eq!(config.containerd.enabled, Some(true));
        assert_eq!(config.containerd.namespace.as_deref(), Some("default"));
        assert_eq!(config.containerd.snapshotter.as_deref(), Some("overlayfs"));
        assert_eq!(
            config.containerd.address.as_deref(),
            Some("/run/containerd/containerd.sock")
        );
        let flags = Flags::parse_from([
            "kilnd",
            "--config",
            path.to_str().unwrap(),
            "--containerd-worker-namespace",
            "k8s.io",
            "--containerd-worker-snapshotter",
            "a/b",
        ]);
        assert_eq!(
            Config::load(&flags).unwrap_err().to_string(),
            "bad snapshotter name \"a/b\""
        );
    }

    #[test]
    fn oci_worker_containerd_images() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "[worker.oci]\ncontainerd-images = { address = \"/x.sock\", namespace = \"a\" }\n",
        )
        .unwrap();
        let flags = Flags::parse_from(["kilnd", "--config", path.to_str().unwrap()]);
        let images = Config::load(&flags).unwrap().oci.containerd_images.unwrap();
        assert_eq!(images.namespace, "a");
        assert_eq!(images.address.as_deref(), Some("/x.sock"));
        // The flag names the namespace, keeping the file's address.
        let flags = Flags::parse_from([
            "kilnd",
            "--config",
            path.to_str().unwrap(),
            "--oci-worker-containerd-images=b",
        ]);
        let images = Config::load(&flags).unwrap().oci.containerd_images.unwrap();
        assert_eq!(images.namespace, "b");
        assert_eq!(images.address.as_deref(), Some("/x.sock"));
        // Without the file the address defaults to containerd's socket.
        let flags = Flags::parse_from([
            "kilnd",
            "--config",
            "/nonexistent-kiln-default.toml",
            "--oci-worker-containerd-images",
            "c",
        ]);
        assert!(Config::load(&flags).is_err(), "explicit missing config");
        std::fs::write(&path, "").unwrap();
        let flags = Flags::parse_from([
            "kilnd",
            "--config",
            path.to_str().unwrap(),
            "--oci-worker-containerd-images",
            "c",
        ]);
        let images = Config::load(&flags).unwrap().oci.containerd_images.unwrap();
        assert_eq!(images.namespace, "c");
        assert_eq!(
            images.address.as_deref(),
            Some("/run/containerd/containerd.sock")
        );
        assert!(Config::load(&Flags::parse_from([
            "kilnd",
            "--config",
            path.to_str().unwrap()
        ]))
        .unwrap()
        .oci
        .containerd_images
        .is_none());
        std::fs::write(
            &path,
            "[worker.oci]\ncontainerd-images = { address = \"/x.sock\" }\n",
        )
        .unwrap();
        let flags = Flags::parse_from(["kilnd", "--config", path.to_str().unwrap()]);
        assert!(Config::load(&flags).is_err(), "a namespace is required");
    }

    #[test]
    fn rootless_defaults_follow_xdg_and_rootlesskit() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        // The initial namespace as root: buildkitd's rootful paths.
        assert_eq!(
            Defaults::from_env(false, 0, env(&[("USER", "u")])),
            Defaults::rootful()
        );
        // uid 0 of a user namespace, but $USER root (a container): still rootful paths.
        let container = Defaults::from_env(true, 0, env(&[("USER", "root")]));
        assert!(!container.rootless && container.in_user_namespace);
        assert_eq!(container.address, DEFAULT_ADDRESS);
        // RootlessKit's child: the XDG dirs (first element of a list).
        let child = Defaults::from_env(
            true,
            0,
            env(&[
                ("USER", "u"),
                ("HOME", "/home/u"),
                ("XDG_RUNTIME_DIR", "/run/user/1000:/other"),
                ("XDG_DATA_HOME", "/data"),
            ]),
        );
        assert!(child.rootless);
        assert_eq!(
            child.address,
            "unix:///run/user/1000/buildkit/buildkitd.sock"
        );
        assert_eq!(child.root, PathBuf::from("/data/buildkit"));
        assert_eq!(
            child.config,
            PathBuf::from("/home/u/.config/buildkit/buildkitd.toml")
        );
        // No XDG_RUNTIME_DIR: the parent's /run/user/<uid>; no XDG_DATA_HOME: ~/.local/share.
        let bare = Defaults::from_env(
            true,
            0,
            env(&[
                ("ROOTLESSKIT_STATE_DIR", "/tmp/rk"),
                ("ROOTLESSKIT_PARENT_EUID", "1001"),
                ("HOME", "/home/v"),
            ]),
        );
        assert_eq!(
            bare.address,
            "unix:///run/user/1001/buildkit/buildkitd.sock"
        );
        assert_eq!(bare.root, PathBuf::from("/home/v/.local/share/buildkit"));

        // Loading over them: the default config may be missing, the defaults are used, the
        // socket dir is protected, and the OCI worker is rootless in the user namespace.
        let dir = tempfile::tempdir().unwrap();
        let mut defaults = child.clone();
        defaults.config = dir.path().join("missing.toml");
        let config = Config::load_with(&Flags::parse_from(["kilnd"]), &defaults).unwrap();
        assert!(config.rootless);
        assert_eq!(config.addresses, vec![child.address.clone()]);
        assert_eq!(config.root, child.root);
        assert_eq!(
            config.rootless_socket_dir,
            Some(PathBuf::from("/run/user/1000/buildkit"))
        );
        assert_eq!(config.oci.rootless, Some(true));
        assert_eq!(config.containerd.rootless, Some(true));
        // The default file is read when present.
        std::fs::write(
            &defaults.config,
            "root = \"/from/file\"\n[worker.oci]\nrootless = false\n",
        )
        .unwrap();
        let config = Config::load_with(
            &Flags::parse_from(["kilnd", "--addr=unix:///x.sock"]),
            &defaults,
        )
        .unwrap();
        assert_eq!(config.root, PathBuf::from("/from/file"));
        assert_eq!(config.oci.rootless, Some(false));
        assert_eq!(
            config.rootless_socket_dir, None,
            "only the default socket's dir"
        );
        let config = Config::load_with(
            &Flags::parse_from([
                "kilnd",
                "--oci-worker-rootless",
                "--oci-worker-snapshotter=native",
            ]),
            &defaults,
        )
        .unwrap();
        assert_eq!(config.oci.rootless, Some(true));
        assert_eq!(config.oci.snapshotter.as_deref(), Some("native"));
        // Rootless containers need the user namespace.
        let err = Config::load_with(
            &Flags::parse_from(["kilnd", "--oci-worker-rootless=true"]),
            &Defaults::rootful(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("user namespace"), "{err}");
        let err = Config::load_with(
            &Flags::parse_from(["kilnd", "--containerd-worker-rootless"]),
            &Defaults::rootful(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("user namespace"), "{err}");
        let config = Config::load_with(
            &Flags::parse_from(["kilnd", "--containerd-worker-rootless=false"]),
            &defaults,
        )
        .unwrap();
        assert_eq!(config.containerd.rootless, Some(false));
    }

    #[test]
    fn address_without_scheme_is_rejected() {
        let flags = Flags::parse_from(["kilnd", "--config", "/nonexistent-kiln.toml"]);
        assert!(
            Config::load(&flags).is_err(),
            "explicit missing config must fail"
        );
        let flags = Flags::parse_from(["kilnd", "--addr", "/tmp/x.sock"]);
        let err = Config::load(&flags).unwrap_err().to_string();
        assert_eq!(
            err,
            "address /tmp/x.sock does not contain proto, you meant unix:///tmp/x.sock ?"
        );
    }
}
