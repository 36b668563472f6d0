//! Layer tars: applying them onto a directory and diffing an overlayfs upper dir into one.
//!
//! Whiteouts are translated at the boundary: on disk they are overlayfs whiteouts (a char device
//! 0/0 for a removed entry, the `trusted.overlay.opaque=y` xattr — `user.overlay.opaque` for a
//! rootless overlay — for an opaque directory, see [`OverlayXattrs`]); in the tar they are OCI
//! whiteouts (`.wh.NAME` and `DIR/.wh..wh..opq`), which [`OverlayXattrs::Files`] keeps on disk.
//!
//! [`apply`] treats the tar as hostile: no entry lands outside the destination, `..` components are
//! rejected, and no symlink is ever followed while creating entries.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{major, makedev, minor, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::{EntryType, Header};

use crate::{Digest, DigestWriter, Hasher};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// How a tree on disk records removed entries and opaque directories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverlayXattrs {
    /// overlayfs upper dir mounted by the initial user namespace's root: char device 0/0
    /// whiteouts, `trusted.overlay.opaque=y`.
    #[default]
    Trusted,
    /// overlayfs upper dir mounted with `userxattr` in a user namespace (rootless), where
    /// `trusted.*` cannot be written: char device 0/0 whiteouts, `user.overlay.opaque=y`.
    User,
    /// No overlayfs (the `native` snapshotter): the OCI whiteout files themselves, `.wh.NAME`
    /// and `DIR/.wh..wh..opq`, as empty regular files. Works where neither a whiteout device
    /// nor an overlay xattr can be made (for example on an overlayfs).
    Files,
}

impl OverlayXattrs {
    /// The prefix of overlayfs' own xattrs (dropped from layers), if any.
    pub fn prefix(self) -> Option<&'static str> {
        match self {
            Self::Trusted => Some("trusted.overlay."),
            Self::User => Some("user.overlay."),
            Self::Files => None,
        }
    }

    /// The opaque-directory xattr, if opaque directories are marked by one.
    pub fn opaque(self) -> Option<&'static str> {
        match self {
            Self::Trusted => Some("trusted.overlay.opaque"),
            Self::User => Some("user.overlay.opaque"),
            Self::Files => None,
        }
    }
}

