//! Running an `ExecOp` with runc on overlay mounts of the input snapshots.
//!
//! Every writable mount gets an [`ActiveTree`] from the worker's [`Trees`] (in the OCI worker a
//! pending snapshot whose `fs` dir is the overlay upper, so committing an output is a rename,
//! never a copy). An [`ExecGuard`] owns the container, the mounts
//! and the bundle directory: whatever way the future ends (success, error, or being dropped
//! because the client went away) the container is deleted, the mounts are unmounted and the
//! temporary directories are removed.

use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use kiln_proto::pb;
use kiln_worker::{Error, ExecSession, NoSession, ProgressSink, SnapshotId, SnapshotView};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::cachemount::{CacheMountGuard, CacheMounts};
use crate::fsx::{io_err, mkdir_all, resolve_in_root};
use crate::sessionmounts::SessionMounts;
use crate::snapshot::random_id;
use crate::spec::{self, SpecInput};
use crate::trees::{ActiveTree, Trees};

/// Runs `ExecOp`s with runc on trees from a [`Trees`] backend; also used by other workers.
#[derive(Debug, Clone)]
pub struct Executor {
    /// The runc binary.
    pub runc: PathBuf,
    /// `runc --root`.
    pub runc_state: PathBuf,
    /// Bundles, one per running op.
    pub bundles: PathBuf,
    /// Persistent `type=cache` mount directories.
    pub cache_mounts: Arc<CacheMounts>,
    /// `RLIMIT_NOFILE` of processes.
    pub nofile: u64,
    /// Rootless containers (kilnd is the mapped root of a user namespace): see
    /// `SpecInput::rootless`; runc runs with `--rootless true`.
    pub rootless: bool,
}

/// Owns everything an exec creates; see the module docs.
struct ExecGuard {
    bundle: PathBuf,
    container: Option<(PathBuf, PathBuf, String)>,
    views: Vec<SnapshotView>,
    pending: Vec<Option<Box<dyn ActiveTree>>>,
    /// Cache directories in use, released after the container is gone.
    caches: Vec<CacheMountGuard>,
    /// Secret files and agent sockets, removed after the container is gone.
    session_mounts: Option<SessionMounts>,
}

impl ExecGuard {
    fn delete_container(&mut self) {
        if let Some((runc, state, id)) = self.container.take() {
            let result = std::process::Command::new(&runc)
                .arg("--root")
                .arg(&state)
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            match result {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    // runc run removes its container on exit; "does not exist" is the usual case.
                    if !stderr.contains("does not exist") && !stderr.contains("not exist") {
                        tracing::warn!(id, stderr = %stderr.trim(), "runc delete failed");
                    }
                }
                Err(e) => tracing::warn!(id, error = %e, "failed to run runc delete"),
            }
        }
    }

    fn release_views(&mut self) {
        while let Some(view) = self.views.pop() {
            drop(view);
        }
    }
}

impl Drop for ExecGuard {
    fn drop(&mut self) {
        self.delete_container();
        self.release_views();
        // Uncommitted trees are discarded (and unmounted) before their mount points go.
        self.pending.clear();
        // The secrets tmpfs is under the bundle: unmount it before removing the bundle.
        self.session_mounts.take();
        if let Err(e) = fs::remove_dir_all(&self.bundle) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(bundle = %self.bundle.display(), error = %e, "failed to remove bundle");
            }
        }
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidOp {
        op: "exec",
        reason: reason.into(),
    }
}

/// What the container sees at one mount.
struct Prepared {
    /// Host path of the tree mounted at `dest`.
    view: PathBuf,
    /// Index into `ExecGuard::pending` when writable.
    pending: Option<usize>,
    input: Option<SnapshotId>,
}

impl Executor {
    /// An executor keeping runc state in `runc_state`, bundles in `bundles` and `type=cache`
    /// mount directories in `cache_mounts` (all created by the caller).
    pub fn new(
        runc: PathBuf,
        runc_state: PathBuf,
        bundles: PathBuf,
        cache_mounts: PathBuf,
    ) -> Self {
        Self {
            runc,
            runc_state,
            bundles,
            cache_mounts: Arc::new(CacheMounts::new(cache_mounts)),
            nofile: spec::nofile_limit(),
            rootless: false,
        }
    }

