//! `type=secret` and `type=ssh` mounts of an exec, served by the client's session.
//!
//! Secrets are fetched when the exec runs (never part of a cache key: the op names only the
//! id), written into a tmpfs private to the exec (mode 0700, under the bundle) and bind-mounted
//! read-only at their target with the requested owner and mode. Nothing of them reaches a
//! snapshot: the target only exists as a mount, and the stub runc creates for it in the rootfs
//! is removed like every other mount stub. The tmpfs is unmounted when the exec ends.
//!
//! Secrets given as environment variables (`SecretEnv`) are added to the process environment;
//! the process spec that then holds them is written into the same tmpfs, not the bundle.
//!
//! An SSH mount is a unix socket in a private directory, bind-mounted at the target; every
//! connection made to it inside the container becomes one `ForwardAgent` stream to the
//! client's agent. The accept loop and the forwarded connections end with the exec.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_proto::pb;
use kiln_worker::{Error, ExecSession};
use tokio::task::{JoinHandle, JoinSet};

use crate::fsx::io_err;
use crate::mount::{self, Mounted};
use crate::snapshot::random_id;
use crate::spec;

/// Default mode of a secret file when the op gives none (the Dockerfile frontend's default).
const DEFAULT_SECRET_MODE: u32 = 0o400;
/// Default mode of an agent socket when the op gives none.
const DEFAULT_SSH_MODE: u32 = 0o600;
/// Size limit of the secrets tmpfs.
const SECRETS_TMPFS_SIZE: &str = "16m";

/// The secret files and agent sockets of one exec; dropping it unmounts and removes them.
pub(crate) struct SessionMounts {
    bundle: PathBuf,
    secrets: Option<(PathBuf, Mounted)>,
    ssh_dir: Option<PathBuf>,
    agents: Vec<JoinHandle<()>>,
}

impl SessionMounts {
    /// Nothing mounted yet; secret files go under `bundle`.
    pub(crate) fn new(bundle: &Path) -> Self {
        Self {
            bundle: bundle.to_path_buf(),
            secrets: None,
            ssh_dir: None,
            agents: Vec::new(),
        }
    }

    fn secrets_dir(&mut self) -> Result<PathBuf, Error> {
        if let Some((dir, _)) = &self.secrets {
            return Ok(dir.clone());
        }
        let dir = self.bundle.join("secrets");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
        let mounted = mount::tmpfs(&dir, &format!("mode=0700,size={SECRETS_TMPFS_SIZE}"))?;
        self.secrets = Some((dir.clone(), mounted));
        Ok(dir)
    }

