//! The `native` snapshotter: trees assembled by copying instead of mounting.
//!
//! Snapshots keep their own changes per directory as with overlayfs, but removed entries and
//! opaque directories are recorded as the OCI whiteout files themselves (`.wh.NAME`,
//! `.wh..wh..opq`; [`OverlayXattrs::Files`]): the native snapshotter is the fallback where
//! overlayfs cannot be mounted, often because the root is itself on overlayfs, which refuses both
//! whiteout devices and overlay xattrs. A tree of a chain is a copy of its `fs` dirs merged bottom
//! to top ([`materialize`]); a writable tree records the identity of every entry it started with
//! ([`Recorded`]) and at commit [`diff_into`] writes what changed (new or modified entries,
//! whiteouts for removed ones, opaque markers for replaced directories) into the new snapshot's
//! `fs` dir. A change is detected by inode number and ctime, which every write, chmod, chown or
//! rename touches and no process can set back.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[cfg(doc)]
use kiln_image::layer::OverlayXattrs;

use crate::fsx::{copy_metadata, copy_tree_linking, CopyOptions, HardLinks};

/// Identity of an entry of a materialized tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    ino: u64,
    ctime: (i64, i64),
    dir: bool,
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            dir: meta.is_dir(),
        }
    }
}

/// The entries of a materialized tree, per directory (relative path → child name → identity).
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    dirs: HashMap<PathBuf, BTreeMap<OsString, Identity>>,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The name an OCI whiteout file `name` hides, if it is one (not the opaque marker).
fn hidden_name(name: &OsString) -> Option<OsString> {
    let text = name.to_str()?;
    if text == OPAQUE {
        return None;
    }
    text.strip_prefix(WHITEOUT_PREFIX).map(OsString::from)
}

fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names: Vec<OsString> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    Ok(names)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies the chain `lowers` (top first, as overlay's `lowerdir`) into the empty directory
/// `dest`, applying whiteouts and opaque directories, and records what it made.
pub(crate) fn materialize(lowers: &[PathBuf], dest: &Path) -> io::Result<Recorded> {
    for layer in lowers.iter().rev() {
        // Hard links live inside one layer (one `fs` dir): one memory per layer.
        merge_layer(layer, dest, &mut HardLinks::default())?;
    }
    let mut recorded = Recorded::default();
    record(dest, PathBuf::new(), &mut recorded)?;
    Ok(recorded)
}

fn merge_layer(src: &Path, dst: &Path, links: &mut HardLinks) -> io::Result<()> {
    let names = sorted_names(src)?;
    if names.iter().any(|n| n == OPAQUE) {
        for child in sorted_names(dst)? {
            remove_any(&dst.join(child))?;
        }
    }
    for name in names {
        if name == OPAQUE {
            continue;
        }
        if let Some(hidden) = hidden_name(&name) {
            remove_any(&dst.join(hidden))?;
            continue;
        }
        let from = src.join(&name);
        let to = dst.join(&name);
        let meta = fs::symlink_metadata(&from)?;
        if !meta.is_dir() {
            copy_tree_linking(&from, &to, &CopyOptions::default(), links)?;
            continue;
        }
        match fs::symlink_metadata(&to) {
            Ok(existing) if existing.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&to)?;
                fs::create_dir(&to)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&to)?,
            Err(e) => return Err(e),
        }
        merge_layer(&from, &to, links)?;
        // After the children, which changed the directory's mtime.
        copy_metadata(&from, &to, &meta, &CopyOptions::default())?;
    }
    Ok(())
}

fn record(dir: &Path, rel: PathBuf, recorded: &mut Recorded) -> io::Result<()> {
    let mut children = BTreeMap::new();
    for name in sorted_names(dir)? {
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path)?;
        let identity = Identity::of(&meta);
        if identity.dir {
            record(&path, rel.join(&name), recorded)?;
        }
        children.insert(name, identity);
    }
    recorded.dirs.insert(rel, children);
    Ok(())
}

/// Writes the changes of the tree `tree` since it was [`materialize`]d (`recorded`) into the
/// empty upper dir `upper`, as overlayfs would have.
pub(crate) fn diff_into(tree: &Path, recorded: &Recorded, upper: &Path) -> io::Result<()> {
    let mut made_dirs = Vec::new();
    let mut links = HardLinks::default();
    diff_dir(
        tree,
        Path::new(""),
        recorded,
        upper,
        &mut made_dirs,
        &mut links,
    )?;
    // Directories made in the upper get the tree's metadata, deepest first (children done).
    for rel in made_dirs.iter().rev() {
        let source = tree.join(rel);
        let meta = fs::symlink_metadata(&source)?;
        copy_metadata(&source, &upper.join(rel), &meta, &CopyOptions::default())?;
    }
    Ok(())
}

/// Makes `upper/rel` and its missing parents as directories, remembering them.
fn ensure_upper_dir(upper: &Path, rel: &Path, made: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut current = PathBuf::new();
    for component in rel.components() {
        current.push(component);
        let path = upper.join(&current);
        if fs::symlink_metadata(&path).is_err() {
            fs::create_dir(&path)?;
            made.push(current.clone());
        }
    }
    Ok(())
}