    /// Runs `op` on trees of `trees`; see `Worker::exec`. `inputs` must exist in `trees`.
    /// Without a session, required secret and ssh mounts fail and optional ones are skipped.
    pub async fn run(
        &self,
        trees: &dyn Trees,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        self.run_in_session(trees, op, inputs, Arc::new(NoSession), progress)
            .await
    }

    /// [`run`](Self::run) with the build's session, which serves the secrets and SSH agents
    /// of `type=secret` and `type=ssh` mounts; see `Worker::exec_in_session`.
    pub async fn run_in_session(
        &self,
        trees: &dyn Trees,
        op: &pb::ExecOp,
        inputs: &[Option<SnapshotId>],
        session: Arc<dyn ExecSession>,
        progress: &dyn ProgressSink,
    ) -> Result<Vec<Option<SnapshotId>>, Error> {
        let meta = op.meta.as_ref().ok_or_else(|| invalid("missing meta"))?;
        if meta.args.is_empty() {
            return Err(invalid("no process arguments"));
        }
        let exec_id = random_id();
        let bundle = self.bundles.join(&exec_id);
        fs::create_dir_all(&bundle).map_err(io_err("create", &bundle))?;
        let mut guard = ExecGuard {
            bundle: bundle.clone(),
            container: None,
            views: Vec::new(),
            pending: Vec::new(),
            caches: Vec::new(),
            session_mounts: None,
        };

        // Prepare every mount; the root first so the others can be checked against it.
        let root_index = op
            .mounts
            .iter()
            .position(|m| m.dest == "/")
            .ok_or_else(|| invalid("no root mount"))?;
        let mut prepared: Vec<Option<Prepared>> = (0..op.mounts.len()).map(|_| None).collect();
        let mut extra_mounts = Vec::new();
        let mut order: Vec<usize> = vec![root_index];
        order.extend((0..op.mounts.len()).filter(|&i| i != root_index));
        for i in order {
            let m = &op.mounts[i];
            let kind = pb::MountType::try_from(m.mount_type)
                .map_err(|_| invalid(format!("unknown mount type {}", m.mount_type)))?;
            match kind {
                pb::MountType::Bind => {
                    let input = if m.input < 0 {
                        None
                    } else {
                        inputs
                            .get(m.input as usize)
                            .ok_or_else(|| {
                                invalid(format!(
                                    "mount {} refers to missing input {}",
                                    m.dest, m.input
                                ))
                            })?
                            .clone()
                    };
                    let p = self.prepare_bind(trees, &mut guard, i, input, m.readonly)?;
                    if i != root_index {
                        let source = resolve_in_root(&p.view, &m.selector, true)
                            .map_err(io_err("resolve selector in", &p.view))?;
                        if fs::symlink_metadata(&source).is_err() {
                            // runc would fail with an unclear error about the mount.
                            return Err(invalid(format!(
                                "failed to mount {}: source path {:?} does not exist",
                                m.dest,
                                if m.selector.is_empty() {
                                    "/"
                                } else {
                                    m.selector.as_str()
                                }
                            )));
                        }
                        let mut options = vec!["rbind".to_string()];
                        if m.readonly {
                            options.push("ro".into());
                        }
                        extra_mounts.push(spec::Mount {
                            destination: m.dest.clone(),
                            kind: "bind".into(),
                            source: source.to_string_lossy().into_owned(),
                            options,
                        });
                    }
                    prepared[i] = Some(p);
                }
                pb::MountType::Tmpfs => {
                    let mut options = vec!["nosuid".to_string(), "nodev".into()];
                    if let Some(size) = m.tmpfs_opt.as_ref().map(|t| t.size).filter(|s| *s > 0) {
                        options.push(format!("size={size}"));
                    }
                    extra_mounts.push(spec::Mount {
                        destination: m.dest.clone(),
                        kind: "tmpfs".into(),
                        source: "tmpfs".into(),
                        options,
                    });
                }
                pb::MountType::Cache => {
                    let id = m
                        .cache_opt
                        .as_ref()
                        .map(|c| c.id.as_str())
                        .filter(|id| !id.is_empty())
                        .unwrap_or(&m.dest);
                    let sharing = m
                        .cache_opt
                        .as_ref()
                        .and_then(|c| pb::CacheSharingOpt::try_from(c.sharing).ok())
                        .unwrap_or(pb::CacheSharingOpt::Shared);
                    let description =
                        format!("cached mount {} from exec {}", m.dest, meta.args.join(" "));
                    let cache = self.cache_mounts.acquire(id, sharing, &description).await?;
                    if cache.created && m.input >= 0 {
                        // A new cache dir starts as the mount's input (the frontend's mkdir
                        // with uid/gid/mode, or `from=`).
                        let input = inputs.get(m.input as usize).cloned().flatten();
                        if input.is_some() {
                            let p = self.prepare_bind(trees, &mut guard, i, input, true)?;
                            let from = resolve_in_root(&p.view, &m.selector, true)
                                .map_err(io_err("resolve selector in", &p.view))?;
                            seed_cache(&from, &cache.path)?;
                        }
                    }
                    extra_mounts.push(spec::Mount {
                        destination: m.dest.clone(),
                        kind: "bind".into(),
                        source: cache.path.to_string_lossy().into_owned(),
                        options: vec!["rbind".into()],
                    });
                    guard.caches.push(cache);
                }
                pb::MountType::Secret => {
                    let mounts = guard
                        .session_mounts
                        .get_or_insert_with(|| SessionMounts::new(&bundle));
                    if let Some(mount) = mounts.secret(i, m, session.as_ref()).await? {
                        extra_mounts.push(mount);
                    }
                }
                pb::MountType::Ssh => {
                    let mounts = guard
                        .session_mounts
                        .get_or_insert_with(|| SessionMounts::new(&bundle));
                    if let Some(mount) = mounts.ssh(i, m, session.clone()).await? {
                        extra_mounts.push(mount);
                    }
                }
            }
        }
        let root = match &prepared[root_index] {
            Some(p) => p.view.clone(),
            None => return Err(invalid("root mount is not a bind mount")),
        };
        let root_readonly = op.mounts[root_index].readonly;

        // /etc/hosts and /etc/resolv.conf of the sandbox.
        let hostname = if meta.hostname.is_empty() {
            spec::DEFAULT_HOSTNAME
        } else {
            meta.hostname.as_str()
        };
        let extra_hosts: Vec<(String, String)> = meta
            .extra_hosts
            .iter()
            .map(|h| (h.host.clone(), h.ip.clone()))
            .collect();
        let hosts_path = bundle.join("hosts");
        fs::write(&hosts_path, spec::hosts_file(hostname, &extra_hosts))
            .map_err(io_err("write", &hosts_path))?;
        let resolv_path = bundle.join("resolv.conf");
        let resolv = fs::read("/etc/resolv.conf").unwrap_or_default();
        fs::write(&resolv_path, resolv).map_err(io_err("write", &resolv_path))?;
        for (dest, source) in [
            ("/etc/hosts", &hosts_path),
            ("/etc/resolv.conf", &resolv_path),
        ] {
            if !op.mounts.iter().any(|m| m.dest == dest) {
                extra_mounts.push(spec::Mount {
                    destination: dest.into(),
                    kind: "bind".into(),
                    source: source.to_string_lossy().into_owned(),
                    options: vec!["rbind".into(), "ro".into()],
                });
            }
        }
        // Parents before children, as runc mounts in order.
        extra_mounts.sort_by_key(|m| Path::new(&m.destination).components().count());

        // User and working directory, from the rootfs.
        let passwd = read_in_root(&root, "/etc/passwd");
        let group = read_in_root(&root, "/etc/group");
        let user = spec::resolve_user(&meta.user, &passwd, &group).map_err(invalid)?;
        let cwd = if meta.cwd.is_empty() {
            "/"
        } else {
            meta.cwd.as_str()
        };
        if !root_readonly {
            let host_cwd =
                resolve_in_root(&root, cwd, true).map_err(io_err("resolve cwd in", &root))?;
            mkdir_all(&host_cwd, 0o755, Some(user.uid), Some(user.gid))
                .map_err(io_err("create working directory", &host_cwd))?;
        }

        // Mount targets that do not exist yet: runc creates them in the rootfs, we remove them
        // afterwards so they do not end up in the layer.
        let mut stubs = Vec::new();
        if !root_readonly {
            let defaults = ["/proc", "/dev", "/sys"];
            for dest in defaults
                .iter()
                .map(|s| s.to_string())
                .chain(extra_mounts.iter().map(|m| m.destination.clone()))
            {
                collect_stubs(&root, &dest, &mut stubs);
            }
        }

        let mut env = meta.env.clone();
        // Secrets as environment variables: the spec holding them is written into the secrets
        // tmpfs instead of the bundle, so their values never touch a disk.
        let mut spec_dir = bundle.clone();
        if !op.secretenv.is_empty() {
            let mounts = guard
                .session_mounts
                .get_or_insert_with(|| SessionMounts::new(&bundle));
            if let Some(dir) = mounts
                .secret_env(&op.secretenv, session.as_ref(), &mut env)
                .await?
            {
                spec_dir = dir;
            }
        }
        if let Some(proxy) = &meta.proxy_env {
            for (names, value) in [
                (["HTTP_PROXY", "http_proxy"], &proxy.http_proxy),
                (["HTTPS_PROXY", "https_proxy"], &proxy.https_proxy),
                (["FTP_PROXY", "ftp_proxy"], &proxy.ftp_proxy),
                (["NO_PROXY", "no_proxy"], &proxy.no_proxy),
                (["ALL_PROXY", "all_proxy"], &proxy.all_proxy),
            ] {
                if !value.is_empty() {
                    for name in names {
                        env.push(format!("{name}={value}"));
                    }
                }
            }
        }
        let spec = spec::generate(SpecInput {
            args: &meta.args,
            env,
            cwd,
            user,
            hostname,
            rootfs: &root,
            readonly_root: root_readonly,
            host_network: op.network != pb::NetMode::None as i32,
            insecure: op.security == pb::SecurityMode::Insecure as i32,
            extra_mounts,
            ulimits: meta
                .ulimit
                .iter()
                .map(|u| (u.name.clone(), u.soft.max(0) as u64, u.hard.max(0) as u64))
                .collect(),
            nofile: self.nofile,
            rootless: self.rootless,
        });
        let config = spec_dir.join("config.json");
        let bytes = serde_json::to_vec_pretty(&spec).map_err(|e| Error::Io {
            op: "encode",
            path: config.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        fs::write(&config, bytes).map_err(io_err("write", &config))?;

        // Run.
        let container_id = format!("kiln-{exec_id}");
        let command = meta.args.join(" ");
        tracing::debug!(container = %container_id, %command, "running container");
        let mut runc = tokio::process::Command::new(&self.runc);
        if self.rootless {
            runc.args(["--rootless", "true"]);
        }
        let mut child = runc
            .arg("--root")
            .arg(&self.runc_state)
            .arg("run")
            .arg("--bundle")
            .arg(&spec_dir)
            .arg(&container_id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Runtime {
                id: container_id.clone(),
                reason: format!("cannot start {}", self.runc.display()),
                source: Some(e),
            })?;
        guard.container = Some((
            self.runc.clone(),
            self.runc_state.clone(),
            container_id.clone(),
        ));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (_, _, status) = tokio::join!(
            pump(stdout, 1, progress),
            pump(stderr, 2, progress),
            child.wait()
        );
        let status = status.map_err(|e| Error::Runtime {
            id: container_id.clone(),
            reason: "cannot wait for runc".into(),
            source: Some(e),
        })?;
        guard.delete_container();
        let exit_code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let ok = if meta.valid_exit_codes.is_empty() {
            exit_code == 0
        } else {
            meta.valid_exit_codes.contains(&exit_code)
        };
        if !ok {
            return Err(Error::ExecFailed { command, exit_code });
        }

        for stub in stubs.iter().rev() {
            remove_stub(stub);
        }
        guard.release_views();

        // Outputs, ordered by output index.
        let mut by_output: Vec<(i64, usize)> = op
            .mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| m.output >= 0)
            .map(|(i, m)| (m.output, i))
            .collect();
        by_output.sort();
        let mut outputs = Vec::with_capacity(by_output.len());
        for (_, i) in by_output {
            let Some(p) = prepared[i].as_ref() else {
                // tmpfs / cache / secret mounts have no snapshot output.
                outputs.push(None);
                continue;
            };
            match p.pending {
                Some(slot) => {
                    let pending = guard.pending[slot]
                        .take()
                        .ok_or_else(|| invalid("mount output committed twice"))?;
                    outputs.push(Some(pending.commit()?));
                }
                None => outputs.push(p.input.clone()),
            }
        }
        Ok(outputs)
    }

    fn prepare_bind(
        &self,
        trees: &dyn Trees,
        guard: &mut ExecGuard,
        index: usize,
        input: Option<SnapshotId>,
        readonly: bool,
    ) -> Result<Prepared, Error> {
        let target = guard.bundle.join(format!("mnt-{index}"));
        fs::create_dir_all(&target).map_err(io_err("create", &target))?;
        if readonly {
            let view = trees.view(input.as_ref(), &target)?;
            let path = view.path().to_path_buf();
            guard.views.push(view);
            return Ok(Prepared {
                view: path,
                pending: None,
                input,
            });
        }
        let active = trees.activate(input.as_ref(), &target)?;
        let view = active.path().to_path_buf();
        guard.pending.push(Some(active));
        Ok(Prepared {
            view,
            pending: Some(guard.pending.len() - 1),
            input,
        })
    }
}

async fn pump(reader: Option<impl AsyncRead + Unpin>, stream: i64, progress: &dyn ProgressSink) {
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => progress.log(stream, &buf[..n]),
            Err(e) => {
                tracing::debug!(stream, error = %e, "process output read failed");
                break;
            }
        }
    }
}

