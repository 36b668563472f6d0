//! The OCI runtime spec (`config.json`) handed to runc, and how an `ExecOp` becomes one.
//!
//! Only the fields kiln sets are modelled. Defaults follow what BuildKit's OCI worker gives a
//! `RUN` step: docker's default capabilities, masked and read-only `/proc` paths, a private
//! `/dev`, hostname `buildkitsandbox`, and the host network unless the op asks for none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// `config.json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Spec {
    pub oci_version: String,
    pub process: Process,
    pub root: Root,
    pub hostname: String,
    pub mounts: Vec<Mount>,
    pub linux: Linux,
}

/// The container process.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Process {
    pub terminal: bool,
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub capabilities: Capabilities,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
}

/// Process credentials.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
}

/// Capability sets.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
}

/// A resource limit.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

/// The root filesystem.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Root {
    pub path: PathBuf,
    pub readonly: bool,
}

/// A mount inside the container.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Linux specifics.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Linux {
    pub namespaces: Vec<Namespace>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// cgroup settings; none for rootless containers (runc could not apply them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// A namespace to create.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
}

/// cgroup resources: only the device rule.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Resources {
    pub devices: Vec<DeviceRule>,
}

/// A device cgroup rule.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct DeviceRule {
    pub allow: bool,
    pub access: String,
}

/// Docker's default capability set.
pub(crate) const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Extra capabilities of `security.insecure` (every capability runc 1.1 knows).
const INSECURE_EXTRA_CAPABILITIES: &[&str] = &[
    "CAP_DAC_READ_SEARCH",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_LEASE",
    "CAP_AUDIT_CONTROL",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
];

/// The capability number of `name` (Linux's numbering).
fn capability_number(name: &str) -> Option<u32> {
    const NAMES: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
    ];
    let short = name.strip_prefix("CAP_")?;
    NAMES.iter().position(|n| *n == short).map(|p| p as u32)
}

/// This process's capability bounding set (`CapBnd` of /proc/self/status).
fn bounding_set() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Docker's masked paths.
pub(crate) const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
pub(crate) const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// `PATH` given to processes whose environment has none (BuildKit's default for Linux).
pub(crate) const DEFAULT_PATH: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The hostname of build containers.
pub(crate) const DEFAULT_HOSTNAME: &str = "buildkitsandbox";

/// Everything [`generate`] needs beyond the op.
#[derive(Debug, Clone)]
pub(crate) struct SpecInput<'a> {
    pub args: &'a [String],
    pub env: Vec<String>,
    pub cwd: &'a str,
    pub user: User,
    pub hostname: &'a str,
    pub rootfs: &'a Path,
    pub readonly_root: bool,
    /// No network namespace (share the host's).
    pub host_network: bool,
    /// `security.insecure`: all capabilities, nothing masked.
    pub insecure: bool,
    /// Mounts beyond the defaults (bind mounts of inputs, tmpfs, `/etc/hosts`, …), in order.
    pub extra_mounts: Vec<Mount>,
    /// `(name, soft, hard)` ulimits beyond the default `RLIMIT_NOFILE`.
    pub ulimits: Vec<(String, u64, u64)>,
    /// The `RLIMIT_NOFILE` given to the process (see [`nofile_limit`]).
    pub nofile: u64,
    /// A rootless container (kilnd in a user namespace): `/sys` bind-mounted when the network
    /// namespace is the host's (sysfs cannot be mounted there), no cgroup settings.
    pub rootless: bool,
}

/// BuildKit's `RLIMIT_NOFILE` (1048576), lowered to this process' hard limit when it lacks
/// `CAP_SYS_RESOURCE` in the initial user namespace (runc could not raise it, and the container
/// would fail to start).
pub(crate) fn nofile_limit() -> u64 {
    const WANTED: u64 = 1_048_576;
    const CAP_SYS_RESOURCE: u32 = 24;
    let capable = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
        && !crate::userns::running_in_user_namespace();
    if capable {
        return WANTED;
    }
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => WANTED.min(hard),
        Err(_) => WANTED,
    }
}