fn diff_dir(
    tree: &Path,
    rel: &Path,
    recorded: &Recorded,
    upper: &Path,
    made: &mut Vec<PathBuf>,
    links: &mut HardLinks,
) -> io::Result<()> {
    let empty = BTreeMap::new();
    let before = recorded.dirs.get(rel).unwrap_or(&empty);
    let names = sorted_names(&tree.join(rel))?;
    for name in &names {
        let child = rel.join(name);
        let path = tree.join(&child);
        let meta = fs::symlink_metadata(&path)?;
        let now = Identity::of(&meta);
        let old = before.get(name);
        if now.dir && old.is_some_and(|o| o.dir && o.ino == now.ino) {
            // The same directory: its own metadata may have changed, its children are compared.
            if old != Some(&now) {
                ensure_upper_dir(upper, &child, made)?;
            }
            diff_dir(tree, &child, recorded, upper, made, links)?;
            continue;
        }
        if old == Some(&now) {
            continue;
        }
        ensure_upper_dir(upper, rel, made)?;
        let target = upper.join(&child);
        copy_tree_linking(&path, &target, &CopyOptions::default(), links)?;
        if now.dir && old.is_some_and(|o| o.dir) {
            // A directory removed and made again: nothing of the old one shows through.
            fs::write(target.join(OPAQUE), b"")?;
        }
    }
    for (name, _) in before.iter() {
        if names.binary_search(name).is_ok() {
            continue;
        }
        ensure_upper_dir(upper, rel, made)?;
        let mut marker = OsString::from(WHITEOUT_PREFIX);
        marker.push(name);
        fs::write(upper.join(rel).join(marker), b"")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn materialize_then_diff_gives_the_changes_with_whiteout_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write(&base.join("keep"), "k");
        write(&base.join("gone"), "g");
        write(&base.join("d/old"), "o");
        write(&base.join("e/x"), "x");
        write(&base.join("edit"), "1");
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let recorded = materialize(std::slice::from_ref(&base), &tree).unwrap();
        assert_eq!(fs::read_to_string(tree.join("d/old")).unwrap(), "o");

        fs::remove_file(tree.join("gone")).unwrap();
        fs::remove_dir_all(tree.join("d")).unwrap();
        write(&tree.join("d/new"), "n");
        write(&tree.join("e/y"), "y");
        fs::write(tree.join("edit"), "2").unwrap();
        write(&tree.join("added"), "a");

        let upper = dir.path().join("upper");
        fs::create_dir(&upper).unwrap();
        diff_into(&tree, &recorded, &upper).unwrap();
        assert!(
            upper.join(".wh.gone").is_file(),
            "removed file is a whiteout"
        );
        assert!(!upper.join("gone").exists());
        assert!(!upper.join("keep").exists(), "unchanged file not copied");
        assert!(!upper.join("e/x").exists());
        assert_eq!(fs::read_to_string(upper.join("e/y")).unwrap(), "y");
        assert_eq!(fs::read_to_string(upper.join("edit")).unwrap(), "2");
        assert_eq!(fs::read_to_string(upper.join("added")).unwrap(), "a");
        assert_eq!(fs::read_to_string(upper.join("d/new")).unwrap(), "n");
        // A replaced directory hides the old content: opaque, or (when the new directory got
        // the old inode number back) a whiteout per old entry.
        assert!(
            upper.join("d/.wh..wh..opq").is_file() || upper.join("d/.wh.old").is_file(),
            "old content of the replaced dir hidden"
        );

        // The upper over the base materializes to the changed tree.
        let again = dir.path().join("again");
        fs::create_dir(&again).unwrap();
        materialize(&[upper.clone(), base], &again).unwrap();
        assert!(!again.join(".wh.gone").exists(), "markers are not copied");
        assert!(!again.join("d/.wh..wh..opq").exists());
        assert!(!again.join("gone").exists());
        assert!(!again.join("d/old").exists());
        assert_eq!(fs::read_to_string(again.join("d/new")).unwrap(), "n");
        assert_eq!(fs::read_to_string(again.join("edit")).unwrap(), "2");
        assert_eq!(fs::read_to_string(again.join("e/x")).unwrap(), "x");
    }

    #[test]
    fn hard_links_stay_hard_links_in_trees_and_diffs() {
        let same = |a: &Path, b: &Path| {
            let (a, b) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
            (a.dev(), a.ino()) == (b.dev(), b.ino())
        };
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        write(&base.join("bin/busybox"), "bb");
        fs::hard_link(base.join("bin/busybox"), base.join("bin/sh")).unwrap();
        write(&base.join("usr/bin/env"), "unrelated");
        fs::hard_link(base.join("bin/busybox"), base.join("usr/bin/id")).unwrap();

        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let recorded = materialize(std::slice::from_ref(&base), &tree).unwrap();
        assert!(same(&tree.join("bin/busybox"), &tree.join("bin/sh")));
        assert!(same(&tree.join("bin/busybox"), &tree.join("usr/bin/id")));
        assert!(!same(&tree.join("bin/busybox"), &base.join("bin/busybox")));
        assert!(!same(&tree.join("bin/busybox"), &tree.join("usr/bin/env")));
        assert_eq!(fs::metadata(tree.join("bin/sh")).unwrap().nlink(), 3);

        // Links made by a step reach the upper dir as links too.
        write(&tree.join("new/a"), "n");
        fs::hard_link(tree.join("new/a"), tree.join("new/b")).unwrap();
        let upper = dir.path().join("upper");
        fs::create_dir(&upper).unwrap();
        diff_into(&tree, &recorded, &upper).unwrap();
        assert!(same(&upper.join("new/a"), &upper.join("new/b")));
        assert!(
            !upper.join("bin").exists(),
            "untouched links are not copied"
        );

        // And a chain of both keeps each layer's links.
        let again = dir.path().join("again");
        fs::create_dir(&again).unwrap();
        materialize(&[upper.clone(), base], &again).unwrap();
        assert!(same(&again.join("bin/sh"), &again.join("usr/bin/id")));
        assert!(same(&again.join("new/a"), &again.join("new/b")));
        assert!(!same(&again.join("new/a"), &again.join("bin/sh")));
    }
}