/// Copies the tree at `from` into a new cache directory, keeping owners and modes.
fn seed_cache(from: &Path, to: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(from).map_err(io_err("read", from))?;
    if !meta.is_dir() {
        return Ok(());
    }
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err("chmod", to))?;
        std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err("chown", to))?;
    }
    for entry in fs::read_dir(from).map_err(io_err("read", from))? {
        let entry = entry.map_err(io_err("read", from))?;
        let source = entry.path();
        crate::fsx::copy_tree(&source, &to.join(entry.file_name()), &Default::default())
            .map_err(io_err("copy", &source))?;
    }
    Ok(())
}

fn read_in_root(root: &Path, path: &str) -> String {
    resolve_in_root(root, path, true)
        .and_then(fs::read)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Records `dest` and its missing ancestors (outermost first) when absent from `root`.
fn collect_stubs(root: &Path, dest: &str, stubs: &mut Vec<PathBuf>) {
    let Ok(host) = resolve_in_root(root, dest, true) else {
        return;
    };
    let mut missing = Vec::new();
    let mut cursor = Some(host.as_path());
    while let Some(p) = cursor {
        if p == root || !p.starts_with(root) || fs::symlink_metadata(p).is_ok() {
            break;
        }
        missing.push(p.to_path_buf());
        cursor = p.parent();
    }
    for p in missing.into_iter().rev() {
        if !stubs.contains(&p) {
            stubs.push(p);
        }
    }
}

/// Removes a mount stub runc created, if it is still an empty file or directory.
fn remove_stub(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir(path);
        }
        Ok(m) if m.is_file() && m.len() == 0 => {
            let _ = fs::remove_file(path);
        }
        _ => {}
    }
}