/// A layer apply or diff failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layer stream could not be read or decompressed, or is not a valid tar.
    #[error("failed to read layer tar")]
    Read {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry tries to escape the destination or uses an invalid name.
    #[error("unsafe path {path:?} in layer: {reason}")]
    UnsafePath {
        /// The entry path (or link target) as written in the tar.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A filesystem operation failed.
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the layer blob failed.
    #[error("failed to write layer blob")]
    Write {
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result of layer operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

fn nix_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> Error {
    let path = path.to_path_buf();
    move |errno| Error::Io {
        op,
        path,
        source: io::Error::from(errno),
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerApplied {
    /// sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
}

/// What [`diff_upper`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// sha256 of the compressed blob.
    pub digest: Digest,
    /// Size of the compressed blob.
    pub size: u64,
}

/// The compressor of layer blobs: the parallel, deterministic gzip at the default level.
fn compressor<W: Write>(out: W) -> crate::compression::ParallelGzEncoder<W> {
    crate::compression::ParallelGzEncoder::new(out, crate::compression::DEFAULT_GZIP_LEVEL)
}

fn finish_compressor<W: Write>(encoder: crate::compression::ParallelGzEncoder<W>) -> io::Result<W> {
    encoder.finish()
}

/// A reader that hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Extracts a layer tar (gzip-compressed or plain, detected by magic) into `dest`, turning OCI
/// whiteouts into overlayfs whiteouts and restoring mode, ownership, mtime and xattrs.
///
/// Leading `/` are stripped from entry names; `..` components, entries whose parent crosses a
/// symlink and hard links leaving `dest` are errors. An existing entry is replaced unless both it
/// and the new entry are directories.
pub fn apply(reader: impl Read, dest: &Path) -> Result<LayerApplied> {
    apply_with(reader, dest, OverlayXattrs::Trusted)
}

/// [`apply`] marking opaque directories in the `xattrs` namespace.
pub fn apply_with(reader: impl Read, dest: &Path, xattrs: OverlayXattrs) -> Result<LayerApplied> {
    let mut reader = reader;
    let mut head = Vec::with_capacity(2);
    while head.len() < 2 {
        let mut byte = [0u8; 1];
        match reader.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(Error::Read { source }),
        }
    }
    let is_gzip = head == [0x1f, 0x8b];
    let raw = io::Cursor::new(head).chain(reader);
    let stream: Box<dyn Read> = if is_gzip {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    let mut hashing = HashingReader {
        inner: stream,
        hasher: Hasher::new(),
    };
    let mut dir_times = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let entries = archive.entries().map_err(|source| Error::Read { source })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| Error::Read { source })?;
            apply_entry(&mut entry, dest, &mut dir_times, xattrs)?;
        }
    }
    // The diff id covers the whole stream, including the end-of-archive padding.
    io::copy(&mut hashing, &mut io::sink()).map_err(|source| Error::Read { source })?;
    // Directory mtimes last: creating children changed them.
    for (path, mtime) in dir_times.iter().rev() {
        set_mtime(path, *mtime)?;
    }
    Ok(LayerApplied {
        diff_id: hashing.hasher.finish().0,
    })
}

/// An empty regular file standing for an OCI whiteout ([`OverlayXattrs::Files`]).
fn write_marker(path: &Path) -> Result<()> {
    remove_existing(path)?;
    fs::write(path, b"").map_err(io_err("create whiteout file", path))
}

/// Splits an entry name into safe components: leading `/` and `.` components dropped, `..`
/// rejected.
fn clean_path(raw: &[u8]) -> Result<Vec<OsString>> {
    let unsafe_path = |reason| Error::UnsafePath {
        path: String::from_utf8_lossy(raw).into_owned(),
        reason,
    };
    if raw.contains(&0) {
        return Err(unsafe_path("contains a NUL byte"));
    }
    let mut out = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(unsafe_path("contains a `..` component")),
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

/// Walks `components` below `dest`, refusing symlinks and non-directories; creates missing
/// directories when `create` is set. Returns the resulting path.
fn safe_dir(dest: &Path, components: &[OsString], raw: &[u8], create: bool) -> Result<PathBuf> {
    let mut path = dest.to_path_buf();
    for component in components {
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Error::UnsafePath {
                    path: String::from_utf8_lossy(raw).into_owned(),
                    reason: "parent path crosses a symlink",
                })
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::UnsafePath {
                    path: String::from_utf8_lossy(raw).into_owned(),
                    reason: "parent path is not a directory",
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&path).map_err(io_err("create directory", &path))?;
            }
            Err(e) => return Err(io_err("inspect", &path)(e)),
        }
    }
    Ok(path)
}

