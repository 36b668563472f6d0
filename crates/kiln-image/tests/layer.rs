//! Layer apply/diff round trips and hostile tars, on real directories (needs root for mknod,
//! chown and `trusted.*` xattrs).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_image::layer::{self, Error};
use kiln_image::Digest;
use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::{EntryType, Header};

fn set_mtime(path: &Path, secs: i64) {
    let ts = TimeSpec::new(secs, 0);
    utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink).unwrap();
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

const LONG_DIR: &str = "deep/dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

fn long_file_name() -> String {
    format!("{LONG_DIR}/{}", "f".repeat(120))
}

/// An overlay upper dir with every kind of entry.
fn make_upper(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    xattr::set(root.join("etc/passwd"), "user.kiln", b"hello").unwrap();
    fs::create_dir(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), vec![7u8; 5000]).unwrap();
    std::os::unix::fs::chown(root.join("bin/tool"), Some(1000), Some(1001)).unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(root.join("bin/tool"), root.join("bin/tool2")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
    std::os::unix::fs::symlink("x".repeat(150), root.join("longlink")).unwrap();
    mknod(
        &root.join("fifo"),
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    mknod(
        &root.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    mknod(
        &root.join("removed"),
        SFlag::S_IFCHR,
        Mode::empty(),
        makedev(0, 0),
    )
    .unwrap();
    fs::create_dir(root.join("opq")).unwrap();
    fs::write(root.join("opq/keep"), "kept").unwrap();
    xattr::set(root.join("opq"), "trusted.overlay.opaque", b"y").unwrap();
    fs::create_dir_all(root.join(LONG_DIR)).unwrap();
    fs::write(root.join(long_file_name()), "long").unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o700)).unwrap();
    // Fixed times, children before parents.
    let mut paths: Vec<_> = walkdir(root);
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in paths.iter().enumerate() {
        set_mtime(p, 1_600_000_000 + i as i64);
    }
}

fn walkdir(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walkdir(&p));
        }
        out.push(p);
    }
    out
}

fn entry_names(tar_bytes: &[u8]) -> Vec<(String, EntryType, Option<String>)> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                e.header().entry_type(),
                e.link_name_bytes()
                    .map(|l| String::from_utf8(l.into_owned()).unwrap()),
            )
        })
        .collect()
}

