//! Build-daemon discovery, exactly as nerdctl's `GetBuildkitHost` (reference §2.1–2.2):
//! `--buildkit-host` > `BUILDKIT_HOST` > per-namespace sockets under the runtime dir.
//!
//! The pure parts (runtime dir, candidate list, plan) take a [`DiscoveryEnv`]
//! snapshot; [`discover`] takes the ping as a function, so all of it is
//! unit-tested without a daemon.

use std::future::Future;
use std::path::PathBuf;

/// Environment facts discovery depends on.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryEnv {
    /// Effective uid.
    pub euid: u32,
    /// Running inside a user namespace (uid map is not the identity map).
    pub in_user_namespace: bool,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<String>,
    /// `$ROOTLESSKIT_STATE_DIR` (set inside RootlessKit's child).
    pub rootlesskit_state_dir: Option<String>,
    /// `$ROOTLESSKIT_PARENT_EUID`.
    pub rootlesskit_parent_euid: Option<String>,
    /// `$BUILDKIT_HOST`.
    pub buildkit_host: Option<String>,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

impl DiscoveryEnv {
    /// Reads the current process' environment.
    pub fn from_process() -> Self {
        let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
        let identity = uid_map
            .split_whitespace()
            .collect::<Vec<_>>()
            .eq(&["0", "0", "4294967295"]);
        DiscoveryEnv {
            euid: nix::unistd::geteuid().as_raw(),
            in_user_namespace: !uid_map.is_empty() && !identity,
            xdg_runtime_dir: non_empty(std::env::var("XDG_RUNTIME_DIR").ok()),
            rootlesskit_state_dir: non_empty(std::env::var("ROOTLESSKIT_STATE_DIR").ok()),
            rootlesskit_parent_euid: non_empty(std::env::var("ROOTLESSKIT_PARENT_EUID").ok()),
            buildkit_host: non_empty(std::env::var("BUILDKIT_HOST").ok()),
        }
    }

    /// In RootlessKit's child: euid 0 inside a user namespace with `ROOTLESSKIT_STATE_DIR` set.
    pub fn is_rootlesskit_child(&self) -> bool {
        self.euid == 0 && self.in_user_namespace && self.rootlesskit_state_dir.is_some()
    }

    /// Rootless: non-root, or RootlessKit's child.
    pub fn is_rootless(&self) -> bool {
        self.euid != 0 || self.is_rootlesskit_child()
    }

    /// The runtime dir `<rt>` (§2.2).
    pub fn runtime_dir(&self) -> Result<PathBuf, DiscoveryError> {
        if !self.is_rootless() {
            return Ok(PathBuf::from("/run"));
        }
        if let Some(dir) = &self.xdg_runtime_dir {
            return Ok(PathBuf::from(dir));
        }
        if self.is_rootlesskit_child() {
            return match &self.rootlesskit_parent_euid {
                Some(euid) => Ok(PathBuf::from(format!("/run/user/{euid}"))),
                None => Err(DiscoveryError::XdgRuntimeDirUnset),
            };
        }
        Ok(PathBuf::from(format!("/run/user/{}", self.euid)))
    }
}

/// Discovery failures; the texts follow nerdctl.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// Empty namespace.
    #[error("namespace must be specified")]
    NamespaceEmpty,
    /// Rootless child without `XDG_RUNTIME_DIR` nor `ROOTLESSKIT_PARENT_EUID`.
    #[error("environment variable XDG_RUNTIME_DIR is not set, see https://rootlesscontaine.rs/getting-started/common/login/")]
    XdgRuntimeDirUnset,
    /// `--buildkit-host` given and not answering.
    #[error("{hint}: {error}")]
    FlagHostUnavailable {
        /// The hint line.
        hint: String,
        /// The ping failure.
        error: String,
    },
    /// `BUILDKIT_HOST` set and not answering (raw error, like nerdctl).
    #[error("{error}")]
    EnvHostUnavailable {
        /// The host from the environment.
        host: String,
        /// The ping failure.
        error: String,
    },
    /// No candidate answered.
    #[error("no buildkit host is available, tried {} candidates: {}", failures.len(), join_failures(failures))]
    NoHostAvailable {
        /// The hint line, printed before the error.
        hint: String,
        /// `(candidate, ping error)` in the order tried.
        failures: Vec<(String, String)>,
    },
}

impl DiscoveryError {
    /// The hint to print on its own line before the error, if any.
    pub fn hint(&self) -> Option<&str> {
        match self {
            DiscoveryError::NoHostAvailable { hint, .. } => Some(hint),
            _ => None,
        }
    }
}