/// Removes whatever is at `path` without following symlinks (absent is fine).
fn remove_existing(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => fs::remove_file(path).map_err(io_err("remove", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

fn set_mtime(path: &Path, (secs, nanos): (i64, i64)) -> Result<()> {
    let ts = TimeSpec::new(secs, nanos);
    utimensat(None, path, &ts, &ts, UtimensatFlags::NoFollowSymlink)
        .map_err(nix_err("set mtime of", path))
}

/// Parses a PAX time (`1700000000.123`) into seconds and nanoseconds.
fn parse_pax_time(value: &[u8]) -> Option<(i64, i64)> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += i64::from(c.to_digit(10)?) * 10i64.pow(8 - i as u32);
    }
    if secs < 0 && nanos > 0 {
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

/// A numeric header field; an empty one (all NUL or spaces) reads as 0, as in Go's reader.
fn numeric(raw: &[u8], parsed: io::Result<u64>) -> Result<u64> {
    if raw.iter().all(|&b| b == 0 || b == b' ') {
        return Ok(0);
    }
    parsed.map_err(|source| Error::Read { source })
}

fn apply_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    dir_times: &mut Vec<(PathBuf, (i64, i64))>,
    overlay: OverlayXattrs,
) -> Result<()> {
    let raw = entry.path_bytes().into_owned();
    let kind = entry.header().entry_type();
    if matches!(
        kind,
        EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink
    ) {
        return Ok(());
    }
    let components = clean_path(&raw)?;
    let Some((name, parents)) = components.split_last() else {
        // The root of the layer: the destination itself, left alone.
        return Ok(());
    };
    let parent = safe_dir(dest, parents, &raw, true)?;
    let name_bytes = name.as_bytes();

    if name_bytes == OPAQUE_WHITEOUT.as_bytes() {
        return match overlay.opaque() {
            Some(name) => {
                xattr::set(&parent, name, b"y").map_err(io_err("set opaque xattr on", &parent))
            }
            None => write_marker(&parent.join(OPAQUE_WHITEOUT)),
        };
    }
    let header = entry.header();
    let mode = numeric(&header.as_old().mode, header.mode().map(u64::from))? as u32 & 0o7777;
    let uid = numeric(&header.as_old().uid, header.uid())?;
    let gid = numeric(&header.as_old().gid, header.gid())?;
    let mut mtime = (numeric(&header.as_old().mtime, header.mtime())? as i64, 0);
    let uid = u32::try_from(uid).unwrap_or(u32::MAX);
    let gid = u32::try_from(gid).unwrap_or(u32::MAX);
    let device = (
        header.device_major().ok().flatten().unwrap_or(0),
        header.device_minor().ok().flatten().unwrap_or(0),
    );
    let link = entry.link_name_bytes().map(|l| l.into_owned());

    let mut xattrs = Vec::new();
    if let Some(extensions) = entry
        .pax_extensions()
        .map_err(|source| Error::Read { source })?
    {
        for ext in extensions {
            let ext = ext.map_err(|source| Error::Read { source })?;
            let Ok(key) = ext.key() else { continue };
            if let Some(xattr_name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                xattrs.push((xattr_name.to_owned(), ext.value_bytes().to_vec()));
            } else if key == "mtime" {
                if let Some(t) = parse_pax_time(ext.value_bytes()) {
                    mtime = t;
                }
            }
        }
    }

    if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(Error::UnsafePath {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason: "invalid whiteout name",
            });
        }
        if overlay == OverlayXattrs::Files {
            let hidden_target = parent.join(OsStr::from_bytes(hidden));
            remove_existing(&hidden_target)?;
            return write_marker(&parent.join(name));
        }
        let target = parent.join(OsStr::from_bytes(hidden));
        remove_existing(&target)?;
        mknod(
            &target,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            makedev(0, 0),
        )
        .map_err(nix_err("create whiteout", &target))?;
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
            .map_err(io_err("change owner of", &target))?;
        return set_mtime(&target, mtime);
    }

    let target = parent.join(name);
    let existing = fs::symlink_metadata(&target).ok();
    let keep_dir = kind == EntryType::Directory && existing.as_ref().is_some_and(|m| m.is_dir());
    if existing.is_some() && !keep_dir {
        remove_existing(&target)?;
    }

    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .map_err(io_err("create", &target))?;
            io::copy(entry, &mut file).map_err(|source| Error::Read { source })?;
        }
        EntryType::Directory => {
            if !keep_dir {
                fs::create_dir(&target).map_err(io_err("create directory", &target))?;
            }
        }
        EntryType::Symlink => {
            let link = link.ok_or_else(|| Error::UnsafePath {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason: "symlink without target",
            })?;
            std::os::unix::fs::symlink(OsStr::from_bytes(&link), &target)
                .map_err(io_err("create symlink", &target))?;
        }
        EntryType::Link => {
            let link = link.ok_or_else(|| Error::UnsafePath {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason: "hard link without target",
            })?;
            let link_components = clean_path(&link)?;
            let Some((link_name, link_parents)) = link_components.split_last() else {
                return Err(Error::UnsafePath {
                    path: String::from_utf8_lossy(&link).into_owned(),
                    reason: "hard link to the layer root",
                });
            };
            let source = safe_dir(dest, link_parents, &link, false)?.join(link_name);
            let meta =
                fs::symlink_metadata(&source).map_err(io_err("find hard link target", &source))?;
            if meta.is_dir() {
                return Err(Error::UnsafePath {
                    path: String::from_utf8_lossy(&link).into_owned(),
                    reason: "hard link to a directory",
                });
            }
            // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
            fs::hard_link(&source, &target).map_err(io_err("create hard link", &target))?;
            // The inode already carries its metadata.
            return Ok(());
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let sflag = match kind {
                EntryType::Char => SFlag::S_IFCHR,
                EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            let dev = makedev(u64::from(device.0), u64::from(device.1));
            mknod(&target, sflag, Mode::from_bits_truncate(mode), dev)
                .map_err(nix_err("create device node", &target))?;
        }
        other => {
            tracing::debug!(path = %String::from_utf8_lossy(&raw), kind = ?other, "skipping unsupported tar entry type");
            return Ok(());
        }
    }

    let is_symlink = kind == EntryType::Symlink;
    std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
        .map_err(io_err("change owner of", &target))?;
    for (name, value) in &xattrs {
        if let Err(e) = xattr::set(&target, name, value) {
            let unsupported = e.raw_os_error() == Some(libc::ENOTSUP)
                || (is_symlink && e.raw_os_error() == Some(libc::EPERM));
            if !unsupported {
                return Err(io_err("set xattr on", &target)(e));
            }
            tracing::debug!(path = %target.display(), xattr = %name, error = %e, "xattr not supported, skipped");
        }
    }
    if !is_symlink {
        // After chown, which clears setuid/setgid bits.
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .map_err(io_err("change mode of", &target))?;
    }
    if kind == EntryType::Directory {
        dir_times.push((target, mtime));
    } else {
        set_mtime(&target, mtime)?;
    }
    Ok(())
}

