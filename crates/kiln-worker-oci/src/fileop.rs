//! `FileOp`: copy, mkdir, mkfile, rm and symlink actions on overlay mounts of the inputs.
//!
//! Each action works on an "active" tree ([`ActiveTree`]); in the OCI worker a pending snapshot
//! whose `fs` dir is the upper of an overlay over the input chain (or the plain tree for a scratch input), so the kernel writes the
//! whiteouts and opaque dirs a layer needs. An action whose input is an earlier action used by
//! nobody else continues on that tree in place; otherwise the earlier result is committed first.
//! All paths are resolved inside the tree they name ([`resolve_in_root`]).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_proto::pb::{self, file_action::Action, user_opt};
use kiln_worker::{Error, SnapshotId, SnapshotView};

use crate::copyfilter::{copy_dir_filtered, CopyFilter};
use crate::fsx::{
    copy_tree, glob_match, has_glob, io_err, lchown, mkdir_all, resolve_in_root, set_mtime,
    CopyOptions,
};
use crate::snapshot::random_id;
use crate::trees::{ActiveTree, Trees};

enum Value {
    Snapshot(Option<SnapshotId>),
    /// A tree being modified by actions.
    Active(Box<dyn ActiveTree>),
    /// Continued in place by a later action.
    Moved,
}

/// Mount points and read-only views of one op, released on drop.
struct Scope<'a> {
    trees: &'a dyn Trees,
    dir: PathBuf,
    views: Vec<SnapshotView>,
    counter: usize,
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        self.views.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Scope<'_> {
    fn mount_point(&mut self) -> Result<PathBuf, Error> {
        self.counter += 1;
        let p = self.dir.join(format!("m{}", self.counter));
        fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        Ok(p)
    }

    /// A read-only view of a committed snapshot.
    fn view(&mut self, id: &Option<SnapshotId>) -> Result<PathBuf, Error> {
        let target = self.mount_point()?;
        let view = self.trees.view(id.as_ref(), &target)?;
        let path = view.path().to_path_buf();
        self.views.push(view);
        Ok(path)
    }

    /// A writable tree over a committed snapshot.
    fn activate(&mut self, parent: Option<SnapshotId>) -> Result<Box<dyn ActiveTree>, Error> {
        let target = self.mount_point()?;
        self.trees.activate(parent.as_ref(), &target)
    }
}

fn commit(active: Box<dyn ActiveTree>) -> Result<SnapshotId, Error> {
    active.commit()
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidOp {
        op: "file",
        reason: reason.into(),
    }
}

