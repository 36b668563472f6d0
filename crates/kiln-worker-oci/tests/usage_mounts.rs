//! Usage records, prune and exec mounts (cache, tmpfs) against the real runc, overlayfs and the
//! registry on 127.0.0.1:5000. They need root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_proto::pb;
use kiln_worker::{NoProgress, RecordType, SnapshotId, Worker};
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";

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

async fn pull_busybox(worker: &OciWorker) -> SnapshotId {
    let reference = Reference::parse_normalized(IMAGE).unwrap();
    let image = worker
        .resolve_image(&reference, &Platform::host())
        .await
        .unwrap();
    worker.pull(&image, &NoProgress).await.unwrap().unwrap()
}

fn exec_op(script: &str, mut extra: Vec<pb::Mount>) -> pb::ExecOp {
    let mut mounts = vec![pb::Mount {
        input: 0,
        dest: "/".into(),
        output: 0,
        ..Default::default()
    }];
    mounts.append(&mut extra);
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts,
        ..Default::default()
    }
}

fn cache_mount(dest: &str, id: &str) -> pb::Mount {
    pb::Mount {
        input: -1,
        dest: dest.into(),
        output: -1,
        mount_type: pb::MountType::Cache as i32,
        cache_opt: Some(pb::CacheOpt {
            id: id.into(),
            sharing: pb::CacheSharingOpt::Shared as i32,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn usage_lists_snapshots_and_prune_keeps_what_is_held() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker).await;
    let out = worker
        .exec(
            &exec_op("echo hello > /greeting", vec![]),
            &[Some(base.clone())],
            &NoProgress,
        )
        .await
        .unwrap();
    let top = out[0].clone().unwrap();

    let usage = worker.usage().await.unwrap();
    let base_record = usage.iter().find(|u| u.id == base).unwrap();
    assert!(base_record.size > 100_000, "{base_record:?}");
    assert!(base_record.description.starts_with("pulled from "));
    let top_record = usage.iter().find(|u| u.id == top).unwrap();
    assert_eq!(top_record.parent.as_deref(), Some(base.as_str()));
    assert!(top_record.size >= 6, "{top_record:?}");
    assert_eq!(
        top_record.description,
        "mount / from exec /bin/sh -c echo hello > /greeting"
    );
    assert_eq!(top_record.record_type, RecordType::Regular);
    assert!(
        top_record.in_use,
        "a fresh output is protected until leased"
    );

    // Leased, then released: the fresh mark is gone and the lease decides.
    let lease = worker.hold(std::slice::from_ref(&top));
    let ids: Vec<SnapshotId> = usage.iter().map(|u| u.id.clone()).collect();
    assert!(worker.prune(&ids).await.unwrap().is_empty());
    drop(lease);
    worker.record_use(std::slice::from_ref(&top));
    let used = worker.usage().await.unwrap();
    let top_record = used.iter().find(|u| u.id == top).unwrap();
    assert_eq!(top_record.usage_count, 1);
    assert!(top_record.last_used.is_some());
    assert!(!top_record.in_use);

    // The base is the parent of a kept snapshot: asking for it alone removes nothing.
    assert!(worker
        .prune(std::slice::from_ref(&base))
        .await
        .unwrap()
        .is_empty());
    let removed = worker.prune(&ids).await.unwrap();
    assert!(
        removed.contains(&top) && removed.contains(&base),
        "{removed:?}"
    );
    assert!(!worker.exists(&top));
    assert!(!worker.exists(&base));
    assert!(worker.usage().await.unwrap().is_empty());
}

#[tokio::test]
async fn cache_mount_persists_and_tmpfs_stays_out_of_the_layer() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker).await;
    let first = exec_op(
        "echo one > /cache/kept && echo scratch > /scratch/file",
        vec![
            cache_mount("/cache", "test-cache"),
            pb::Mount {
                input: -1,
                dest: "/scratch".into(),
                output: -1,
                mount_type: pb::MountType::Tmpfs as i32,
                tmpfs_opt: Some(pb::TmpfsOpt { size: 1 << 20 }),
                ..Default::default()
            },
        ],
    );
    let out = worker
        .exec(&first, &[Some(base.clone())], &NoProgress)
        .await
        .unwrap();
    let snapshot = out[0].clone().unwrap();
    let upper = worker.snapshot_upper(&snapshot).unwrap();
    assert!(
        !upper.join("cache/kept").exists(),
        "cache content is not in the layer"
    );
    assert!(
        !upper.join("scratch/file").exists(),
        "tmpfs content is not in the layer"
    );

    // A second exec, on another cache id path, sees the file and an empty tmpfs.
    let second = exec_op(
        "cat /other/kept > /seen && ls -A /scratch | wc -l > /tmpfs-count",
        vec![
            cache_mount("/other", "test-cache"),
            pb::Mount {
                input: -1,
                dest: "/scratch".into(),
                output: -1,
                mount_type: pb::MountType::Tmpfs as i32,
                ..Default::default()
            },
        ],
    );
    let out = worker
        .exec(&second, &[Some(base.clone())], &NoProgress)
        .await
        .unwrap();
    let upper = worker.snapshot_upper(out[0].as_ref().unwrap()).unwrap();
    assert_eq!(
        std::fs::read_to_string(upper.join("seen")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("tmpfs-count"))
            .unwrap()
            .trim(),
        "0"
    );

    let usage = worker.usage().await.unwrap();
    let caches: Vec<_> = usage
        .iter()
        .filter(|u| u.record_type == RecordType::ExecCacheMount)
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    assert!(caches[0].mutable && !caches[0].in_use);
    assert_eq!(caches[0].usage_count, 2);
    assert_eq!(caches[0].size, 4);
    let removed = worker.prune(&[caches[0].id.clone()]).await.unwrap();
    assert_eq!(removed, vec![caches[0].id.clone()]);
}

#[tokio::test]
async fn new_cache_mount_takes_owner_and_mode_from_its_input() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker).await;
    let by_id = |n: u32| pb::UserOpt {
        user: Some(pb::user_opt::User::ById(n)),
    };
    // What the Dockerfile frontend makes of `uid=1000,gid=1001,mode=0700`.
    let settings = pb::FileOp {
        actions: vec![pb::FileAction {
            input: -1,
            secondary_input: -1,
            output: 0,
            action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                path: "/cache".into(),
                mode: 0o700,
                make_parents: false,
                owner: Some(pb::ChownOpt {
                    user: Some(by_id(1000)),
                    group: Some(by_id(1001)),
                }),
                timestamp: -1,
            })),
        }],
    };
    let dir = worker.file(&settings, &[]).await.unwrap()[0].clone();
    let mut mount = cache_mount("/c", "owned");
    mount.input = 1;
    mount.selector = "/cache".into();
    let op = exec_op("stat -c '%u %g %a' /c > /out", vec![mount]);
    let out = worker
        .exec(&op, &[Some(base), dir], &NoProgress)
        .await
        .unwrap();
    let upper = worker.snapshot_upper(out[0].as_ref().unwrap()).unwrap();
    assert_eq!(
        std::fs::read_to_string(upper.join("out")).unwrap(),
        "1000 1001 700\n"
    );
}