/// Writes the overlayfs upper dir `upper` as a gzip-compressed OCI layer tar to `out` (with
/// [`ParallelGzEncoder`](crate::compression::ParallelGzEncoder): all cores, same bytes every run).
///
/// Entries are written depth-first with each directory's children sorted by name, headers carry
/// only what `lstat` says (mode, uid, gid, size, mtime in whole seconds, device numbers; no user or
/// group names), so identical trees give identical bytes. Char devices 0/0 become `.wh.NAME`,
/// directories with `trusted.overlay.opaque=y` are followed by `DIR/.wh..wh..opq`, files with
/// several links inside the layer become tar hard links, other xattrs (except
/// `trusted.overlay.*`) are kept as PAX `SCHILY.xattr.*` records, and names that do not fit in a
/// ustar header use PAX. The diff id and the compressed digest and size are computed in the same
/// pass.
pub fn diff_upper(upper: &Path, out: impl Write) -> Result<LayerBlob> {
    diff_upper_with(upper, out, OverlayXattrs::Trusted)
}

/// [`diff_upper`] of an upper dir whose overlayfs attributes are in the `xattrs` namespace.
pub fn diff_upper_with(upper: &Path, out: impl Write, xattrs: OverlayXattrs) -> Result<LayerBlob> {
    let compressed = DigestWriter::new(out);
    let uncompressed = DigestWriter::new(compressor(compressed));
    let mut writer = TarWriter {
        out: uncompressed,
        links: HashMap::new(),
        overlay: xattrs,
    };
    writer.walk(upper, b"")?;
    // End of archive: two zero blocks.
    writer
        .out
        .write_all(&[0u8; 1024])
        .map_err(|source| Error::Write { source })?;
    let (encoder, diff_id, _) = writer.out.finish();
    let compressed = finish_compressor(encoder).map_err(|source| Error::Write { source })?;
    let (mut out, digest, size) = compressed.finish();
    out.flush().map_err(|source| Error::Write { source })?;
    Ok(LayerBlob {
        diff_id,
        digest,
        size,
    })
}

struct TarWriter<W: Write> {
    out: W,
    /// (dev, ino) of multiply-linked files already written → their path in the tar.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Where overlayfs' own attributes are (dropped from the layer).
    overlay: OverlayXattrs,
}

/// Header fields of one entry.
struct EntryMeta {
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    device: (u32, u32),
}

impl EntryMeta {
    fn from_lstat(kind: EntryType, meta: &fs::Metadata) -> Self {
        let rdev = meta.rdev();
        Self {
            kind,
            mode: meta.mode() & 0o7777,
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            mtime: u64::try_from(meta.mtime()).unwrap_or(0),
            size: 0,
            device: (
                u32::try_from(major(rdev)).unwrap_or(u32::MAX),
                u32::try_from(minor(rdev)).unwrap_or(u32::MAX),
            ),
        }
    }
}

