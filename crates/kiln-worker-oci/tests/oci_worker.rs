//! Integration tests against the real runc (/usr/sbin/runc), kernel overlayfs and the registry on
//! 127.0.0.1:5000 holding 127.0.0.1:5000/busybox:latest. They need root.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::registry::{HostConfig, RegistryHosts};
use kiln_image::Digest;
use kiln_proto::pb;
use kiln_worker::{Error, ProgressSink, SnapshotId, Worker};
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";

#[derive(Default)]
struct Collect {
    logs: Mutex<Vec<(i64, Vec<u8>)>>,
    statuses: Mutex<Vec<(String, bool)>>,
}

impl Collect {
    fn stream(&self, stream: i64) -> String {
        let logs = self.logs.lock().unwrap();
        let bytes: Vec<u8> = logs
            .iter()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, d)| d.clone())
            .collect();
        String::from_utf8(bytes).unwrap()
    }
}

impl ProgressSink for Collect {
    fn log(&self, stream: i64, data: &[u8]) {
        self.logs.lock().unwrap().push((stream, data.to_vec()));
    }
    fn status(&self, id: &str, _name: &str, _current: u64, _total: Option<u64>, done: bool) {
        self.statuses.lock().unwrap().push((id.to_string(), done));
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
        labels: BTreeMap::from([("custom".to_string(), "yes".to_string())]),
        platforms: None,
    })
    .unwrap()
}

async fn pull_busybox(worker: &OciWorker, progress: &Collect) -> SnapshotId {
    let reference = Reference::parse_normalized(IMAGE).unwrap();
    let image = worker
        .resolve_image(&reference, &Platform::host())
        .await
        .unwrap();
    worker.pull(&image, progress).await.unwrap().unwrap()
}

fn exec_op(script: &str, mounts: Vec<pb::Mount>) -> pb::ExecOp {
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts,
        ..Default::default()
    }
}

fn root_mount(input: i64) -> pb::Mount {
    pb::Mount {
        input,
        dest: "/".into(),
        output: 0,
        ..Default::default()
    }
}

fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.canonicalize().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| Path::new(p).starts_with(&root))
        .collect()
}