/// `errors.Join` of `failed to ping to host <c>: <err>` lines.
fn join_failures(failures: &[(String, String)]) -> String {
    failures
        .iter()
        .map(|(host, error)| format!("failed to ping to host {host}: {error}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The hint of §2.1, adapted to kiln: which daemon must run and where kiln looked.
pub fn hint(candidates: &[String], rootless: bool) -> String {
    let mut text = format!(
        "`kilnd` (or `buildkitd`) needs to be running and listening on one of: {}",
        candidates.join(", ")
    );
    if rootless {
        text.push_str(
            " , and, with rootless containerd, started as the same user so that its socket is under $XDG_RUNTIME_DIR",
        );
    }
    text
}

/// Candidate sockets for `namespace` under `runtime_dir` (§2.1 step 3).
pub fn candidates(
    namespace: &str,
    runtime_dir: &std::path::Path,
) -> Result<Vec<String>, DiscoveryError> {
    if namespace.is_empty() {
        return Err(DiscoveryError::NamespaceEmpty);
    }
    let rt = runtime_dir.display();
    let mut list = Vec::new();
    if namespace != "default" {
        list.push(format!("unix://{rt}/buildkit-{namespace}/buildkitd.sock"));
    }
    list.push(format!("unix://{rt}/buildkit-default/buildkitd.sock"));
    list.push(format!("unix://{rt}/buildkit/buildkitd.sock"));
    Ok(list)
}

/// Where to look, in precedence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// `--buildkit-host`: used verbatim, no fallback.
    Flag(String),
    /// `BUILDKIT_HOST`: used verbatim, no fallback, raw error.
    Env(String),
    /// Per-namespace candidates, first answering wins.
    Candidates(Vec<String>),
}

/// Chooses the [`Plan`]: flag (if given) > `BUILDKIT_HOST` (if non-empty) > candidates.
pub fn plan(
    flag: Option<&str>,
    env: &DiscoveryEnv,
    namespace: &str,
) -> Result<Plan, DiscoveryError> {
    if let Some(host) = flag {
        return Ok(Plan::Flag(host.to_string()));
    }
    if let Some(host) = &env.buildkit_host {
        return Ok(Plan::Env(host.clone()));
    }
    Ok(Plan::Candidates(candidates(
        namespace,
        &env.runtime_dir()?,
    )?))
}

/// Runs the plan, pinging with `ping` (kiln uses `ListWorkers` with a 5 s
/// timeout per candidate). Returns the chosen address.
pub async fn discover<F, Fut>(
    plan: Plan,
    rootless: bool,
    mut ping: F,
) -> Result<String, DiscoveryError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    match plan {
        Plan::Flag(host) => match ping(host.clone()).await {
            Ok(()) => Ok(host),
            Err(error) => {
                tracing::debug!(host, error, "build daemon does not answer");
                Err(DiscoveryError::FlagHostUnavailable {
                    hint: hint(std::slice::from_ref(&host), rootless),
                    error,
                })
            }
        },
        Plan::Env(host) => match ping(host.clone()).await {
            Ok(()) => Ok(host),
            Err(error) => Err(DiscoveryError::EnvHostUnavailable { host, error }),
        },
        Plan::Candidates(list) => {
            tracing::debug!(candidates = ?list, "choosing the buildkit host");
            let mut failures = Vec::new();
            for host in &list {
                match ping(host.clone()).await {
                    Ok(()) => {
                        tracing::debug!(host, "chosen buildkit host");
                        return Ok(host.clone());
                    }
                    Err(error) => failures.push((host.clone(), error)),
                }
            }
            Err(DiscoveryError::NoHostAvailable {
                hint: hint(&list, rootless),
                failures,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn rootful() -> DiscoveryEnv {
        DiscoveryEnv::default()
    }

    #[test]
    fn candidates_for_default_namespace() {
        assert_eq!(
            candidates("default", Path::new("/run")).unwrap(),
            vec![
                "unix:///run/buildkit-default/buildkitd.sock",
                "unix:///run/buildkit/buildkitd.sock"
            ]
        );
    }

    #[test]
    fn candidates_for_other_namespace() {
        assert_eq!(
            candidates("k8s.io", Path::new("/run")).unwrap(),
            vec![
                "unix:///run/buildkit-k8s.io/buildkitd.sock",
                "unix:///run/buildkit-default/buildkitd.sock",
                "unix:///run/buildkit/buildkitd.sock"
            ]
        );
        assert!(matches!(
            candidates("", Path::new("/run")),
            Err(DiscoveryError::NamespaceEmpty)
        ));
        assert_eq!(
            candidates("", Path::new("/run")).unwrap_err().to_string(),
            "namespace must be specified"
        );
    }

    #[test]
    fn runtime_dir_rules() {
        assert_eq!(rootful().runtime_dir().unwrap(), Path::new("/run"));
        // Rootful ignores XDG_RUNTIME_DIR.
        let env = DiscoveryEnv {
            xdg_runtime_dir: Some("/run/user/0".into()),
            ..rootful()
        };
        assert_eq!(env.runtime_dir().unwrap(), Path::new("/run"));

        let user = DiscoveryEnv {
            euid: 1000,
            xdg_runtime_dir: Some("/run/user/1000".into()),
            ..rootful()
        };
        assert!(user.is_rootless());
        assert_eq!(user.runtime_dir().unwrap(), Path::new("/run/user/1000"));
        // Parent without XDG_RUNTIME_DIR: /run/user/<euid>.
        let user = DiscoveryEnv {
            xdg_runtime_dir: None,
            ..user
        };
        assert_eq!(user.runtime_dir().unwrap(), Path::new("/run/user/1000"));

        // RootlessKit child: euid 0 in a userns with ROOTLESSKIT_STATE_DIR.
        let child = DiscoveryEnv {
            euid: 0,
            in_user_namespace: true,
            rootlesskit_state_dir: Some("/run/user/1000/containerd-rootless".into()),
            rootlesskit_parent_euid: Some("1000".into()),
            ..rootful()
        };
        assert!(child.is_rootless());
        assert_eq!(child.runtime_dir().unwrap(), Path::new("/run/user/1000"));
        let orphan = DiscoveryEnv {
            rootlesskit_parent_euid: None,
            ..child.clone()
        };
        assert_eq!(
            orphan.runtime_dir().unwrap_err().to_string(),
            "environment variable XDG_RUNTIME_DIR is not set, see https://rootlesscontaine.rs/getting-started/common/login/"
        );
        // euid 0 in a userns without RootlessKit is rootful.
        let plain_userns = DiscoveryEnv {
            rootlesskit_state_dir: None,
            ..child
        };
        assert!(!plain_userns.is_rootless());
    }

    #[test]
    fn precedence_flag_env_candidates() {
        let env = DiscoveryEnv {
            buildkit_host: Some("tcp://127.0.0.1:1234".into()),
            ..rootful()
        };
        assert_eq!(
            plan(Some("unix:///x.sock"), &env, "default").unwrap(),
            Plan::Flag("unix:///x.sock".into())
        );
        assert_eq!(
            plan(None, &env, "default").unwrap(),
            Plan::Env("tcp://127.0.0.1:1234".into())
        );
        assert_eq!(
            plan(None, &rootful(), "ns").unwrap(),
            Plan::Candidates(candidates("ns", Path::new("/run")).unwrap())
        );
    }

    fn fake_ping(
        alive: &'static [&'static str],
    ) -> impl FnMut(String) -> std::future::Ready<Result<(), String>> {
        move |host: String| {
            std::future::ready(if alive.contains(&host.as_str()) {
                Ok(())
            } else {
                Err("connection refused".to_string())
            })
        }
    }

    #[tokio::test]
    async fn first_answering_candidate_wins() {
        let plan = plan(None, &rootful(), "ns").unwrap();
        let host = discover(
            plan,
            false,
            fake_ping(&[
                "unix:///run/buildkit-default/buildkitd.sock",
                "unix:///run/buildkit/buildkitd.sock",
            ]),
        )
        .await
        .unwrap();
        assert_eq!(host, "unix:///run/buildkit-default/buildkitd.sock");
    }

    #[tokio::test]
    async fn all_fail_message() {
        let plan = plan(None, &rootful(), "ns").unwrap();
        let err = discover(plan, false, fake_ping(&[])).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "no buildkit host is available, tried 3 candidates: \
             failed to ping to host unix:///run/buildkit-ns/buildkitd.sock: connection refused\n\
             failed to ping to host unix:///run/buildkit-default/buildkitd.sock: connection refused\n\
             failed to ping to host unix:///run/buildkit/buildkitd.sock: connection refused"
        );
        let hint = err.hint().unwrap();
        assert!(
            hint.starts_with("`kilnd` (or `buildkitd`) needs to be running"),
            "{hint}"
        );
        assert!(hint.contains("unix:///run/buildkit-ns/buildkitd.sock"));
    }

    #[tokio::test]
    async fn flag_and_env_do_not_fall_back() {
        let err = discover(
            Plan::Flag("unix:///a.sock".into()),
            false,
            fake_ping(&["unix:///run/buildkit/buildkitd.sock"]),
        )
        .await
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("`kilnd` (or `buildkitd`) needs to be running"));
        assert!(err.to_string().ends_with(": connection refused"));
        let err = discover(Plan::Env("unix:///b.sock".into()), false, fake_ping(&[]))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "connection refused");
        let ok = discover(
            Plan::Env("unix:///b.sock".into()),
            false,
            fake_ping(&["unix:///b.sock"]),
        )
        .await
        .unwrap();
        assert_eq!(ok, "unix:///b.sock");
    }
}