const USTAR_NAME_LEN: usize = 100;
const USTAR_PREFIX_LEN: usize = 155;
const USTAR_MAX_SIZE: u64 = 0o777_7777_7777;

/// Puts `path` into the ustar name/prefix fields if it fits.
fn set_ustar_name(header: &mut Header, path: &[u8]) -> bool {
    let Some(ustar) = header.as_ustar_mut() else {
        return false;
    };
    if path.len() <= USTAR_NAME_LEN {
        ustar.name[..path.len()].copy_from_slice(path);
        return true;
    }
    let split = path.iter().enumerate().position(|(i, &b)| {
        b == b'/'
            && i <= USTAR_PREFIX_LEN
            && path.len() - i - 1 <= USTAR_NAME_LEN
            && path.len() - i - 1 > 0
    });
    match split {
        Some(i) => {
            ustar.prefix[..i].copy_from_slice(&path[..i]);
            ustar.name[..path.len() - i - 1].copy_from_slice(&path[i + 1..]);
            true
        }
        None => false,
    }
}

impl<W: Write> TarWriter<W> {
    fn walk(&mut self, dir: &Path, rel: &[u8]) -> Result<()> {
        let mut children: Vec<(OsString, PathBuf)> = fs::read_dir(dir)
            .map_err(io_err("read directory", dir))?
            .map(|e| e.map(|e| (e.file_name(), e.path())))
            .collect::<io::Result<_>>()
            .map_err(io_err("read directory", dir))?;
        children.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (name, path) in children {
            let mut tar_path = rel.to_vec();
            if !tar_path.is_empty() {
                tar_path.push(b'/');
            }
            tar_path.extend_from_slice(name.as_bytes());
            let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_dir() {
                let mut dir_path = tar_path.clone();
                dir_path.push(b'/');
                let xattrs = self.xattrs(&path)?;
                self.append(
                    &dir_path,
                    EntryMeta::from_lstat(EntryType::Directory, &meta),
                    None,
                    &xattrs,
                    io::empty(),
                )?;
                let opaque = match self.overlay.opaque() {
                    Some(name) => {
                        xattr::get(&path, name).map_err(io_err("read xattr of", &path))?
                    }
                    None => None,
                };
                if opaque.as_deref() == Some(b"y") {
                    let mut opq = dir_path.clone();
                    opq.extend_from_slice(OPAQUE_WHITEOUT.as_bytes());
                    let mut m = EntryMeta::from_lstat(EntryType::Regular, &meta);
                    m.mode = 0o644;
                    self.append(&opq, m, None, &BTreeMap::new(), io::empty())?;
                }
                self.walk(&path, &tar_path)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    let key = (meta.dev(), meta.ino());
                    if let Some(first) = self.links.get(&key).cloned() {
                        let m = EntryMeta::from_lstat(EntryType::Link, &meta);
                        self.append(&tar_path, m, Some(&first), &BTreeMap::new(), io::empty())?;
                        continue;
                    }
                    self.links.insert(key, tar_path.clone());
                }
                let xattrs = self.xattrs(&path)?;
                let mut m = EntryMeta::from_lstat(EntryType::Regular, &meta);
                m.size = meta.len();
                let file = fs::File::open(&path).map_err(io_err("open", &path))?;
                self.append(&tar_path, m, None, &xattrs, file.take(meta.len()))?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err("read symlink", &path))?;
                let xattrs = self.xattrs(&path)?;
                let m = EntryMeta::from_lstat(EntryType::Symlink, &meta);
                self.append(
                    &tar_path,
                    m,
                    Some(target.as_os_str().as_bytes()),
                    &xattrs,
                    io::empty(),
                )?;
            } else if ft.is_char_device() && meta.rdev() == 0 {
                let mut wh = rel.to_vec();
                if !wh.is_empty() {
                    wh.push(b'/');
                }
                wh.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
                wh.extend_from_slice(name.as_bytes());
                let m = EntryMeta::from_lstat(EntryType::Regular, &meta);
                self.append(&wh, m, None, &BTreeMap::new(), io::empty())?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let kind = if ft.is_char_device() {
                    EntryType::Char
                } else if ft.is_block_device() {
                    EntryType::Block
                } else {
                    EntryType::Fifo
                };
                let xattrs = self.xattrs(&path)?;
                self.append(
                    &tar_path,
                    EntryMeta::from_lstat(kind, &meta),
                    None,
                    &xattrs,
                    io::empty(),
                )?;
            } else {
                tracing::debug!(path = %path.display(), "skipping socket in layer diff");
            }
        }
        Ok(())
    }

    /// The xattrs to carry, sorted by name (overlayfs' own are internal and dropped).
    fn xattrs(&self, path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        let names = match xattr::list(path) {
            Ok(names) => names,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
            Err(e) => return Err(io_err("list xattrs of", path)(e)),
        };
        for name in names {
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            if self.overlay.prefix().is_some_and(|p| name.starts_with(p)) {
                continue;
            }
            if let Some(value) = xattr::get(path, &name).map_err(io_err("read xattr of", path))? {
                out.insert(name, value);
            }
        }
        Ok(out)
    }

    fn append(
        &mut self,
        path: &[u8],
        meta: EntryMeta,
        link: Option<&[u8]>,
        xattrs: &BTreeMap<String, Vec<u8>>,
        mut data: impl Read,
    ) -> Result<()> {
        let mut header = Header::new_ustar();
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if !set_ustar_name(&mut header, path) {
            let cut = &path[..path.len().min(USTAR_NAME_LEN)];
            set_ustar_name(&mut header, cut);
            pax.push(("path".to_owned(), path.to_vec()));
        }
        if let Some(link) = link {
            if link.len() <= USTAR_NAME_LEN {
                header
                    .set_link_name_literal(link)
                    .map_err(|source| Error::Write { source })?;
            } else {
                pax.push(("linkpath".to_owned(), link.to_vec()));
            }
        }
        if meta.size > USTAR_MAX_SIZE {
            pax.push(("size".to_owned(), meta.size.to_string().into_bytes()));
        }
        for (name, value) in xattrs {
            pax.push((format!("{PAX_XATTR_PREFIX}{name}"), value.clone()));
        }
        header.set_entry_type(meta.kind);
        header.set_mode(meta.mode);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(meta.mtime);
        header.set_size(meta.size);
        if matches!(meta.kind, EntryType::Char | EntryType::Block) {
            header
                .set_device_major(meta.device.0)
                .map_err(|source| Error::Write { source })?;
            header
                .set_device_minor(meta.device.1)
                .map_err(|source| Error::Write { source })?;
        }
        header.set_cksum();
        if !pax.is_empty() {
            self.write_pax(path, &pax, meta.mtime)?;
        }
        self.out
            .write_all(header.as_bytes())
            .map_err(|source| Error::Write { source })?;
        let copied =
            io::copy(&mut data, &mut self.out).map_err(|source| Error::Write { source })?;
        if copied != meta.size {
            // The file changed size under us; the tar would be corrupt.
            return Err(Error::Write {
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} changed size while being archived",
                        String::from_utf8_lossy(path)
                    ),
                ),
            });
        }
        self.pad(meta.size)
    }

    fn write_pax(&mut self, path: &[u8], records: &[(String, Vec<u8>)], mtime: u64) -> Result<()> {
        let mut data = Vec::new();
        for (key, value) in records {
            // "<len> <key>=<value>\n" where <len> counts itself.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut header = Header::new_ustar();
        let base = path
            .rsplit(|&b| b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b"entry");
        let mut name = b"PaxHeaders/".to_vec();
        name.extend_from_slice(&base[..base.len().min(USTAR_NAME_LEN - name.len())]);
        set_ustar_name(&mut header, &name);
        header.set_entry_type(EntryType::XHeader);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.out
            .write_all(header.as_bytes())
            .map_err(|source| Error::Write { source })?;
        self.out
            .write_all(&data)
            .map_err(|source| Error::Write { source })?;
        self.pad(data.len() as u64)
    }

    fn pad(&mut self, size: u64) -> Result<()> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out
                .write_all(&[0u8; 512][..512 - rem])
                .map_err(|source| Error::Write { source })?;
        }
        Ok(())
    }
}