/// Runs `op`; see `Worker::file`. `scratch` is a directory for temporary mount points.
pub(crate) fn run(
    trees: &dyn Trees,
    scratch: &Path,
    op: &pb::FileOp,
    inputs: &[Option<SnapshotId>],
) -> Result<Vec<Option<SnapshotId>>, Error> {
    let n = inputs.len() as i64;
    let actions = &op.actions;
    // How often each action result is used by later actions.
    let mut uses = vec![0usize; actions.len()];
    let mut note = |idx: i64, at: usize| -> Result<(), Error> {
        if idx >= n {
            let j = (idx - n) as usize;
            if j >= at {
                return Err(invalid(format!("action {at} refers to later action {j}")));
            }
            uses[j] += 1;
        }
        Ok(())
    };
    for (k, a) in actions.iter().enumerate() {
        note(a.input, k)?;
        note(a.secondary_input, k)?;
        for owner in owner_of(a).into_iter().flatten() {
            for u in [&owner.user, &owner.group].into_iter().flatten() {
                if let Some(user_opt::User::ByName(named)) = &u.user {
                    note(named.input, k)?;
                }
            }
        }
    }

    let mut scope = Scope {
        trees,
        dir: scratch.join(format!("file-{}", random_id())),
        views: Vec::new(),
        counter: 0,
    };
    fs::create_dir_all(&scope.dir).map_err(io_err("create", &scope.dir))?;
    let mut results: Vec<Value> = Vec::with_capacity(actions.len());

    for (k, action) in actions.iter().enumerate() {
        // Make earlier results that are shared (or are op outputs) committed snapshots.
        for idx in [action.input, action.secondary_input] {
            if idx >= n {
                let j = (idx - n) as usize;
                let shared = uses[j] > 1 || actions[j].output >= 0 || idx != action.input;
                if shared {
                    if let Value::Active(_) = &results[j] {
                        let Value::Active(a) = std::mem::replace(&mut results[j], Value::Moved)
                        else {
                            unreachable!("checked above")
                        };
                        results[j] = Value::Snapshot(Some(commit(a)?));
                    }
                }
            }
        }
        let active = match action.input {
            -1 => scope.activate(None)?,
            i if i >= 0 && i < n => scope.activate(inputs[i as usize].clone())?,
            i if i >= n => {
                let j = (i - n) as usize;
                match std::mem::replace(&mut results[j], Value::Moved) {
                    Value::Active(a) => a,
                    Value::Snapshot(s) => {
                        results[j] = Value::Snapshot(s.clone());
                        scope.activate(s)?
                    }
                    Value::Moved => return Err(invalid(format!("action {j} result used twice"))),
                }
            }
            i => return Err(invalid(format!("action {k} has invalid input {i}"))),
        };
        let secondary = match action.secondary_input {
            -1 => None,
            i if i >= 0 && i < n => Some(scope.view(&inputs[i as usize])?),
            i if i >= n => match &results[(i - n) as usize] {
                Value::Snapshot(s) => Some(scope.view(&s.clone())?),
                _ => return Err(invalid(format!("action {k} secondary input unavailable"))),
            },
            i => {
                return Err(invalid(format!(
                    "action {k} has invalid secondary input {i}"
                )))
            }
        };
        let owner = match owner_of(action).flatten() {
            Some(chown) => Some(resolve_owner(
                chown,
                &mut scope,
                inputs,
                &results,
                active.path(),
                k,
            )?),
            None => None,
        };
        match &action.action {
            Some(Action::Copy(c)) => {
                let src_root = match secondary {
                    Some(p) => p,
                    None => scope.mount_point()?,
                };
                copy(k, &src_root, active.path(), c, owner, &scope.dir)?
            }
            Some(Action::Mkdir(m)) => mkdir(k, active.path(), m, owner)?,
            Some(Action::Mkfile(m)) => mkfile(k, active.path(), m, owner)?,
            Some(Action::Rm(r)) => rm(k, active.path(), r)?,
            Some(Action::Symlink(s)) => symlink(k, active.path(), s, owner)?,
            None => return Err(invalid(format!("action {k} has no action"))),
        }
        results.push(Value::Active(active));
    }

    let max_output = actions.iter().map(|a| a.output).max().unwrap_or(-1);
    let mut outputs: Vec<Option<SnapshotId>> = vec![None; (max_output + 1).max(0) as usize];
    for (k, action) in actions.iter().enumerate() {
        if action.output < 0 {
            continue;
        }
        let id = match std::mem::replace(&mut results[k], Value::Moved) {
            Value::Active(a) => Some(commit(a)?),
            Value::Snapshot(s) => s,
            Value::Moved => return Err(invalid(format!("output of action {k} was consumed"))),
        };
        outputs[action.output as usize] = id;
    }
    Ok(outputs)
}