#[test]
fn diff_then_apply_round_trips_every_entry_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    make_upper(&upper);

    let mut blob = Vec::new();
    let info = layer::diff_upper(&upper, &mut blob).unwrap();
    assert_eq!(info.digest, Digest::of(&blob));
    assert_eq!(info.size, blob.len() as u64);
    let tar_bytes = gunzip(&blob);
    assert_eq!(info.diff_id, Digest::of(&tar_bytes));

    // Deterministic: a second diff of the same tree gives the same bytes.
    let mut again = Vec::new();
    assert_eq!(layer::diff_upper(&upper, &mut again).unwrap(), info);
    assert_eq!(again, blob);

    let names = entry_names(&tar_bytes);
    let only: Vec<&str> = names.iter().map(|(n, _, _)| n.as_str()).collect();
    let long = long_file_name();
    let expected = vec![
        "bin/",
        "bin/tool",
        "bin/tool2",
        "deep/",
        "deep/dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd/",
        LONG_DIR,
        &long,
        "empty/",
        "etc/",
        "etc/passwd",
        "fifo",
        "link",
        "longlink",
        "null",
        "opq/",
        "opq/.wh..wh..opq",
        "opq/keep",
        ".wh.removed",
    ];
    // Directories carry a trailing slash in the tar; the long directory too.
    let expected: Vec<String> = expected
        .into_iter()
        .map(|s| {
            if s == LONG_DIR {
                format!("{s}/")
            } else {
                s.to_owned()
            }
        })
        .collect();
    assert_eq!(only, expected);
    let tool2 = names.iter().find(|(n, _, _)| n == "bin/tool2").unwrap();
    assert_eq!(tool2.1, EntryType::Link);
    assert_eq!(tool2.2.as_deref(), Some("bin/tool"));
    let wh = names.iter().find(|(n, _, _)| n == ".wh.removed").unwrap();
    assert_eq!(wh.1, EntryType::Regular);
    let ll = names.iter().find(|(n, _, _)| n == "longlink").unwrap();
    assert_eq!(ll.2.as_deref(), Some("x".repeat(150).as_str()));

    // Apply the compressed blob and compare trees.
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let applied = layer::apply(&blob[..], &dest).unwrap();
    assert_eq!(applied.diff_id, info.diff_id);
    for path in walkdir(&upper) {
        let rel = path.strip_prefix(&upper).unwrap();
        let a = fs::symlink_metadata(&path).unwrap();
        let b = fs::symlink_metadata(dest.join(rel))
            .unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert_eq!(a.file_type(), b.file_type(), "{}", rel.display());
        assert_eq!(a.uid(), b.uid(), "{}", rel.display());
        assert_eq!(a.gid(), b.gid(), "{}", rel.display());
        assert_eq!(a.mtime(), b.mtime(), "{}", rel.display());
        if !a.file_type().is_symlink() {
            assert_eq!(a.mode(), b.mode(), "{}", rel.display());
        }
        if a.file_type().is_char_device() {
            assert_eq!(a.rdev(), b.rdev(), "{}", rel.display());
        }
        if a.is_file() {
            assert_eq!(fs::read(&path).unwrap(), fs::read(dest.join(rel)).unwrap());
        }
        if a.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&path).unwrap(),
                fs::read_link(dest.join(rel)).unwrap()
            );
        }
    }
    assert_eq!(walkdir(&upper).len(), walkdir(&dest).len());
    assert_eq!(
        xattr::get(dest.join("etc/passwd"), "user.kiln")
            .unwrap()
            .as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        xattr::get(dest.join("opq"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!dest.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        fs::metadata(dest.join("bin/tool")).unwrap().ino(),
        fs::metadata(dest.join("bin/tool2")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(dest.join("bin/tool")).unwrap().mode() & 0o7777,
        0o4755
    );

    // The applied tree diffs to the very same blob.
    let mut third = Vec::new();
    assert_eq!(layer::diff_upper(&dest, &mut third).unwrap(), info);

    // A plain (uncompressed) tar applies too, with the same diff id.
    let dest2 = tmp.path().join("dest2");
    fs::create_dir(&dest2).unwrap();
    assert_eq!(
        layer::apply(&tar_bytes[..], &dest2).unwrap().diff_id,
        info.diff_id
    );
    assert!(dest2.join(long_file_name()).is_file());
}

#[test]
fn empty_upper_gives_an_empty_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let mut blob = Vec::new();
    let info = layer::diff_upper(tmp.path(), &mut blob).unwrap();
    assert_eq!(gunzip(&blob), vec![0u8; 1024]);
    assert_eq!(info.diff_id, Digest::of(&[0u8; 1024]));
}

/// A tar built by hand so that names the `tar` crate refuses (`..`, absolute) can be written.
struct RawTar(Vec<u8>);

impl RawTar {
    fn new() -> Self {
        Self(Vec::new())
    }

    fn entry(mut self, name: &str, kind: EntryType, link: &str, data: &[u8]) -> Self {
        let mut h = Header::new_ustar();
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name, EntryType::Regular, "", data)
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// A destination inside a sandbox, with an `outside` directory next to it.
fn sandbox() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let outside = tmp.path().join("outside");
    fs::create_dir(&dest).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), "secret").unwrap();
    (tmp, dest, outside)
}

fn assert_unsafe(result: Result<layer::LayerApplied, Error>, what: &str) {
    match result {
        Err(Error::UnsafePath { .. }) => {}
        other => panic!("{what}: expected an unsafe path error, got {other:?}"),
    }
}

#[test]
fn dot_dot_components_are_rejected() {
    for name in ["../evil", "a/../../evil", "./../evil", "a/b/../../../evil"] {
        let (tmp, dest, _) = sandbox();
        let tar = RawTar::new().file(name, b"x").finish();
        assert_unsafe(layer::apply(&tar[..], &dest), name);
        assert!(!tmp.path().join("evil").exists(), "{name}");
    }
}

#[test]
fn absolute_paths_land_inside_dest() {
    let (_tmp, dest, _) = sandbox();
    let tar = RawTar::new().file("/abs/file", b"inside").finish();
    layer::apply(&tar[..], &dest).unwrap();
    assert_eq!(fs::read(dest.join("abs/file")).unwrap(), b"inside");
}