fn assert_clean(root: &Path) {
    assert_eq!(
        mounts_under(root),
        Vec::<String>::new(),
        "mounts left behind"
    );
    let worker_dir = root.join("runc-overlayfs");
    let bundles: Vec<_> = fs::read_dir(worker_dir.join("executor/bundles"))
        .unwrap()
        .collect();
    assert!(bundles.is_empty(), "bundles left behind: {bundles:?}");
    let pending: Vec<_> = fs::read_dir(worker_dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(
        pending.is_empty(),
        "pending snapshots left behind: {pending:?}"
    );
    let containers: Vec<_> = fs::read_dir(worker_dir.join("executor/runc"))
        .unwrap()
        .collect();
    assert!(
        containers.is_empty(),
        "runc containers left behind: {containers:?}"
    );
}

fn is_whiteout(path: &Path) -> bool {
    let meta = fs::symlink_metadata(path).unwrap();
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn sha256_file(path: &Path) -> Digest {
    Digest::of(&fs::read(path).unwrap())
}

#[tokio::test]
async fn pull_exec_and_export_layers() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let labels = worker.labels();
    assert_eq!(labels["org.mobyproject.buildkit.worker.executor"], "oci");
    assert_eq!(
        labels["org.mobyproject.buildkit.worker.snapshotter"],
        "overlayfs"
    );
    assert_eq!(labels["org.mobyproject.buildkit.worker.network"], "host");
    assert_eq!(labels["custom"], "yes");

    let progress = Collect::default();
    let base = pull_busybox(&worker, &progress).await;
    assert!(worker.exists(&base));
    assert!(progress
        .statuses
        .lock()
        .unwrap()
        .iter()
        .any(|(_, done)| *done));
    // Same chain → same snapshot, nothing fetched again.
    assert_eq!(pull_busybox(&worker, &Collect::default()).await, base);

    let op = exec_op(
        "echo hello > /hello && rm /bin/true && echo to-stdout && echo to-stderr >&2",
        vec![root_mount(0)],
    );
    let outputs = worker.exec(&op, &[Some(base.clone())], &progress).await;
    let outputs = outputs.unwrap_or_else(|e| panic!("{e}: {}", progress.stream(2)));
    assert_eq!(outputs.len(), 1);
    let out = outputs[0].clone().unwrap();
    assert_ne!(out, base);
    assert_eq!(progress.stream(1), "to-stdout\n");
    assert_eq!(progress.stream(2), "to-stderr\n");

    let upper = worker.snapshot_upper(&out).unwrap();
    assert_eq!(fs::read_to_string(upper.join("hello")).unwrap(), "hello\n");
    assert!(is_whiteout(&upper.join("bin/true")));
    // Mount stubs (/etc/hosts, /proc, ...) do not leak into the layer.
    let mut top: Vec<_> = fs::read_dir(&upper)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert!(
        top.iter().all(|n| n == "hello" || n == "bin" || n == "etc"),
        "unexpected entries in upper: {top:?}"
    );
    if upper.join("etc").exists() {
        assert_eq!(fs::read_dir(upper.join("etc")).unwrap().count(), 0);
    }

    // The full tree: the new file and the removal are visible.
    let view = worker.snapshot_path(&out).await.unwrap();
    assert!(view.path().join("hello").is_file());
    assert!(!view.path().join("bin/true").exists());
    assert!(view.path().join("bin/sh").exists());
    drop(view);

    // Layers: bottom → top, pulled ones reuse the registry blob.
    let reference = Reference::parse_normalized(IMAGE).unwrap();
    let image = worker
        .resolve_image(&reference, &Platform::host())
        .await
        .unwrap();
    let layers = worker.layers(&out).await.unwrap();
    assert_eq!(layers.len(), image.manifest.layers.len() + 1);
    for (layer, original) in layers.iter().zip(&image.manifest.layers) {
        assert_eq!(&layer.descriptor, original);
    }
    for (layer, diff_id) in layers.iter().zip(&image.config.rootfs.diff_ids) {
        assert_eq!(&layer.diff_id, diff_id);
    }
    for layer in &layers {
        let path = worker.content().path(&layer.descriptor.digest);
        assert_eq!(sha256_file(&path), layer.descriptor.digest);
        assert_eq!(fs::metadata(&path).unwrap().len(), layer.descriptor.size);
    }
    let top_layer = layers.last().unwrap();
    let blob = fs::read(worker.content().path(&top_layer.descriptor.digest)).unwrap();
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(Digest::of(&tar_bytes), top_layer.diff_id);
    let names: Vec<String> = tar::Archive::new(&tar_bytes[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "hello"), "{names:?}");
    assert!(names.iter().any(|n| n == "bin/.wh.true"), "{names:?}");

    // A second export reuses the recorded blob: meta.json is not rewritten.
    let meta_path = root
        .path()
        .join("runc-overlayfs/snapshots")
        .join(&out)
        .join("meta.json");
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(&meta_path).unwrap()).unwrap();
    assert_eq!(
        meta["blob"]["digest"],
        top_layer.descriptor.digest.to_string()
    );
    assert_eq!(meta["parent"], base.as_str());
    let before = fs::metadata(&meta_path).unwrap().modified().unwrap();
    let blob_mtime = fs::metadata(worker.content().path(&top_layer.descriptor.digest))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(worker.layers(&out).await.unwrap(), layers);
    assert_eq!(
        fs::metadata(&meta_path).unwrap().modified().unwrap(),
        before
    );
    assert_eq!(
        fs::metadata(worker.content().path(&top_layer.descriptor.digest))
            .unwrap()
            .modified()
            .unwrap(),
        blob_mtime
    );

    assert_clean(root.path());
}

#[tokio::test]
async fn failing_exec_reports_exit_code_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker, &Collect::default()).await;
    let op = pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), "false".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts: vec![root_mount(0)],
        ..Default::default()
    };
    let err = worker
        .exec(&op, &[Some(base.clone())], &Collect::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ExecFailed { exit_code: 1, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "process \"/bin/sh -c false\" did not complete successfully: exit code: 1"
    );
    let err = worker
        .exec(
            &exec_op("exit 3", vec![root_mount(0)]),
            &[Some(base.clone())],
            &Collect::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ExecFailed { exit_code: 3, .. }),
        "{err:?}"
    );

    // valid exit codes turn a non-zero status into success.
    let mut op = exec_op("exit 3", vec![root_mount(0)]);
    op.meta.as_mut().unwrap().valid_exit_codes = vec![0, 3];
    assert!(worker
        .exec(&op, &[Some(base)], &Collect::default())
        .await
        .is_ok());
    assert_clean(root.path());
}