fn default_mounts() -> Vec<Mount> {
    let m = |dest: &str, kind: &str, source: &str, opts: &[&str]| Mount {
        destination: dest.into(),
        kind: kind.into(),
        source: source.into(),
        options: opts.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        m("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        m(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        m(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        m(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        m(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        m(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ]
}

/// Builds the spec.
pub(crate) fn generate(input: SpecInput<'_>) -> Spec {
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    if input.insecure {
        // Only what kilnd itself may grant: runc refuses a capability
        // outside its own bounding set ("unable to apply caps").
        let bounding = bounding_set();
        caps.extend(
            INSECURE_EXTRA_CAPABILITIES
                .iter()
                .filter(|name| {
                    capability_number(name)
                        .is_none_or(|n| bounding.is_none_or(|set| set & (1 << n) != 0))
                })
                .map(|s| s.to_string()),
        );
    }
    let mut env = input.env;
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let mut rlimits: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    rlimits.insert("RLIMIT_NOFILE".into(), (input.nofile, input.nofile));
    for (name, soft, hard) in input.ulimits {
        rlimits.insert(format!("RLIMIT_{}", name.to_uppercase()), (soft, hard));
    }
    let mut namespaces: Vec<Namespace> = ["pid", "ipc", "uts", "mount"]
        .iter()
        .map(|k| Namespace {
            kind: k.to_string(),
        })
        .collect();
    if !input.host_network {
        namespaces.push(Namespace {
            kind: "network".into(),
        });
    }
    let mut mounts = default_mounts();
    if input.rootless && input.host_network {
        // As runc's rootless spec: sysfs belongs to the network namespace, which is not ours.
        for mount in mounts.iter_mut().filter(|m| m.destination == "/sys") {
            mount.kind = "none".into();
            mount.source = "/sys".into();
            mount.options = ["rbind", "nosuid", "noexec", "nodev", "ro"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        }
    }
    mounts.extend(input.extra_mounts);
    Spec {
        oci_version: "1.0.2".into(),
        process: Process {
            terminal: false,
            user: input.user,
            args: input.args.to_vec(),
            env,
            cwd: input.cwd.to_string(),
            capabilities: Capabilities {
                bounding: caps.clone(),
                effective: caps.clone(),
                permitted: caps,
            },
            rlimits: rlimits
                .into_iter()
                .map(|(kind, (soft, hard))| Rlimit { kind, hard, soft })
                .collect(),
            no_new_privileges: false,
        },
        root: Root {
            path: input.rootfs.to_path_buf(),
            readonly: input.readonly_root,
        },
        hostname: input.hostname.to_string(),
        mounts,
        linux: Linux {
            namespaces,
            masked_paths: if input.insecure {
                Vec::new()
            } else {
                MASKED_PATHS.iter().map(|s| s.to_string()).collect()
            },
            readonly_paths: if input.insecure {
                Vec::new()
            } else {
                READONLY_PATHS.iter().map(|s| s.to_string()).collect()
            },
            resources: (!input.rootless).then(|| Resources {
                devices: vec![DeviceRule {
                    allow: input.insecure,
                    access: "rwm".into(),
                }],
            }),
        },
    }
}

/// Resolves an `ExecOp` user (`uid`, `uid:gid`, `name`, `name:group`, empty = root) against the
/// `passwd` and `group` files of the rootfs. Supplementary groups are those listing the user.
pub(crate) fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd_entries: Vec<Vec<&str>> = passwd
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let group_entries: Vec<Vec<&str>> = group
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();

    let (uid, name, primary_gid) = if user_part.is_empty() {
        (0, Some("root".to_string()), 0)
    } else if let Ok(uid) = user_part.parse::<u32>() {
        let entry = passwd_entries
            .iter()
            .find(|f| f[2].parse::<u32>().ok() == Some(uid));
        (
            uid,
            entry.map(|f| f[0].to_string()),
            entry.and_then(|f| f[3].parse().ok()).unwrap_or(0),
        )
    } else {
        let entry = passwd_entries
            .iter()
            .find(|f| f[0] == user_part)
            .ok_or_else(|| {
                format!("unable to find user {user_part}: no matching entries in passwd file")
            })?;
        let uid = entry[2]
            .parse()
            .map_err(|_| format!("invalid uid for user {user_part}"))?;
        let gid = entry[3]
            .parse()
            .map_err(|_| format!("invalid gid for user {user_part}"))?;
        (uid, Some(user_part.to_string()), gid)
    };

    let gid = match group_part {
        None | Some("") => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        },
    };

    let mut additional_gids = Vec::new();
    if group_part.is_none() {
        if let Some(name) = &name {
            for f in &group_entries {
                let members = f.get(3).copied().unwrap_or("");
                if members.split(',').any(|m| m == name) {
                    if let Ok(g) = f[2].parse::<u32>() {
                        if g != gid && !additional_gids.contains(&g) {
                            additional_gids.push(g);
                        }
                    }
                }
            }
        }
    }
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

/// The `/etc/hosts` of build containers.
pub(crate) fn hosts_file(hostname: &str, extra: &[(String, String)]) -> String {
    let mut s =
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (host, ip) in extra {
        s.push_str(&format!("{ip}\t{host}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\nbuilder:x:1000:1000::/home/builder:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:root,builder\nbuilder:x:1000:\nstaff:x:50:builder\n";

    #[test]
    fn user_forms() {
        assert_eq!(resolve_user("", PASSWD, GROUP).unwrap().uid, 0);
        let b = resolve_user("builder", PASSWD, GROUP).unwrap();
        assert_eq!((b.uid, b.gid), (1000, 1000));
        assert_eq!(b.additional_gids, vec![10, 50]);
        let n = resolve_user("1000", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid), (1000, 1000));
        let unknown = resolve_user("4242", PASSWD, GROUP).unwrap();
        assert_eq!((unknown.uid, unknown.gid), (4242, 0));
        let both = resolve_user("builder:staff", PASSWD, GROUP).unwrap();
        assert_eq!((both.uid, both.gid), (1000, 50));
        assert!(both.additional_gids.is_empty());
        assert_eq!(
            resolve_user("7:8", "", "").unwrap(),
            User {
                uid: 7,
                gid: 8,
                additional_gids: vec![]
            }
        );
        assert!(resolve_user("ghost", PASSWD, GROUP).is_err());
        assert!(resolve_user("root:ghosts", PASSWD, GROUP).is_err());
    }

    fn input(rootfs: &Path) -> SpecInput<'_> {
        SpecInput {
            args: &[],
            env: vec!["A=b".into()],
            cwd: "/work",
            user: User::default(),
            hostname: DEFAULT_HOSTNAME,
            rootfs,
            readonly_root: false,
            host_network: true,
            insecure: false,
            extra_mounts: vec![],
            ulimits: vec![],
            nofile: 1_048_576,
            rootless: false,
        }
    }

    #[test]
    fn spec_defaults() {
        let spec = generate(input(Path::new("/r")));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["hostname"], "buildkitsandbox");
        assert_eq!(json["process"]["terminal"], false);
        assert_eq!(json["process"]["env"][0], DEFAULT_PATH);
        assert_eq!(json["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(json["process"]["rlimits"][0]["soft"], 1_048_576);
        assert_eq!(
            json["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        let ns: Vec<_> = spec
            .linux
            .namespaces
            .iter()
            .map(|n| n.kind.as_str())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        let dests: Vec<_> = spec.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys"
            ]
        );
        assert!(json["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&"/proc/kcore".into()));
        assert!(json["linux"]["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&"/proc/sys".into()));
        assert_eq!(json["root"]["path"], "/r");
    }

    #[test]
    fn spec_variants() {
        let mut i = input(Path::new("/r"));
        i.host_network = false;
        i.insecure = true;
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("CAP_AUDIT_READ"), Some(37));
        i.env = vec!["PATH=/x".into()];
        i.ulimits = vec![("nproc".into(), 10, 20)];
        let spec = generate(i);
        assert!(spec.linux.namespaces.iter().any(|n| n.kind == "network"));
        assert!(spec
            .process
            .capabilities
            .bounding
            .contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(spec.linux.masked_paths.is_empty());
        assert_eq!(spec.process.env, ["PATH=/x"]);
        assert!(spec
            .process
            .rlimits
            .iter()
            .any(|r| r.kind == "RLIMIT_NPROC" && r.soft == 10 && r.hard == 20));
    }

    #[test]
    fn rootless_spec_binds_sys_and_has_no_cgroup_settings() {
        let mut i = input(Path::new("/r"));
        i.rootless = true;
        let json = serde_json::to_value(generate(i.clone())).unwrap();
        assert!(json["linux"].get("resources").is_none());
        let sys = json["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap()
            .clone();
        assert_eq!(sys["type"], "none");
        assert_eq!(sys["source"], "/sys");
        assert!(sys["options"].as_array().unwrap().contains(&"rbind".into()));
        // With its own network namespace the container may mount sysfs.
        i.host_network = false;
        let spec = generate(i);
        let sys = spec
            .mounts
            .iter()
            .find(|m| m.destination == "/sys")
            .unwrap();
        assert_eq!(sys.kind, "sysfs");
        // Rootful keeps the device rule.
        let json = serde_json::to_value(generate(input(Path::new("/r")))).unwrap();
        assert_eq!(json["linux"]["resources"]["devices"][0]["allow"], false);
    }

    #[test]
    fn hosts_has_localhost_and_sandbox() {
        let hosts = hosts_file("buildkitsandbox", &[("db".into(), "10.0.0.2".into())]);
        assert!(hosts.contains("127.0.0.1\tlocalhost buildkitsandbox"));
        assert!(hosts.contains("10.0.0.2\tdb"));
    }
}
