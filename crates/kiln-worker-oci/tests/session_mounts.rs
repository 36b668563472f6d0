//! `type=secret` mounts and `SecretEnv` on the real runc with an in-process [`ExecSession`]:
//! the value is readable with the requested owner and mode, the target leaves nothing in the
//! output snapshot, an optional missing secret is skipped, a required one fails naming its id,
//! and no session value lands anywhere under the worker's root. Needs root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_proto::pb;
use kiln_worker::{Error, ExecSession, NoProgress, SessionError, Worker};
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

const VALUE: &str = "worker-test-secret-5c1f0e";

#[derive(Debug)]
struct FakeSession;

#[async_trait::async_trait]
impl ExecSession for FakeSession {
    async fn secret(&self, id: &str) -> Result<Option<Vec<u8>>, SessionError> {
        Ok((id == "known").then(|| VALUE.as_bytes().to_vec()))
    }
    async fn has_ssh_agent(&self, _id: &str) -> Result<bool, SessionError> {
        Ok(false)
    }
    async fn forward_ssh(
        &self,
        _id: &str,
        _conn: std::os::unix::net::UnixStream,
    ) -> Result<(), SessionError> {
        Err("no agents".into())
    }
}

fn open(root: &Path) -> OciWorker {
    let hosts = RegistryHosts::new().with(
        "127.0.0.1:5000",
        HostConfig {
            http: true,
            insecure: false,
        },
    );
    OciWorker::open(OciWorkerConfig {
        root: root.to_path_buf(),
        runc_binary: PathBuf::from("/usr/sbin/runc"),
        registry_hosts: hosts,
        labels: BTreeMap::new(),
        platforms: None,
    })
    .unwrap()
}

fn secret(dest: &str, id: &str, optional: bool) -> pb::Mount {
    pb::Mount {
        input: -1,
        dest: dest.into(),
        output: -1,
        mount_type: pb::MountType::Secret as i32,
        secret_opt: Some(pb::SecretOpt {
            id: id.into(),
            uid: 1000,
            gid: 1000,
            mode: 0o440,
            optional,
        }),
        ..Default::default()
    }
}

fn op(script: &str, mut mounts: Vec<pb::Mount>, secret_env: Vec<pb::SecretEnv>) -> pb::ExecOp {
    mounts.insert(
        0,
        pb::Mount {
            input: 0,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        },
    );
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts,
        secretenv: secret_env,
        ..Default::default()
    }
}

fn holds(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => found.extend(holds(&path, needle)),
            Ok(t) if t.is_file() => {
                if let Ok(data) = std::fs::read(&path) {
                    if data.windows(needle.len()).any(|w| w == needle) {
                        found.push(path);
                    }
                }
            }
            _ => {}
        }
    }
    found
}

#[tokio::test]
async fn secrets_are_mounted_from_the_session_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let worker = open(dir.path());
    let reference = Reference::parse_normalized("127.0.0.1:5000/busybox:latest").unwrap();
    let image = worker
        .resolve_image(&reference, &Platform::host())
        .await
        .unwrap();
    let base = worker.pull(&image, &NoProgress).await.unwrap().unwrap();
    let session: Arc<dyn ExecSession> = Arc::new(FakeSession);

    // The command holds a digest only: it is recorded in snapshot descriptions.
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(VALUE.as_bytes()));
    let run = op(
        &format!(
            "test \"$(sha256sum < /run/secrets/known | cut -d' ' -f1)\" = {sum} \
             && test \"$(stat -c %a:%u:%g /run/secrets/known)\" = 440:1000:1000 \
             && test \"$(printf %s \"$TOKEN\" | sha256sum | cut -d' ' -f1)\" = {sum} \
             && ! test -e /run/secrets/other && echo ok > /ok"
        ),
        vec![
            secret("/run/secrets/known", "known", false),
            secret("/run/secrets/other", "other", true),
        ],
        vec![pb::SecretEnv {
            id: "known".into(),
            name: "TOKEN".into(),
            optional: false,
        }],
    );
    let outputs = worker
        .exec_in_session(&run, &[Some(base.clone())], session.clone(), &NoProgress)
        .await
        .unwrap();
    let upper = worker.snapshot_upper(outputs[0].as_ref().unwrap()).unwrap();
    assert!(upper.join("ok").exists());
    assert!(
        !upper.join("run").exists(),
        "the secret mount target reached the snapshot"
    );
    assert_eq!(holds(dir.path(), VALUE.as_bytes()), Vec::<PathBuf>::new());

    let missing = op(
        "true",
        vec![secret("/run/secrets/npm", "npm", false)],
        Vec::new(),
    );
    let err = worker
        .exec_in_session(
            &missing,
            &[Some(base.clone())],
            session.clone(),
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::SecretNotFound { id } if id == "npm"),
        "{err}"
    );
    // Without a session (plain `exec`), a required secret is missing too.
    let err = worker
        .exec(&run, &[Some(base)], &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SecretNotFound { .. }), "{err}");
}