#[tokio::test]
async fn exec_user_cwd_and_readonly_mount_with_selector() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker, &Collect::default()).await;
    let ctx = tempfile::tempdir().unwrap();
    fs::create_dir(ctx.path().join("sub")).unwrap();
    fs::write(ctx.path().join("sub/data.txt"), b"from-context\n").unwrap();
    let dir_snapshot = worker.snapshot_from_dir(ctx.path()).await.unwrap();

    let mut op = exec_op(
        "cat /src/data.txt; id -u; id -g; pwd; hostname; touch /src/x 2>/dev/null || echo read-only",
        vec![
            root_mount(0),
            pb::Mount {
                input: 1,
                dest: "/src".into(),
                selector: "/sub".into(),
                readonly: true,
                output: -1,
                ..Default::default()
            },
        ],
    );
    {
        let meta = op.meta.as_mut().unwrap();
        meta.user = "nobody".into();
        meta.cwd = "/work/dir".into();
    }
    let progress = Collect::default();
    let outputs = worker
        .exec(&op, &[Some(base), Some(dir_snapshot)], &progress)
        .await
        .unwrap();
    assert_eq!(
        progress.stream(1),
        "from-context\n65534\n65534\n/work/dir\nbuildkitsandbox\nread-only\n"
    );
    let upper = worker.snapshot_upper(outputs[0].as_ref().unwrap()).unwrap();
    let cwd = fs::metadata(upper.join("work/dir")).unwrap();
    assert_eq!(cwd.uid(), 65534);
    // The mount point of /src was created by runc and removed afterwards.
    assert!(!upper.join("src").exists());
    assert_clean(root.path());
}