fn owner_of(action: &pb::FileAction) -> Option<Option<&pb::ChownOpt>> {
    match &action.action {
        Some(Action::Copy(c)) => Some(c.owner.as_ref()),
        Some(Action::Mkdir(m)) => Some(m.owner.as_ref()),
        Some(Action::Mkfile(m)) => Some(m.owner.as_ref()),
        Some(Action::Symlink(s)) => Some(s.owner.as_ref()),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: Option<u32>,
    gid: Option<u32>,
}

fn resolve_owner(
    chown: &pb::ChownOpt,
    scope: &mut Scope<'_>,
    inputs: &[Option<SnapshotId>],
    results: &[Value],
    current: &Path,
    k: usize,
) -> Result<Owner, Error> {
    let n = inputs.len() as i64;
    let mut lookup =
        |opt: &pb::UserOpt, file: &str, field: usize| -> Result<Option<(u32, u32)>, Error> {
            match &opt.user {
                Some(user_opt::User::ById(id)) => Ok(Some((*id, *id))),
                Some(user_opt::User::ByName(named)) => {
                    let root = if named.input >= 0 && named.input < n {
                        scope.view(&inputs[named.input as usize])?
                    } else if named.input >= n {
                        match &results[(named.input - n) as usize] {
                            Value::Snapshot(s) => scope.view(&s.clone())?,
                            _ => current.to_path_buf(),
                        }
                    } else {
                        current.to_path_buf()
                    };
                    let text = resolve_in_root(&root, file, true)
                        .and_then(fs::read_to_string)
                        .unwrap_or_default();
                    let entry = text
                        .lines()
                        .map(|l| l.split(':').collect::<Vec<_>>())
                        .find(|f| f.first() == Some(&named.name.as_str()) && f.len() > field);
                    match entry {
                        Some(f) => {
                            let id = f[2].parse().unwrap_or(0);
                            let gid = if field == 3 {
                                f[3].parse().unwrap_or(id)
                            } else {
                                id
                            };
                            Ok(Some((id, gid)))
                        }
                        None => Err(Error::FileAction {
                            index: k,
                            action: "chown",
                            path: file.to_string(),
                            reason: format!(
                                "unknown {} {:?}: no entry in {file} of the destination",
                                if field == 3 { "user" } else { "group" },
                                named.name
                            ),
                            source: None,
                        }),
                    }
                }
                None => Ok(None),
            }
        };
    let user = match &chown.user {
        Some(u) => lookup(u, "/etc/passwd", 3)?,
        None => None,
    };
    let group = match &chown.group {
        Some(g) => lookup(g, "/etc/group", 2)?.map(|(gid, _)| gid),
        None => None,
    };
    Ok(Owner {
        uid: user.map(|(uid, _)| uid),
        gid: group.or(user.map(|(_, gid)| gid)),
    })
}

fn timestamp(ts: i64) -> Option<(i64, i64)> {
    (ts != -1).then_some((ts.div_euclid(1_000_000_000), ts.rem_euclid(1_000_000_000)))
}

fn action_err<'a>(
    index: usize,
    action: &'static str,
    path: &'a str,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::FileAction {
        index,
        action,
        path: path.to_string(),
        reason: source.to_string(),
        source: Some(source),
    }
}

/// Sources named by `src` inside `root`: one path, or the matches of a glob in its last component.
fn sources(root: &Path, src: &str, wildcard: bool, follow: bool) -> io::Result<Vec<PathBuf>> {
    let clean = src.trim_end_matches('/');
    let (dir, base) = match clean.rsplit_once('/') {
        Some((d, b)) => (d, b),
        None => ("", clean),
    };
    if wildcard && has_glob(base) {
        let parent = resolve_in_root(root, dir, true)?;
        let mut names: Vec<_> = match fs::read_dir(&parent) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| glob_match(base, name))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        names.sort();
        return names
            .into_iter()
            .map(|name| resolve_in_root(root, &format!("{dir}/{name}"), follow))
            .collect();
    }
    let path = resolve_in_root(root, if clean.is_empty() { "/" } else { clean }, follow)?;
    fs::symlink_metadata(&path)?;
    Ok(vec![path])
}

