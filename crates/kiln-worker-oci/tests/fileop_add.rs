//! `ADD`'s archive extraction (`attemptUnpackDockerCompatibility`) in the OCI worker's FileOp,
//! against real snapshots (overlayfs when the action has a base). They need root.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_image::registry::RegistryHosts;
use kiln_proto::pb;
use kiln_proto::pb::file_action::Action;
use kiln_worker::{SnapshotId, Worker};
use kiln_worker_oci::{OciWorker, OciWorkerConfig};

fn open(root: &Path) -> OciWorker {
    OciWorker::open(OciWorkerConfig {
        root: root.to_path_buf(),
        runc_binary: PathBuf::from("/usr/sbin/runc"),
        registry_hosts: RegistryHosts::new(),
        labels: BTreeMap::new(),
        platforms: None,
    })
    .unwrap()
}

/// One entry of a test archive.
enum Entry<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

/// A plain tar of `entries`, owned by 4242:4343, mtime 1_000_000, names written raw (so `..`
/// can be tested).
fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(4242);
        header.set_gid(4343);
        header.set_mtime(1_000_000);
        let (name, data): (&str, &[u8]) = match entry {
            Entry::Dir(name, mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                (name, b"")
            }
            Entry::File(name, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                (name, data)
            }
            Entry::Symlink(name, target) | Entry::HardLink(name, target) => {
                header.set_entry_type(if matches!(entry, Entry::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                // Like tar(1): a hard link header carries the file's mode.
                header.set_mode(if matches!(entry, Entry::Symlink(..)) {
                    0o777
                } else {
                    0o644
                });
                header.set_size(0);
                let link = &mut header.as_old_mut().linkname;
                link[..target.len()].copy_from_slice(target.as_bytes());
                (name, b"")
            }
        };
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn bzip2(data: &[u8]) -> Vec<u8> {
    let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    lzma_rs::xz_compress(&mut std::io::Cursor::new(data), &mut out).unwrap();
    out
}

/// The copy action `ADD` compiles to for a local source.
fn add_action(src: &str, dest: &str, unpack: bool) -> pb::FileActionCopy {
    pb::FileActionCopy {
        src: src.into(),
        dest: dest.into(),
        mode: -1,
        timestamp: -1,
        follow_symlink: true,
        dir_copy_contents: true,
        attempt_unpack_docker_compatibility: unpack,
        create_dest_path: true,
        allow_wildcard: true,
        allow_empty_wildcard: true,
        ..Default::default()
    }
}

/// Runs one copy action per `(action)` chained on `base`, all reading from `context`.
async fn run_copies(
    worker: &OciWorker,
    base: Option<SnapshotId>,
    context: SnapshotId,
    copies: Vec<pb::FileActionCopy>,
) -> Result<SnapshotId, kiln_worker::Error> {
    let count = copies.len();
    let actions = copies
        .into_iter()
        .enumerate()
        .map(|(i, c)| pb::FileAction {
            input: if i == 0 { 0 } else { 1 + i as i64 },
            secondary_input: 1,
            output: if i + 1 == count { 0 } else { -1 },
            action: Some(Action::Copy(c)),
        })
        .collect();
    let out = worker
        .file(&pb::FileOp { actions }, &[base, Some(context)])
        .await?;
    Ok(out[0].clone().expect("an output snapshot"))
}

fn sample_entries() -> Vec<Entry<'static>> {
    vec![
        Entry::Dir("pkg/", 0o750),
        Entry::File("pkg/bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        Entry::File("pkg/README", b"read me\n", 0o644),
        Entry::Symlink("pkg/latest", "bin/tool"),
        Entry::HardLink("pkg/README.hard", "pkg/README"),
    ]
}

fn assert_sample(dir: &Path) {
    assert_eq!(
        fs::read(dir.join("pkg/bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    let readme = fs::symlink_metadata(dir.join("pkg/README")).unwrap();
    assert_eq!(readme.mode() & 0o7777, 0o644);
    assert_eq!((readme.uid(), readme.gid()), (4242, 4343));
    assert_eq!(readme.mtime(), 1_000_000);
    let hard = fs::symlink_metadata(dir.join("pkg/README.hard")).unwrap();
    assert_eq!(hard.ino(), readme.ino(), "hard link shares the inode");
    assert_eq!(
        fs::read_link(dir.join("pkg/latest")).unwrap(),
        PathBuf::from("bin/tool")
    );
    let pkg = fs::metadata(dir.join("pkg")).unwrap();
    assert_eq!(pkg.mode() & 0o7777, 0o750);
    assert_eq!(pkg.mtime(), 1_000_000, "directory times are set last");
    // A missing parent in the archive is created root-owned 0755.
    let bin = fs::metadata(dir.join("pkg/bin")).unwrap();
    assert_eq!((bin.mode() & 0o7777, bin.uid()), (0o755, 0));
}

#[tokio::test]
async fn add_extracts_plain_gzip_bzip2_and_xz_archives() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let ctx = tempfile::tempdir().unwrap();
    let tar = tar_of(&sample_entries());
    fs::write(ctx.path().join("plain.tar"), &tar).unwrap();
    fs::write(ctx.path().join("app.tar.gz"), gzip(&tar)).unwrap();
    fs::write(ctx.path().join("app.tar.bz2"), bzip2(&tar)).unwrap();
    fs::write(ctx.path().join("app.tar.xz"), xz(&tar)).unwrap();
    // The compression is found by content, not by name.
    fs::write(ctx.path().join("misnamed.txt"), gzip(&tar)).unwrap();
    let context = worker.snapshot_from_dir(ctx.path()).await.unwrap();

    // A base with an existing directory, so the actions run on an overlay mount.
    let base_dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(base_dir.path().join("opt/keep")).unwrap();
    fs::write(base_dir.path().join("opt/keep/old"), b"old\n").unwrap();
    let base = worker.snapshot_from_dir(base_dir.path()).await.unwrap();

    let out = run_copies(
        &worker,
        Some(base),
        context,
        vec![
            add_action("/plain.tar", "/opt/plain/", true),
            // No trailing slash: the destination is still a directory.
            add_action("/app.tar.gz", "/opt/gz", true),
            add_action("/app.tar.bz2", "/opt/bz2/", true),
            add_action("/app.tar.xz", "/opt/xz/", true),
            add_action("/misnamed.txt", "/opt/keep/", true),
        ],
    )
    .await
    .unwrap();
    let view = worker.snapshot_path(&out).await.unwrap();
    for kind in ["plain", "gz", "bz2", "xz"] {
        assert_sample(&view.path().join("opt").join(kind));
    }
    // Extracted into an existing directory, which keeps its other content.
    assert_sample(&view.path().join("opt/keep"));
    assert_eq!(
        fs::read(view.path().join("opt/keep/old")).unwrap(),
        b"old\n"
    );
    // The xz decoder's temporary file lives in the op's scratch dir, which is gone afterwards.
    let bundles = root.path().join("runc-overlayfs/executor/bundles");
    let left: Vec<String> = fs::read_dir(&bundles)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("file-"))
        .collect();
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

#[tokio::test]
async fn copy_keeps_archives_and_add_copies_non_archives() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let ctx = tempfile::tempdir().unwrap();
    let tar = tar_of(&sample_entries());
    let gz = gzip(&tar);
    fs::write(ctx.path().join("app.tar.gz"), &gz).unwrap();
    fs::write(ctx.path().join("notes.tar"), b"just text, not a tar\n").unwrap();
    // gzip magic, garbage after it.
    fs::write(ctx.path().join("broken.gz"), [0x1f, 0x8b, 0x08, 0, 1, 2, 3]).unwrap();
    fs::write(ctx.path().join("empty.tar"), b"").unwrap();
    std::os::unix::fs::symlink("app.tar.gz", ctx.path().join("link.tar.gz")).unwrap();
    let context = worker.snapshot_from_dir(ctx.path()).await.unwrap();

    let out = run_copies(
        &worker,
        None,
        context,
        vec![
            // COPY of an archive: no extraction.
            add_action("/app.tar.gz", "/copy/", false),
            add_action("/notes.tar", "/add/", true),
            add_action("/broken.gz", "/add/", true),
            add_action("/empty.tar", "/add/", true),
            // A symlink source is followed to the archive, as BuildKit's copy does.
            add_action("/link.tar.gz", "/linked/", true),
        ],
    )
    .await
    .unwrap();
    let view = worker.snapshot_path(&out).await.unwrap();
    let p = view.path();
    assert_eq!(fs::read(p.join("copy/app.tar.gz")).unwrap(), gz);
    assert!(!p.join("copy/pkg").exists());
    assert_eq!(
        fs::read(p.join("add/notes.tar")).unwrap(),
        b"just text, not a tar\n"
    );
    assert_eq!(
        fs::read(p.join("add/broken.gz")).unwrap(),
        [0x1f, 0x8b, 0x08, 0, 1, 2, 3]
    );
    assert!(p.join("add/empty.tar").is_file());
    assert_sample(&p.join("linked"));
}

#[tokio::test]
async fn chown_overrides_archive_owner() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let ctx = tempfile::tempdir().unwrap();
    fs::write(ctx.path().join("a.tar"), tar_of(&sample_entries())).unwrap();
    let context = worker.snapshot_from_dir(ctx.path()).await.unwrap();
    let owner = pb::ChownOpt {
        user: Some(pb::UserOpt {
            user: Some(pb::user_opt::User::ById(1234)),
        }),
        group: Some(pb::UserOpt {
            user: Some(pb::user_opt::User::ById(5678)),
        }),
    };
    let out = run_copies(
        &worker,
        None,
        context,
        vec![pb::FileActionCopy {
            owner: Some(owner),
            ..add_action("/a.tar", "/x/", true)
        }],
    )
    .await
    .unwrap();
    let view = worker.snapshot_path(&out).await.unwrap();
    for rel in [
        "x",
        "x/pkg",
        "x/pkg/README",
        "x/pkg/bin/tool",
        "x/pkg/latest",
    ] {
        let meta = fs::symlink_metadata(view.path().join(rel)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{rel}");
    }
    // The mode still comes from the archive.
    let tool = fs::metadata(view.path().join("x/pkg/bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o755);
}

#[tokio::test]
async fn hostile_archives_stay_inside_the_destination() {
    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let ctx = tempfile::tempdir().unwrap();
    fs::write(
        ctx.path().join("dotdot.tar"),
        tar_of(&[Entry::File("a/../../escape", b"x", 0o644)]),
    )
    .unwrap();
    fs::write(
        ctx.path().join("links.tar"),
        tar_of(&[
            Entry::Symlink("abs", "/"),
            Entry::File("abs/etc/evil", b"evil\n", 0o644),
            Entry::Symlink("up", "../../.."),
            Entry::File("up/upfile", b"up\n", 0o644),
            Entry::File("pre/passwd", b"through existing link\n", 0o644),
            Entry::HardLink("hard", "../../etc/hostname"),
        ]),
    )
    .unwrap();
    let context = worker.snapshot_from_dir(ctx.path()).await.unwrap();

    // The tree already has /dest/pre -> /etc and a real /etc/passwd.
    let base_dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(base_dir.path().join("etc")).unwrap();
    fs::write(
        base_dir.path().join("etc/passwd"),
        b"root:x:0:0::/root:/bin/sh\n",
    )
    .unwrap();
    fs::create_dir_all(base_dir.path().join("dest")).unwrap();
    std::os::unix::fs::symlink("/etc", base_dir.path().join("dest/pre")).unwrap();
    let base = worker.snapshot_from_dir(base_dir.path()).await.unwrap();

    let err = run_copies(
        &worker,
        Some(base.clone()),
        context.clone(),
        vec![add_action("/dotdot.tar", "/dest/", true)],
    )
    .await
    .unwrap_err();
    let chain = format!("{err:?}");
    assert!(
        chain.contains("outside extraction root"),
        "unexpected error: {chain}"
    );

    // A hard link out of the root is refused too.
    let err = run_copies(
        &worker,
        Some(base.clone()),
        context.clone(),
        vec![add_action("/links.tar", "/dest/", true)],
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:?}").contains("outside extraction root"),
        "{err:?}"
    );

    // Without the hard link, every symlinked path lands inside /dest.
    fs::write(
        ctx.path().join("links.tar"),
        tar_of(&[
            Entry::Symlink("abs", "/"),
            Entry::File("abs/etc/evil", b"evil\n", 0o644),
            Entry::Symlink("up", "../../.."),
            Entry::File("up/upfile", b"up\n", 0o644),
            Entry::File("pre/passwd", b"through existing link\n", 0o644),
        ]),
    )
    .unwrap();
    let context = worker.snapshot_from_dir(ctx.path()).await.unwrap();
    let out = run_copies(
        &worker,
        Some(base),
        context,
        vec![add_action("/links.tar", "/dest/", true)],
    )
    .await
    .unwrap();
    let view = worker.snapshot_path(&out).await.unwrap();
    let p = view.path();
    assert_eq!(fs::read(p.join("dest/etc/evil")).unwrap(), b"evil\n");
    assert!(!p.join("etc/evil").exists());
    assert_eq!(fs::read(p.join("dest/upfile")).unwrap(), b"up\n");
    assert!(!p.join("upfile").exists());
    assert_eq!(
        fs::read(p.join("dest/etc/passwd")).unwrap(),
        b"through existing link\n"
    );
    assert_eq!(
        fs::read(p.join("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n",
        "the tree's /etc/passwd is untouched"
    );
}

/// No base image is resolved in the compiled Dockerfiles below (`FROM scratch`).
struct NoImages;

#[async_trait::async_trait]
impl kiln_dockerfile::ImageMetaResolver for NoImages {
    async fn resolve(
        &self,
        reference: &kiln_image::reference::Reference,
        _platform: &kiln_image::oci::Platform,
    ) -> Result<(kiln_image::Digest, Vec<u8>), kiln_dockerfile::ResolveError> {
        Err(format!("unexpected image {reference}").into())
    }
}

/// Runs a compiled definition made only of local sources and file ops on the worker (a tiny
/// solver for the contract between the Dockerfile compiler and the worker).
async fn run_definition(
    worker: &OciWorker,
    definition: &pb::Definition,
    context: &Path,
) -> Option<SnapshotId> {
    let graph = kiln_llb::Graph::from_definition(definition).unwrap();
    let mut outputs: BTreeMap<String, Vec<Option<SnapshotId>>> = BTreeMap::new();
    for digest in graph.topological_order() {
        let op = graph.op(digest).unwrap();
        let inputs: Vec<Option<SnapshotId>> = graph
            .inputs(digest)
            .iter()
            .map(|r| outputs[&r.digest][r.index as usize].clone())
            .collect();
        let produced = match &op.op {
            Some(pb::op::Op::Source(s)) => {
                assert!(s.identifier.starts_with("local://"), "{}", s.identifier);
                vec![Some(worker.snapshot_from_dir(context).await.unwrap())]
            }
            Some(pb::op::Op::File(f)) => worker.file(f, &inputs).await.unwrap(),
            other => panic!("unexpected op {other:?}"),
        };
        outputs.insert(digest.clone(), produced);
    }
    let result = graph.result()?;
    outputs[&result.digest][result.index as usize].clone()
}

#[tokio::test]
async fn compiled_add_copy_and_heredoc_build_the_expected_tree() {
    let source = "FROM scratch\n\
        ENV NAME=kiln\n\
        ADD --chown=1000:1000 app.tar.gz /opt/\n\
        COPY app.tar.gz /raw/\n\
        ADD notes.txt /opt/notes/\n\
        COPY <<EOF /etc/greeting\n\
        hello $NAME\n\
        EOF\n";
    let dockerfile = kiln_dockerfile::parse(source).unwrap();
    let options = kiln_dockerfile::CompileOptions {
        source: source.as_bytes().to_vec(),
        ..Default::default()
    };
    let compiled = kiln_dockerfile::compile(&dockerfile, &options, &NoImages)
        .await
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let worker = open(root.path());
    let ctx = tempfile::tempdir().unwrap();
    let archive = gzip(&tar_of(&sample_entries()));
    fs::write(ctx.path().join("app.tar.gz"), &archive).unwrap();
    fs::write(ctx.path().join("notes.txt"), b"notes\n").unwrap();
    let out = run_definition(&worker, &compiled.definition, ctx.path())
        .await
        .expect("a result snapshot");
    let view = worker.snapshot_path(&out).await.unwrap();
    let p = view.path();
    // ADD extracted the archive, owned by --chown.
    assert_eq!(fs::read(p.join("opt/pkg/README")).unwrap(), b"read me\n");
    assert_eq!(fs::metadata(p.join("opt/pkg/README")).unwrap().uid(), 1000);
    assert!(!p.join("opt/app.tar.gz").exists());
    // COPY of the same archive did not.
    assert_eq!(fs::read(p.join("raw/app.tar.gz")).unwrap(), archive);
    // ADD of a plain file copies it.
    assert_eq!(fs::read(p.join("opt/notes/notes.txt")).unwrap(), b"notes\n");
    // The heredoc became a file, with the variable expanded.
    assert_eq!(fs::read(p.join("etc/greeting")).unwrap(), b"hello kiln\n");
    let greeting = fs::metadata(p.join("etc/greeting")).unwrap();
    assert_eq!(greeting.permissions().mode() & 0o777, 0o644);
}