fn copy_action(src: &str, dest: &str) -> pb::FileActionCopy {
    pb::FileActionCopy {
        src: src.into(),
        dest: dest.into(),
        mode: -1,
        timestamp: -1,
        dir_copy_contents: true,
        create_dest_path: true,
        follow_symlink: true,
        allow_wildcard: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn file_ops_chain_over_an_image() {
    use pb::file_action::Action;
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker, &Collect::default()).await;
    let ctx = tempfile::tempdir().unwrap();
    fs::create_dir(ctx.path().join("a")).unwrap();
    fs::write(ctx.path().join("a/b.txt"), b"bee\n").unwrap();
    fs::write(ctx.path().join("x.txt"), b"ex\n").unwrap();
    fs::write(ctx.path().join("y.md"), b"why\n").unwrap();
    std::os::unix::fs::symlink("x.txt", ctx.path().join("link")).unwrap();
    let dir_snapshot = worker.snapshot_from_dir(ctx.path()).await.unwrap();

    // 0: copy context into /app/; 1: copy *.txt into /txt/ (owner 1000); 2: mkfile; 3: rm /bin/ls,
    // chained through action outputs (input index = 2 + action index).
    let op = pb::FileOp {
        actions: vec![
            pb::FileAction {
                input: 0,
                secondary_input: 1,
                output: -1,
                action: Some(Action::Copy(copy_action("/", "/app/"))),
            },
            pb::FileAction {
                input: 2,
                secondary_input: 1,
                output: -1,
                action: Some(Action::Copy(pb::FileActionCopy {
                    owner: Some(pb::ChownOpt {
                        user: Some(pb::UserOpt {
                            user: Some(pb::user_opt::User::ById(1000)),
                        }),
                        group: None,
                    }),
                    ..copy_action("/*.txt", "/txt/")
                })),
            },
            pb::FileAction {
                input: 3,
                secondary_input: -1,
                output: -1,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: "/app/new".into(),
                    mode: 0o600,
                    data: b"new".to_vec(),
                    timestamp: -1,
                    ..Default::default()
                })),
            },
            pb::FileAction {
                input: 4,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Rm(pb::FileActionRm {
                    path: "/bin/ls".into(),
                    ..Default::default()
                })),
            },
        ],
    };
    let outputs = worker
        .file(&op, &[Some(base.clone()), Some(dir_snapshot)])
        .await
        .unwrap();
    assert_eq!(outputs.len(), 1);
    let out = outputs[0].clone().unwrap();
    let upper = worker.snapshot_upper(&out).unwrap();
    assert_eq!(fs::read(upper.join("app/a/b.txt")).unwrap(), b"bee\n");
    assert_eq!(fs::read(upper.join("app/x.txt")).unwrap(), b"ex\n");
    assert_eq!(
        fs::read_link(upper.join("app/link")).unwrap(),
        Path::new("x.txt")
    );
    assert_eq!(fs::read(upper.join("txt/x.txt")).unwrap(), b"ex\n");
    assert!(!upper.join("txt/y.md").exists());
    let txt = fs::metadata(upper.join("txt/x.txt")).unwrap();
    assert_eq!((txt.uid(), txt.gid()), (1000, 1000));
    let new = fs::metadata(upper.join("app/new")).unwrap();
    assert_eq!(new.mode() & 0o777, 0o600);
    assert!(is_whiteout(&upper.join("bin/ls")));
    // Every action wrote to the same upper: the result sits directly on the image.
    let meta: serde_json::Value = serde_json::from_slice(
        &fs::read(
            root.path()
                .join("runc-overlayfs/snapshots")
                .join(&out)
                .join("meta.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(meta["parent"], base.as_str());

    // The result runs.
    let progress = Collect::default();
    worker
        .exec(
            &exec_op(
                "cat /app/a/b.txt /txt/x.txt; test -e /bin/ls || echo no-ls",
                vec![root_mount(0)],
            ),
            &[Some(out)],
            &progress,
        )
        .await
        .unwrap();
    assert_eq!(progress.stream(1), "bee\nex\nno-ls\n");

    // Missing sources are errors unless empty wildcards are allowed.
    let missing = |allow_empty: bool| pb::FileOp {
        actions: vec![pb::FileAction {
            input: 0,
            secondary_input: 1,
            output: 0,
            action: Some(Action::Copy(pb::FileActionCopy {
                allow_empty_wildcard: allow_empty,
                ..copy_action("/*.nothing", "/none/")
            })),
        }],
    };
    let dir_snapshot = worker.snapshot_from_dir(ctx.path()).await.unwrap();
    let inputs = [Some(base.clone()), Some(dir_snapshot)];
    assert!(worker.file(&missing(false), &inputs).await.is_err());
    assert!(worker.file(&missing(true), &inputs).await.is_ok());
    assert_clean(root.path());
}

#[tokio::test]
async fn file_ops_on_scratch_and_escape_attempts() {
    use pb::file_action::Action;
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let op = pb::FileOp {
        actions: vec![
            pb::FileAction {
                input: -1,
                secondary_input: -1,
                output: -1,
                action: Some(Action::Mkdir(pb::FileActionMkDir {
                    path: "/a/b".into(),
                    mode: 0o750,
                    make_parents: true,
                    timestamp: -1,
                    ..Default::default()
                })),
            },
            pb::FileAction {
                input: 0,
                secondary_input: -1,
                output: -1,
                action: Some(Action::Symlink(pb::FileActionSymlink {
                    oldpath: "../../../../../../a/b".into(),
                    newpath: "/a/escape".into(),
                    timestamp: -1,
                    ..Default::default()
                })),
            },
            pb::FileAction {
                input: 1,
                secondary_input: -1,
                output: 0,
                action: Some(Action::Mkfile(pb::FileActionMkFile {
                    path: "/a/escape/kiln-escape-test".into(),
                    mode: 0o644,
                    data: b"x".to_vec(),
                    timestamp: 1_000_000_000_000_000_000,
                    ..Default::default()
                })),
            },
        ],
    };
    let outputs = worker.file(&op, &[]).await.unwrap();
    let out = outputs[0].clone().unwrap();
    let upper = worker.snapshot_upper(&out).unwrap();
    assert_eq!(
        fs::metadata(upper.join("a/b")).unwrap().mode() & 0o777,
        0o750
    );
    // The symlink resolved inside the snapshot (its `..` stop at the root), not on the host.
    assert!(!Path::new("/a/b/kiln-escape-test").exists());
    let file = upper.join("a/b/kiln-escape-test");
    assert_eq!(fs::read(&file).unwrap(), b"x");
    assert_eq!(fs::metadata(&file).unwrap().mtime(), 1_000_000_000);
    let layers = worker.layers(&out).await.unwrap();
    assert_eq!(layers.len(), 1);
    assert_clean(root.path());
}

#[tokio::test]
async fn cancelled_exec_cleans_up() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let base = pull_busybox(&worker, &Collect::default()).await;
    let op = exec_op("echo started; sleep 60", vec![root_mount(0)]);
    let progress = Collect::default();
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        worker.exec(&op, &[Some(base)], &progress),
    )
    .await;
    assert!(result.is_err(), "exec should have been cancelled");
    assert_eq!(progress.stream(1), "started\n");
    assert_clean(root.path());
    // No process of the container survives.
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout)
        .lines()
        .any(|l| l.trim() == "sleep 60"));
}

#[tokio::test]
async fn reopen_removes_crash_leftovers() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let id = worker.id().to_string();
    let snapshots = root.path().join("runc-overlayfs/snapshots");
    fs::create_dir_all(snapshots.join(".tmp-crashed/fs")).unwrap();
    let bundle = root.path().join("runc-overlayfs/executor/bundles/old");
    fs::create_dir_all(&bundle).unwrap();
    drop(worker);
    let worker = open(root.path());
    assert_eq!(worker.id(), id);
    assert!(!snapshots.join(".tmp-crashed").exists());
    assert!(!bundle.exists());
}