fn copy(
    k: usize,
    src_root: &Path,
    dest_root: &Path,
    c: &pb::FileActionCopy,
    owner: Option<Owner>,
    tmp: &Path,
) -> Result<(), Error> {
    let filter = CopyFilter::new(&c.include_patterns, &c.exclude_patterns).map_err(|reason| {
        Error::FileAction {
            index: k,
            action: "copy",
            path: c.src.clone(),
            reason,
            source: None,
        }
    })?;
    for required in &c.required_paths {
        let found = resolve_in_root(src_root, required, c.follow_symlink)
            .and_then(|p| fs::symlink_metadata(p).map(|_| ()));
        if let Err(e) = found {
            let (reason, source) = if e.kind() == io::ErrorKind::NotFound {
                (format!("{required:?}: not found"), None)
            } else {
                (format!("{required:?}: cannot be read"), Some(e))
            };
            return Err(Error::FileAction {
                index: k,
                action: "copy",
                path: required.clone(),
                reason,
                source,
            });
        }
    }
    // A missing source is worded as BuildKit words it (`"/nope.txt": not found`).
    let not_found = || Error::FileAction {
        index: k,
        action: "copy",
        path: c.src.clone(),
        reason: format!("{:?}: not found", c.src),
        source: None,
    };
    let srcs = match sources(src_root, &c.src, c.allow_wildcard, c.follow_symlink) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        result => result.map_err(action_err(k, "copy", &c.src))?,
    };
    if srcs.is_empty() {
        if c.allow_empty_wildcard {
            return Ok(());
        }
        return Err(not_found());
    }
    let (uid, gid) = owner.map(|o| (o.uid, o.gid)).unwrap_or((None, None));
    let mode = if c.mode >= 0 {
        Some(c.mode as u32 & 0o7777)
    } else if !c.mode_str.is_empty() {
        Some(
            u32::from_str_radix(&c.mode_str, 8).map_err(|_| Error::Unsupported {
                what: format!("symbolic copy mode {:?}", c.mode_str),
            })?,
        )
    } else {
        None
    };
    let opts = CopyOptions {
        uid,
        gid,
        mode,
        mtime: timestamp(c.timestamp),
    };
    let dest_is_dir_spec = c.dest.ends_with('/') || c.dest.ends_with("/.") || c.dest == ".";
    let dest = resolve_in_root(dest_root, &c.dest, true).map_err(action_err(k, "copy", &c.dest))?;
    let err = action_err(k, "copy", &c.dest);
    if c.create_dest_path {
        let dir = if dest_is_dir_spec || srcs.len() > 1 {
            dest.as_path()
        } else {
            dest.parent().unwrap_or(dest_root)
        };
        mkdir_all(dir, 0o755, uid, gid).map_err(err)?;
    } else if dest_is_dir_spec && !dest.is_dir() {
        return Err(Error::FileAction {
            index: k,
            action: "copy",
            path: c.dest.clone(),
            reason: "destination directory does not exist".into(),
            source: None,
        });
    }
    for src in srcs {
        if c.attempt_unpack_docker_compatibility {
            let archive = open_archive(&src, tmp).map_err(action_err(k, "copy", &c.src))?;
            if let Some(archive) = archive {
                // ADD of a local archive: extracted into the destination, which is a directory
                // whether or not it ends in `/` (BuildKit's docker-compatible unpack).
                mkdir_all(&dest, 0o755, uid, gid).map_err(action_err(k, "copy", &c.dest))?;
                tracing::debug!(src = %src.display(), dest = %c.dest, "extracting archive");
                extract_archive(archive.reader, &dest, owner).map_err(|reason| {
                    Error::FileAction {
                        index: k,
                        action: "copy",
                        path: c.src.clone(),
                        reason,
                        source: None,
                    }
                })?;
                continue;
            }
        }
        let src_meta = fs::symlink_metadata(&src).map_err(action_err(k, "copy", &c.src))?;
        // The root of the source (`ADD <git ref>` copies `/`) has no name to copy "into" the
        // destination: its contents are copied, as fsutil does.
        let contents = c.dir_copy_contents || src.as_path() == src_root;
        let dest_meta = fs::metadata(&dest).ok();
        let into = match &dest_meta {
            Some(d) => (src_meta.is_dir() && !contents) || (!src_meta.is_dir() && d.is_dir()),
            None => false,
        };
        let name = src
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let target = if into { dest.join(&name) } else { dest.clone() };
        let err = action_err(k, "copy", &c.dest);
        if let Some(parent) = target.parent() {
            if !parent.exists() {
                mkdir_all(parent, 0o755, uid, gid).map_err(action_err(k, "copy", &c.dest))?;
            }
        }
        if let (Some(filter), true) = (&filter, src_meta.is_dir()) {
            // Patterns apply below the source; an existing target keeps its metadata.
            copy_dir_filtered(&src, &target, filter, &opts)
                .map_err(action_err(k, "copy", &c.dest))?;
        } else if src_meta.is_dir() && contents && target.is_dir() {
            // Contents into an existing directory: its own metadata is kept.
            let mut names: Vec<_> = fs::read_dir(&src)
                .map_err(action_err(k, "copy", &c.src))?
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect();
            names.sort();
            for child in names {
                copy_tree(&src.join(&child), &target.join(&child), &opts)
                    .map_err(action_err(k, "copy", &c.dest))?;
            }
        } else {
            copy_tree(&src, &target, &opts).map_err(err)?;
        }
    }
    Ok(())
}

