//! The `native` snapshotter, chosen automatically where overlayfs cannot be mounted: the worker
//! root is put inside an overlay mount (an overlay upper dir cannot live on overlayfs), so the
//! probe fails and the worker copies trees instead. Exec chains still give the right trees and
//! layers (whiteouts, opaque directories). Needs root, runc and the registry on 127.0.0.1:5000.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::registry::RegistryHosts;
use kiln_proto::pb;
use kiln_worker::{ProgressSink, Worker};
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

struct Quiet;

impl ProgressSink for Quiet {
    fn log(&self, _stream: i64, _data: &[u8]) {}
    fn status(&self, _id: &str, _name: &str, _current: u64, _total: Option<u64>, _done: bool) {}
}

/// An overlay mounted at `<dir>/m`, unmounted on drop.
struct OverlayMount(PathBuf);

impl OverlayMount {
    fn new(dir: &Path) -> Self {
        for d in ["l", "u", "w", "m"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        let options = format!("lowerdir={0}/l,upperdir={0}/u,workdir={0}/w", dir.display());
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(dir.join("m"))
            .status()
            .unwrap();
        assert!(status.success(), "mount overlay");
        Self(dir.join("m"))
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn exec(script: &str, input: i64) -> pb::ExecOp {
    pb::ExecOp {
        meta: Some(pb::Meta {
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: "/".into(),
            ..Default::default()
        }),
        mounts: vec![pb::Mount {
            input,
            dest: "/".into(),
            output: 0,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn native_snapshotter_is_chosen_when_overlay_cannot_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let overlay = OverlayMount::new(tmp.path());
    let root = overlay.0.join("root");
    let worker = OciWorker::open(OciWorkerConfig {
        root: root.clone(),
        runc_binary: PathBuf::from("/usr/sbin/runc"),
        registry_hosts: RegistryHosts::new(),
        labels: BTreeMap::new(),
        platforms: None,
    })
    .unwrap();
    assert_eq!(
        worker.labels()["org.mobyproject.buildkit.worker.snapshotter"],
        "native"
    );

    let reference = Reference::parse_normalized("127.0.0.1:5000/busybox:latest").unwrap();
    let image = worker
        .resolve_image(&reference, &Platform::host())
        .await
        .unwrap();
    let base = worker.pull(&image, &Quiet).await.unwrap().unwrap();
    let first = worker
        .exec(
            &exec(
                "rm /bin/ls && mkdir /new && echo one > /new/f && chown 3:4 /new/f",
                0,
            ),
            &[Some(base)],
            &Quiet,
        )
        .await
        .unwrap()[0]
        .clone()
        .unwrap();
    // A second step over the two-layer chain: sees the first one's changes.
    let second = worker
        .exec(
            &exec(
                "test ! -e /bin/ls && test \"$(cat /new/f)\" = one && rm -rf /new && mkdir /new && touch /new/g",
                0,
            ),
            &[Some(first.clone())],
            &Quiet,
        )
        .await
        .unwrap()[0]
        .clone()
        .unwrap();

    let view = worker.snapshot_path(&second).await.unwrap();
    assert!(!view.path().join("bin/ls").exists());
    assert!(view.path().join("bin/sh").exists());
    assert!(!view.path().join("new/f").exists());
    assert!(view.path().join("new/g").exists());
    let view_dir = view.path().to_path_buf();
    drop(view);
    assert!(!view_dir.exists(), "the copied view is removed");

    // The layers, as `tar` lists them.
    let layers = worker.layers(&second).await.unwrap();
    assert_eq!(layers.len(), image.manifest.layers.len() + 2);
    let listing = |index: usize| {
        let path = worker.content().path(&layers[index].descriptor.digest);
        let out = Command::new("tar")
            .args(["--numeric-owner", "-tvzf"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let first_layer = listing(layers.len() - 2);
    assert!(
        first_layer.lines().any(|l| l.ends_with("bin/.wh.ls")),
        "{first_layer}"
    );
    assert!(
        first_layer
            .lines()
            .any(|l| l.contains(" 3/4 ") && l.ends_with("new/f")),
        "{first_layer}"
    );
    assert!(
        !first_layer.contains("bin/sh"),
        "unchanged files stay out: {first_layer}"
    );
    let second_layer = listing(layers.len() - 1);
    // The replaced directory hides its old content: opaque, or a whiteout per old entry (when
    // the new directory got the old inode number back).
    assert!(
        second_layer
            .lines()
            .any(|l| l.ends_with("new/.wh..wh..opq") || l.ends_with("new/.wh.f")),
        "{second_layer}"
    );
    assert!(
        second_layer.lines().any(|l| l.ends_with("new/g")),
        "{second_layer}"
    );
    assert!(
        !second_layer.lines().any(|l| l.ends_with("new/f")),
        "{second_layer}"
    );
    drop(worker);
    drop(overlay);
}