#[test]
fn entries_below_a_symlink_are_rejected() {
    let (_tmp, dest, outside) = sandbox();
    let target = outside.to_str().unwrap();
    let tar = RawTar::new()
        .entry("link", EntryType::Symlink, target, b"")
        .file("link/evil", b"x")
        .finish();
    assert_unsafe(
        layer::apply(&tar[..], &dest),
        "write through absolute symlink",
    );
    assert!(!outside.join("evil").exists());

    let (_tmp, dest, outside) = sandbox();
    let tar = RawTar::new()
        .entry("rel", EntryType::Symlink, "../outside", b"")
        .entry("rel/sub", EntryType::Directory, "", b"")
        .finish();
    assert_unsafe(
        layer::apply(&tar[..], &dest),
        "mkdir through relative symlink",
    );
    assert!(!outside.join("sub").exists());
}

#[test]
fn hard_links_must_stay_inside_dest() {
    let (_tmp, dest, _) = sandbox();
    let tar = RawTar::new()
        .entry("x", EntryType::Link, "../outside/secret", b"")
        .finish();
    assert_unsafe(layer::apply(&tar[..], &dest), "hard link with ..");

    let (_tmp, dest, _) = sandbox();
    let tar = RawTar::new()
        .entry("rel", EntryType::Symlink, "../outside", b"")
        .entry("x", EntryType::Link, "rel/secret", b"")
        .finish();
    assert_unsafe(layer::apply(&tar[..], &dest), "hard link through symlink");
    assert!(!dest.join("x").exists());

    // An absolute link name refers to dest's root, like entry names.
    let (_tmp, dest, _) = sandbox();
    let tar = RawTar::new()
        .file("a", b"data")
        .entry("b", EntryType::Link, "/a", b"")
        .finish();
    layer::apply(&tar[..], &dest).unwrap();
    assert_eq!(
        fs::metadata(dest.join("a")).unwrap().ino(),
        fs::metadata(dest.join("b")).unwrap().ino()
    );
}

#[test]
fn a_file_replacing_a_symlink_does_not_write_through_it() {
    let (_tmp, dest, outside) = sandbox();
    let target = outside.join("secret");
    let tar = RawTar::new()
        .entry("f", EntryType::Symlink, target.to_str().unwrap(), b"")
        .file("f", b"replaced")
        .finish();
    layer::apply(&tar[..], &dest).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"secret");
    let meta = fs::symlink_metadata(dest.join("f")).unwrap();
    assert!(meta.is_file());
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"replaced");
}

#[test]
fn oci_whiteouts_become_overlay_whiteouts() {
    let (_tmp, dest, _) = sandbox();
    fs::create_dir_all(dest.join("gone/sub")).unwrap();
    fs::write(dest.join("gone/sub/file"), "x").unwrap();
    let tar = RawTar::new()
        .file(".wh.gone", b"")
        .entry("d/", EntryType::Directory, "", b"")
        .file("d/.wh..wh..opq", b"")
        .file("d/new", b"n")
        .finish();
    layer::apply(&tar[..], &dest).unwrap();
    let meta = fs::symlink_metadata(dest.join("gone")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), 0);
    assert!(!dest.join(".wh.gone").exists());
    assert_eq!(
        xattr::get(dest.join("d"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(dest.join("d/new").is_file());

    for bad in [".wh..", "d/.wh."] {
        let (_tmp, dest, _) = sandbox();
        let tar = RawTar::new().file(bad, b"").finish();
        assert_unsafe(layer::apply(&tar[..], &dest), bad);
    }
}

#[test]
fn garbage_is_a_read_error() {
    let (_tmp, dest, _) = sandbox();
    let err = layer::apply(&[0x1f, 0x8b, 1, 2, 3][..], &dest).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
    let err = layer::apply(&[b'x'; 700][..], &dest).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err}");
}

#[test]
fn gnu_tar_reads_the_layer_with_long_names_and_whiteouts() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    let blob_path = tmp.path().join("layer.tar.gz");
    let info = layer::diff_upper(&upper, fs::File::create(&blob_path).unwrap()).unwrap();
    assert_eq!(info.size, fs::metadata(&blob_path).unwrap().len());
    let out = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(&blob_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert!(lines.contains(&long_file_name().as_str()), "{listing}");
    assert!(lines.contains(&".wh.removed"), "{listing}");
    assert!(lines.contains(&"opq/.wh..wh..opq"), "{listing}");
    assert!(!listing.contains("PaxHeaders"), "{listing}");
}