fn mkdir(
    k: usize,
    root: &Path,
    m: &pb::FileActionMkDir,
    owner: Option<Owner>,
) -> Result<(), Error> {
    let path = resolve_in_root(root, &m.path, true).map_err(action_err(k, "mkdir", &m.path))?;
    let err = || action_err(k, "mkdir", &m.path);
    let (uid, gid) = owner.map(|o| (o.uid, o.gid)).unwrap_or((None, None));
    let mode = (m.mode.max(0) as u32) & 0o7777;
    if m.make_parents {
        let created = mkdir_all(&path, mode, uid, gid).map_err(err())?;
        if let Some(ts) = timestamp(m.timestamp) {
            for p in created {
                set_mtime(&p, ts.0, ts.1).map_err(err())?;
            }
        }
        return Ok(());
    }
    fs::create_dir(&path).map_err(err())?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(err())?;
    if uid.is_some() || gid.is_some() {
        lchown(&path, uid, gid).map_err(err())?;
    }
    if let Some((s, ns)) = timestamp(m.timestamp) {
        set_mtime(&path, s, ns).map_err(err())?;
    }
    Ok(())
}

fn mkfile(
    k: usize,
    root: &Path,
    m: &pb::FileActionMkFile,
    owner: Option<Owner>,
) -> Result<(), Error> {
    let path = resolve_in_root(root, &m.path, true).map_err(action_err(k, "mkfile", &m.path))?;
    let err = || action_err(k, "mkfile", &m.path);
    fs::write(&path, &m.data).map_err(err())?;
    fs::set_permissions(
        &path,
        fs::Permissions::from_mode((m.mode.max(0) as u32) & 0o7777),
    )
    .map_err(err())?;
    if let Some(o) = owner {
        lchown(&path, o.uid, o.gid).map_err(err())?;
    }
    if let Some((s, ns)) = timestamp(m.timestamp) {
        set_mtime(&path, s, ns).map_err(err())?;
    }
    Ok(())
}

fn rm(k: usize, root: &Path, r: &pb::FileActionRm) -> Result<(), Error> {
    let targets = match sources(root, &r.path, r.allow_wildcard, false) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(action_err(k, "rm", &r.path)(e)),
    };
    if targets.is_empty() && !r.allow_not_found {
        return Err(Error::FileAction {
            index: k,
            action: "rm",
            path: r.path.clone(),
            reason: "no such file or directory".into(),
            source: None,
        });
    }
    for t in targets {
        if t == root {
            return Err(Error::FileAction {
                index: k,
                action: "rm",
                path: r.path.clone(),
                reason: "cannot remove the root".into(),
                source: None,
            });
        }
        let result = match fs::symlink_metadata(&t) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&t),
            Ok(_) => fs::remove_file(&t),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && r.allow_not_found => {}
            Err(e) => return Err(action_err(k, "rm", &r.path)(e)),
        }
    }
    Ok(())
}

fn symlink(
    k: usize,
    root: &Path,
    s: &pb::FileActionSymlink,
    owner: Option<Owner>,
) -> Result<(), Error> {
    let path =
        resolve_in_root(root, &s.newpath, false).map_err(action_err(k, "symlink", &s.newpath))?;
    let err = || action_err(k, "symlink", &s.newpath);
    std::os::unix::fs::symlink(&s.oldpath, &path).map_err(err())?;
    if let Some(o) = owner {
        lchown(&path, o.uid, o.gid).map_err(err())?;
    }
    if let Some((sec, ns)) = timestamp(s.timestamp) {
        set_mtime(&path, sec, ns).map_err(err())?;
    }
    Ok(())
}

// ---- ADD's archive extraction (`attemptUnpackDockerCompatibility`) ----

/// How an archive source is compressed, from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
}

fn compression_of(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        Compression::Gzip
    } else if head.starts_with(b"BZh") {
        Compression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Compression::Xz
    } else {
        Compression::None
    }
}

/// A temporary file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// An archive opened for extraction: the decompressed tar stream. An xz stream is decompressed
/// to a temporary file first (the pure-Rust decoder is not a reader).
struct OpenedArchive {
    reader: Box<dyn io::Read>,
    _temp: Option<TempFile>,
}