    /// Prepares the secret mount `index` of the op: the bind mount for the container, or
    /// `None` when the secret is optional and the client does not have it.
    pub(crate) async fn secret(
        &mut self,
        index: usize,
        m: &pb::Mount,
        session: &dyn ExecSession,
    ) -> Result<Option<spec::Mount>, Error> {
        let opt = m.secret_opt.clone().unwrap_or_default();
        let id = opt.id.clone();
        let value = session.secret(&id).await.map_err(|source| Error::Session {
            what: format!("get secret {id}"),
            source,
        })?;
        let Some(data) = value else {
            if opt.optional {
                tracing::debug!(id, dest = %m.dest, "optional secret not given, not mounted");
                return Ok(None);
            }
            return Err(Error::SecretNotFound { id });
        };
        let dir = self.secrets_dir()?;
        let file = dir.join(format!("secret-{index}"));
        write_private(&file, &data)?;
        std::os::unix::fs::chown(&file, Some(opt.uid), Some(opt.gid))
            .map_err(io_err("chown", &file))?;
        let mode = if opt.mode == 0 {
            DEFAULT_SECRET_MODE
        } else {
            opt.mode & 0o7777
        };
        fs::set_permissions(&file, fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &file))?;
        Ok(Some(spec::Mount {
            destination: m.dest.clone(),
            kind: "bind".into(),
            source: file.to_string_lossy().into_owned(),
            options: vec![
                "rbind".into(),
                "ro".into(),
                "nosuid".into(),
                "nodev".into(),
                "noexec".into(),
            ],
        }))
    }

    /// Adds the secrets of `secret_env` to `env` (`NAME=value`); returns the tmpfs directory
    /// the process spec must be written to (it holds the values), `None` when no secret was
    /// added. A required secret the client does not have fails.
    pub(crate) async fn secret_env(
        &mut self,
        secret_env: &[pb::SecretEnv],
        session: &dyn ExecSession,
        env: &mut Vec<String>,
    ) -> Result<Option<PathBuf>, Error> {
        let mut added = false;
        for item in secret_env {
            let value = session
                .secret(&item.id)
                .await
                .map_err(|source| Error::Session {
                    what: format!("get secret {}", item.id),
                    source,
                })?;
            match value {
                Some(value) => {
                    env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(item.name.as_str()));
                    env.push(format!("{}={}", item.name, String::from_utf8_lossy(&value)));
                    added = true;
                }
                None if item.optional => {}
                None => {
                    return Err(Error::SecretNotFound {
                        id: item.id.clone(),
                    })
                }
            }
        }
        if !added {
            return Ok(None);
        }
        let dir = self.secrets_dir()?.join("spec");
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        Ok(Some(dir))
    }

    /// Prepares the ssh mount `index` of the op: a socket forwarding to the client's agent,
    /// or `None` when the mount is optional and the client forwards no such agent.
    pub(crate) async fn ssh(
        &mut self,
        index: usize,
        m: &pb::Mount,
        session: Arc<dyn ExecSession>,
    ) -> Result<Option<spec::Mount>, Error> {
        let opt = m.ssh_opt.clone().unwrap_or_default();
        let id = if opt.id.is_empty() {
            "default".to_string()
        } else {
            opt.id.clone()
        };
        let forwarded = session
            .has_ssh_agent(&id)
            .await
            .map_err(|source| Error::Session {
                what: format!("check ssh agent {id}"),
                source,
            })?;
        if !forwarded {
            if opt.optional {
                tracing::debug!(id, dest = %m.dest, "optional ssh agent not forwarded, not mounted");
                return Ok(None);
            }
            return Err(Error::SshNotForwarded { id });
        }
        let dir = self.ssh_dir()?;
        let path = dir.join(format!("agent-{index}.sock"));
        let listener = tokio::net::UnixListener::bind(&path).map_err(io_err("listen on", &path))?;
        std::os::unix::fs::chown(&path, Some(opt.uid), Some(opt.gid))
            .map_err(io_err("chown", &path))?;
        let mode = if opt.mode == 0 {
            DEFAULT_SSH_MODE
        } else {
            opt.mode & 0o7777
        };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &path))?;
        self.agents
            .push(tokio::spawn(serve_agent(listener, id, session)));
        Ok(Some(spec::Mount {
            destination: m.dest.clone(),
            kind: "bind".into(),
            source: path.to_string_lossy().into_owned(),
            options: vec!["rbind".into()],
        }))
    }

    /// A private directory for agent sockets. It lives in the temporary directory rather than
    /// the bundle because a socket path must fit in `sun_path` (108 bytes).
    fn ssh_dir(&mut self) -> Result<PathBuf, Error> {
        if let Some(dir) = &self.ssh_dir {
            return Ok(dir.clone());
        }
        let dir = std::env::temp_dir().join(format!("kiln-ssh-{}", &random_id()[..16]));
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        self.ssh_dir = Some(dir.clone());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
        Ok(dir)
    }
}

impl Drop for SessionMounts {
    fn drop(&mut self) {
        for agent in self.agents.drain(..) {
            agent.abort();
        }
        if let Some((dir, mounted)) = self.secrets.take() {
            if let Err(e) = mounted.unmount() {
                tracing::warn!(dir = %dir.display(), error = %e, "failed to unmount secrets");
            }
        }
        if let Some(dir) = self.ssh_dir.take() {
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "failed to remove ssh sockets");
            }
        }
    }
}

/// Creates `path` with mode 0600 and writes `data` (a secret value: never logged).
fn write_private(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    file.write_all(data).map_err(io_err("write", path))
}

/// Accepts connections on `listener` and forwards each to the client's agent `id`. Aborting
/// the task drops the [`JoinSet`], which aborts every forwarded connection.
async fn serve_agent(
    listener: tokio::net::UnixListener,
    id: String,
    session: Arc<dyn ExecSession>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let conn = match accepted.and_then(|(stream, _)| stream.into_std()) {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(id, error = %e, "ssh agent socket accept failed");
                        return;
                    }
                };
                let session = session.clone();
                let id = id.clone();
                connections.spawn(async move {
                    if let Err(e) = session.forward_ssh(&id, conn).await {
                        tracing::debug!(id, error = %e, "ssh agent connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