/// Opens `path` as a tar archive (plain, gzip, bzip2 or xz) if it is one: a regular file (not
/// followed if a symlink) whose decompressed content starts with a valid tar header, as
/// BuildKit's `isArchivePath` decides. `Ok(None)` means "copy it as a file".
fn open_archive(path: &Path, tmp: &Path) -> io::Result<Option<OpenedArchive>> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    // A reader over `file`, decompressed by its magic bytes when `decompress` is set.
    let reader_for = |file: &Path, decompress: bool| -> io::Result<Box<dyn io::Read>> {
        let mut head = [0u8; 6];
        let n = read_full(&fs::File::open(file)?, &mut head)?;
        let buffered = io::BufReader::new(fs::File::open(file)?);
        Ok(match compression_of(&head[..n]) {
            Compression::Gzip if decompress => {
                Box::new(flate2::read::MultiGzDecoder::new(buffered))
            }
            Compression::Bzip2 if decompress => {
                Box::new(bzip2::read::MultiBzDecoder::new(buffered))
            }
            _ => Box::new(buffered),
        })
    };
    let mut head = [0u8; 6];
    let n = read_full(&fs::File::open(path)?, &mut head)?;
    let (temp, reader) = if compression_of(&head[..n]) == Compression::Xz {
        let temp = TempFile(tmp.join(format!("unpack-{}.tar", random_id())));
        let mut input = io::BufReader::new(fs::File::open(path)?);
        let mut output = io::BufWriter::new(fs::File::create(&temp.0)?);
        let decoded = lzma_rs::xz_decompress(&mut input, &mut output);
        let flushed = io::Write::flush(&mut output);
        drop(output);
        if decoded.is_err() || flushed.is_err() {
            // Not a valid xz stream: BuildKit copies such a file as is.
            return Ok(None);
        }
        let reader = reader_for(&temp.0, false)?;
        (Some(temp), reader)
    } else {
        (None, reader_for(path, true)?)
    };
    // Probe: the first tar header must parse (a decompression error means "not an archive").
    let probe = match &temp {
        Some(t) => reader_for(&t.0, false)?,
        None => reader_for(path, true)?,
    };
    let mut archive = tar::Archive::new(probe);
    let valid = match archive.entries() {
        Ok(mut entries) => matches!(entries.next(), Some(Ok(_))),
        Err(_) => false,
    };
    let opened = OpenedArchive {
        reader,
        _temp: temp,
    };
    Ok(valid.then_some(opened))
}

fn read_full(mut file: &fs::File, buf: &mut [u8]) -> io::Result<usize> {
    use io::Read;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// An entry name made relative and clean: leading `/` dropped, `.` removed, `..` resolved
/// lexically; a name that climbs above the extraction root is an error (BuildKit's
/// `cleanRootTarPath`). `None` for the root itself.
fn clean_entry_name(raw: &[u8]) -> Result<Option<PathBuf>, String> {
    use std::os::unix::ffi::OsStrExt;
    let shown = String::from_utf8_lossy(raw).into_owned();
    if raw.contains(&0) {
        return Err(format!("archive path {shown:?} contains a NUL byte"));
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(format!("archive path {shown:?} is outside extraction root"));
                }
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let mut path = PathBuf::new();
    for p in parts {
        path.push(std::ffi::OsStr::from_bytes(p));
    }
    Ok(Some(path))
}

/// Extracts the tar stream into `dest` (an existing directory). Every path is resolved inside
/// `dest` with symlinks followed as if `dest` were `/` ([`resolve_in_root`]), so neither `..`
/// nor a symlink in the archive (or already in the tree) leads outside; files are created with
/// `O_NOFOLLOW` after removing what was there. Owner: `--chown` when given, else the entry's;
/// mode and mtime from the entry. OCI whiteout names are plain files here, as in BuildKit.
fn extract_archive(reader: impl io::Read, dest: &Path, owner: Option<Owner>) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| format!("failed to read archive: {e}"))?;
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("failed to read archive: {e}"))?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let Some(name) = clean_entry_name(&raw)? else {
            continue;
        };
        let shown = name.display().to_string();
        let fail = |what: &str, e: io::Error| format!("failed to {what} {shown}: {e}");
        let is_dir = kind == tar::EntryType::Directory;
        let target = resolve_in_root(dest, &shown, is_dir).map_err(|e| fail("resolve", e))?;
        if target == dest {
            continue;
        }
        if let Some(parent) = target.parent() {
            // Missing parents are root-owned 0755 directories, as BuildKit makes them.
            mkdir_all(parent, 0o755, Some(0), Some(0)).map_err(|e| fail("create parents of", e))?;
        }
        let header = entry.header();
        let mode = header.mode().map_err(|e| fail("read mode of", e))? & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let uid = owner
            .and_then(|o| o.uid)
            .unwrap_or_else(|| header.uid().map(|u| u as u32).unwrap_or(0));
        let gid = owner
            .and_then(|o| o.gid)
            .unwrap_or_else(|| header.gid().map(|g| g as u32).unwrap_or(0));
        let link = entry.link_name_bytes().map(|l| l.into_owned());

        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() && is_dir => {}
            Ok(meta) if meta.is_dir() => {
                fs::remove_dir_all(&target).map_err(|e| fail("replace", e))?
            }
            Ok(_) => fs::remove_file(&target).map_err(|e| fail("replace", e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("inspect", e)),
        }

        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target).map_err(|e| fail("create", e))?;
                }
                lchown(&target, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(|e| fail("chmod", e))?;
                dir_times.push((target, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| fail("create", e))?;
                io::copy(&mut entry, &mut file).map_err(|e| fail("write", e))?;
                drop(file);
                lchown(&target, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
                // After chown, which clears setuid/setgid.
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(|e| fail("chmod", e))?;
                set_mtime(&target, mtime, 0).map_err(|e| fail("set times of", e))?;
            }
            tar::EntryType::Symlink => {
                use std::os::unix::ffi::OsStrExt;
                let link = link.ok_or_else(|| format!("symlink {shown} has no target"))?;
                // The target is kept as written; it is only ever resolved inside the root.
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&link), &target)
                    .map_err(|e| fail("create symlink", e))?;
                lchown(&target, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
                set_mtime(&target, mtime, 0).map_err(|e| fail("set times of", e))?;
            }
            tar::EntryType::Link => {
                let link = link.ok_or_else(|| format!("hard link {shown} has no target"))?;
                let Some(link_name) = clean_entry_name(&link)? else {
                    return Err(format!(
                        "archive hardlink {shown:?} targets extraction root"
                    ));
                };
                let source = resolve_in_root(dest, &link_name.display().to_string(), false)
                    .map_err(|e| fail("resolve hard link target of", e))?;
                let meta = fs::symlink_metadata(&source)
                    .map_err(|e| fail("find hard link target of", e))?;
                if meta.is_dir() {
                    return Err(format!("hard link {shown} points to a directory"));
                }
                fs::hard_link(&source, &target).map_err(|e| fail("create hard link", e))?;
                lchown(&target, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
                if !meta.file_type().is_symlink() {
                    fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                        .map_err(|e| fail("chmod", e))?;
                    set_mtime(&target, mtime, 0).map_err(|e| fail("set times of", e))?;
                }
            }
            tar::EntryType::Fifo => {
                nix::unistd::mkfifo(
                    &target,
                    nix::sys::stat::Mode::from_bits_truncate(mode as libc::mode_t),
                )
                .map_err(|e| fail("create fifo", io::Error::from(e)))?;
                lchown(&target, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                    .map_err(|e| fail("chmod", e))?;
                set_mtime(&target, mtime, 0).map_err(|e| fail("set times of", e))?;
            }
            other => {
                return Err(format!(
                    "unsupported tar entry {shown:?} type {:?}",
                    other.as_byte() as char
                ))
            }
        }
    }
    // Directory times last: creating their children changed them.
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime, 0)
            .map_err(|e| format!("failed to set times of {}: {e}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_stay_inside() {
        assert_eq!(
            clean_entry_name(b"/a/./b/../c").unwrap(),
            Some(PathBuf::from("a/c"))
        );
        assert_eq!(clean_entry_name(b"./").unwrap(), None);
        assert!(clean_entry_name(b"../etc/passwd").is_err());
        assert!(clean_entry_name(b"a/../../x").is_err());
    }

    #[test]
    fn magic_bytes() {
        assert_eq!(compression_of(&[0x1f, 0x8b, 0x08, 0]), Compression::Gzip);
        assert_eq!(compression_of(b"BZh91A"), Compression::Bzip2);
        assert_eq!(
            compression_of(&[0xfd, b'7', b'z', b'X', b'Z', 0]),
            Compression::Xz
        );
        assert_eq!(compression_of(b"ustar"), Compression::None);
    }
}
