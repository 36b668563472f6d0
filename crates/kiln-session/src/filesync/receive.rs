//! fsutil DiffCopy **receiver** (daemon end): validates the STAT stream,
//! makes the destination match it and fetches only the files it needs.
//!
//! Safety against a hostile client: every path is checked to be clean,
//! relative, ordered and under a directory already sent, and the destination
//! is never written through a symlink — each parent is a real directory we
//! checked or created, files are written to a fresh temporary name
//! (`O_EXCL`) and renamed into place, and metadata calls on final paths do
//! not follow symlinks.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, FileTimes, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use kiln_proto::fsutil::types::{Packet, PacketType, Stat};
use kiln_proto::moby::filesync::v1::file_sync_client::FileSyncClient;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{Differ, ReceiveRequest, TransferStats};
use crate::stat::{
    compare_path, go_mode, kind, mtime_nanos, parent, path_problem, unix_perm, Kind,
};
use crate::{metadata, Error, MAX_MESSAGE_SIZE};

const METHOD: &str = "/moby.filesync.v1.FileSync/DiffCopy";

/// Pulls `request.dir_name` from the session into `request.dest`.
pub async fn receive(channel: Channel, request: ReceiveRequest) -> Result<TransferStats, Error> {
    let (tx, rx) = mpsc::channel::<Packet>(64);
    let mut grpc_request = tonic::Request::new(ReceiverStream::new(rx));
    let md = grpc_request.metadata_mut();
    metadata::append_values(md, "dir-name", std::slice::from_ref(&request.dir_name))?;
    metadata::append_values(md, "include-patterns", &request.include_patterns)?;
    metadata::append_values(md, "exclude-patterns", &request.exclude_patterns)?;
    metadata::append_values(md, "followpaths", &request.followpaths)?;

    let mut client = FileSyncClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let inbound = client
        .diff_copy(grpc_request)
        .await
        .map_err(|status| Error::Rpc {
            method: METHOD,
            status,
        })?
        .into_inner();
    let options = ReceiveOptions {
        dest: request.dest.clone(),
        differ: request.differ,
        merge: false,
        owner: (0, 0),
        method: METHOD,
    };
    receive_packets(inbound, tx, options).await
}

/// How [`receive_packets`] writes into its destination.
#[derive(Debug, Clone)]
pub(crate) struct ReceiveOptions {
    /// Destination directory (created when missing).
    pub(crate) dest: PathBuf,
    /// Which files to fetch.
    pub(crate) differ: Differ,
    /// Merge: keep entries of `dest` the sender did not list (the local
    /// exporter); otherwise `dest` is made to match exactly.
    pub(crate) merge: bool,
    /// Owner `(uid, gid)` of everything written (`EPERM` is ignored, so an
    /// unprivileged receiver keeps its own).
    pub(crate) owner: (u32, u32),
    /// The gRPC method, for error messages.
    pub(crate) method: &'static str,
}

/// The receiver half of DiffCopy over any packet stream: `inbound` from the
/// sender, `tx` towards it. On failure an ERR packet tells the sender why.
pub(crate) async fn receive_packets<S>(
    mut inbound: S,
    tx: mpsc::Sender<Packet>,
    options: ReceiveOptions,
) -> Result<TransferStats, Error>
where
    S: Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    let mut receiver = Receiver {
        options,
        inbound: &mut inbound,
        tx: tx.clone(),
    };
    match receiver.run().await {
        Ok(stats) => Ok(stats),
        Err(error) => {
            // Best effort: tell the sender why we stop.
            let _ = tx.try_send(Packet {
                r#type: PacketType::PacketErr as i32,
                data: crate::error_chain(&error).into_bytes(),
                ..Packet::default()
            });
            Err(error)
        }
    }
}

struct Receiver<'a, S> {
    options: ReceiveOptions,
    inbound: &'a mut S,
    tx: mpsc::Sender<Packet>,
}

/// A file being written: temporary file, final path and its STAT.
struct Incoming {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    stat: Stat,
}

impl<S> Receiver<'_, S>
where
    S: Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    async fn next(&mut self, context: &'static str) -> Result<Packet, Error> {
        let method = self.options.method;
        let packet = self
            .inbound
            .next()
            .await
            .transpose()
            .map_err(|status| Error::Rpc { method, status })?
            .ok_or(Error::StreamEnded { context })?;
        if packet.r#type == PacketType::PacketErr as i32 {
            return Err(Error::Remote {
                message: String::from_utf8_lossy(&packet.data).into_owned(),
            });
        }
        Ok(packet)
    }

    async fn run(&mut self) -> Result<TransferStats, Error> {
        let stats = self.read_stats().await?;
        let dest = self.options.dest.clone();
        let owner = self.options.owner;
        fs::create_dir_all(&dest)
            .map_err(|source| Error::io("create destination", &dest, source))?;
        if !self.options.merge {
            let wanted: HashMap<&str, usize> = stats
                .iter()
                .enumerate()
                .map(|(i, s)| (s.path.as_str(), i))
                .collect();
            remove_unlisted(&dest, "", &stats, &wanted)?;
        }

        let mut needed: Vec<u32> = Vec::new();
        let mut hardlinks: Vec<&Stat> = Vec::new();
        for (index, stat) in stats.iter().enumerate() {
            let target = dest.join(&stat.path);
            let existing = fs::symlink_metadata(&target).ok();
            match kind(stat.mode) {
                Kind::Dir => {
                    // Anything but a real directory (a symlink above all) is
                    // replaced, so nothing below is written through a link.
                    if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                        remove_existing(&target, existing.as_ref())?;
                    }
                    if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                        fs::create_dir(&target)
                            .map_err(|source| Error::io("create directory", &target, source))?;
                    }
                }
                Kind::Symlink => {
                    let same = existing.is_some()
                        && fs::read_link(&target).ok().as_deref()
                            == Some(Path::new(&stat.linkname));
                    if !same {
                        remove_existing(&target, existing.as_ref())?;
                        std::os::unix::fs::symlink(&stat.linkname, &target)
                            .map_err(|source| Error::io("create symlink", &target, source))?;
                    }
                }
                Kind::File if !stat.linkname.is_empty() => hardlinks.push(stat),
                Kind::File => {
                    let unchanged = self.options.differ == Differ::Metadata
                        && existing.as_ref().is_some_and(|m| {
                            m.is_file()
                                && m.len() as i64 == stat.size
                                && mtime_nanos(m) == stat.mod_time
                                && go_mode(m) == stat.mode
                        });
                    if !unchanged {
                        needed.push(index as u32);
                    }
                }
                Kind::Fifo | Kind::BlockDevice | Kind::CharDevice => {
                    remove_existing(&target, existing.as_ref())?;
                    make_node(&target, stat)?;
                }
                Kind::Socket => {}
            }
        }

        let bytes_received = self.fetch(&stats, &needed).await?;

        for stat in &hardlinks {
            let target = dest.join(&stat.path);
            remove_existing(&target, fs::symlink_metadata(&target).ok().as_ref())?;
            fs::hard_link(dest.join(&stat.linkname), &target)
                .map_err(|source| Error::io("create hardlink", &target, source))?;
        }
        // Metadata of everything but regular files (set when written), deepest
        // first so directory mtimes are not disturbed afterwards.
        for stat in stats.iter().rev() {
            match kind(stat.mode) {
                Kind::File | Kind::Socket => {}
                entry_kind => set_metadata(&dest.join(&stat.path), stat, entry_kind, owner)?,
            }
        }

        self.tx
            .send(Packet {
                r#type: PacketType::PacketFin as i32,
                ..Packet::default()
            })
            .await
            .map_err(|_| Error::StreamEnded {
                context: "before FIN could be sent",
            })?;
        // Drain until the sender ends the stream.
        loop {
            match self.inbound.next().await {
                Some(Ok(packet)) if packet.r#type == PacketType::PacketErr as i32 => {
                    return Err(Error::Remote {
                        message: String::from_utf8_lossy(&packet.data).into_owned(),
                    })
                }
                Some(Ok(_)) => {}
                None => break,
                Some(Err(status)) => {
                    return Err(Error::Rpc {
                        method: self.options.method,
                        status,
                    })
                }
            }
        }
        Ok(TransferStats {
            files_requested: needed.len() as u64,
            bytes_received,
        })
    }

    /// Reads and validates STAT packets up to the empty one.
    async fn read_stats(&mut self) -> Result<Vec<Stat>, Error> {
        let mut list = StatList::default();
        loop {
            let packet = self.next("before the end of the file list").await?;
            if packet.r#type != PacketType::PacketStat as i32 {
                return Err(Error::UnexpectedPacket {
                    packet: packet_name(packet.r#type),
                    context: "before the end of the file list",
                });
            }
            match packet.stat {
                Some(stat) => list.push(stat)?,
                None => return Ok(list.stats),
            }
        }
    }

    /// Requests `needed` and writes the DATA that comes back; returns the
    /// number of bytes received.
    async fn fetch(&mut self, stats: &[Stat], needed: &[u32]) -> Result<u64, Error> {
        if needed.is_empty() {
            return Ok(0);
        }
        // Requests go out from their own task: the sender answers each REQ
        // with DATA we must keep reading, or both ends stall.
        let requests = self.tx.clone();
        let ids = needed.to_vec();
        let request_task = tokio::spawn(async move {
            for id in ids {
                let packet = Packet {
                    r#type: PacketType::PacketReq as i32,
                    id,
                    ..Packet::default()
                };
                if requests.send(packet).await.is_err() {
                    break;
                }
            }
        });
        let result = self.write_data(stats, needed).await;
        request_task.abort();
        result
    }

    async fn write_data(&mut self, stats: &[Stat], needed: &[u32]) -> Result<u64, Error> {
        let mut outstanding: HashSet<u32> = needed.iter().copied().collect();
        let mut open: HashMap<u32, Incoming> = HashMap::new();
        let mut total = 0u64;
        while !outstanding.is_empty() {
            let packet = self.next("while receiving file data").await?;
            if packet.r#type != PacketType::PacketData as i32 {
                return Err(Error::UnexpectedPacket {
                    packet: packet_name(packet.r#type),
                    context: "while receiving file data",
                });
            }
            let id = packet.id;
            if !outstanding.contains(&id) {
                return Err(Error::UnknownFileId { id });
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = open.entry(id) {
                slot.insert(self.create_temp(stats[id as usize].clone(), id)?);
            }
            if packet.data.is_empty() {
                if let Some(incoming) = open.remove(&id) {
                    finish_file(incoming, self.options.owner)?;
                }
                outstanding.remove(&id);
                continue;
            }
            if let Some(incoming) = open.get_mut(&id) {
                incoming
                    .file
                    .write_all(&packet.data)
                    .map_err(|source| Error::io("write", &incoming.temp, source))?;
                total += packet.data.len() as u64;
            }
        }
        Ok(total)
    }

    fn create_temp(&self, stat: Stat, id: u32) -> Result<Incoming, Error> {
        let target = self.options.dest.join(&stat.path);
        let dir = target.parent().unwrap_or(&self.options.dest).to_path_buf();
        let temp = dir.join(format!(".kiln-receive-{id}-{:08x}", rand::random::<u32>()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&temp)
            .map_err(|source| Error::io("create", &temp, source))?;
        Ok(Incoming {
            file,
            temp,
            target,
            stat,
        })
    }
}

/// Sets mode, owner and mtime on the open file, then renames it into place
/// (rename replaces a symlink at the target rather than following it).
fn finish_file(incoming: Incoming, (uid, gid): (u32, u32)) -> Result<(), Error> {
    let Incoming {
        file,
        temp,
        target,
        stat,
    } = incoming;
    let result = (|| {
        file.set_permissions(Permissions::from_mode(unix_perm(stat.mode)))?;
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).or_else(ignore_eperm)?;
        let time = system_time(stat.mod_time);
        file.set_times(FileTimes::new().set_modified(time).set_accessed(time))?;
        Ok(())
    })();
    drop(file);
    if let Err(source) = result {
        let _ = fs::remove_file(&temp);
        return Err(Error::io("set metadata of", &target, source));
    }
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(&target).map_err(|source| Error::io("remove", &target, source))?;
    }
    fs::rename(&temp, &target).map_err(|source| {
        let _ = fs::remove_file(&temp);
        Error::io("rename into", &target, source)
    })
}

fn ignore_eperm(error: std::io::Error) -> std::io::Result<()> {
    // Unprivileged daemons keep their own ownership.
    if error.kind() == std::io::ErrorKind::PermissionDenied {
        Ok(())
    } else {
        Err(error)
    }
}

fn system_time(nanos: i64) -> SystemTime {
    if nanos >= 0 {
        UNIX_EPOCH + Duration::from_nanos(nanos as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
    }
}

fn set_metadata(
    path: &Path,
    stat: &Stat,
    entry_kind: Kind,
    (uid, gid): (u32, u32),
) -> Result<(), Error> {
    if entry_kind != Kind::Symlink {
        // Not a symlink (we created or checked it), so this does not follow one.
        fs::set_permissions(path, Permissions::from_mode(unix_perm(stat.mode)))
            .map_err(|source| Error::io("chmod", path, source))?;
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .or_else(ignore_eperm)
        .map_err(|source| Error::io("chown", path, source))?;
    let time = TimeSpec::new(
        stat.mod_time.div_euclid(1_000_000_000),
        stat.mod_time.rem_euclid(1_000_000_000),
    );
    nix::sys::stat::utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink)
        .map_err(|errno| Error::io("set times of", path, errno.into()))
}

fn make_node(path: &Path, stat: &Stat) -> Result<(), Error> {
    let perm = Mode::from_bits_truncate(unix_perm(stat.mode) as nix::libc::mode_t);
    let result = match kind(stat.mode) {
        Kind::Fifo => nix::unistd::mkfifo(path, perm),
        Kind::BlockDevice | Kind::CharDevice => {
            let flag = if kind(stat.mode) == Kind::CharDevice {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            let dev = nix::sys::stat::makedev(stat.devmajor as u64, stat.devminor as u64);
            nix::sys::stat::mknod(path, flag, perm, dev)
        }
        _ => Ok(()),
    };
    result.map_err(|errno| Error::io("create node", path, errno.into()))
}

/// Removes whatever is at `path` (never following a symlink).
fn remove_existing(path: &Path, existing: Option<&fs::Metadata>) -> Result<(), Error> {
    match existing {
        None => Ok(()),
        Some(m) if m.is_dir() => {
            fs::remove_dir_all(path).map_err(|source| Error::io("remove", path, source))
        }
        Some(_) => fs::remove_file(path).map_err(|source| Error::io("remove", path, source)),
    }
}

/// Deletes entries under `dest/rel_dir` that the sender did not list, or
/// whose directory-ness differs from what it listed.
fn remove_unlisted(
    dest: &Path,
    rel_dir: &str,
    stats: &[Stat],
    wanted: &HashMap<&str, usize>,
) -> Result<(), Error> {
    let dir = dest.join(rel_dir);
    let reader = fs::read_dir(&dir).map_err(|source| Error::io("read directory", &dir, source))?;
    for entry in reader {
        let entry = entry.map_err(|source| Error::io("read directory", &dir, source))?;
        let path = entry.path();
        let metadata =
            fs::symlink_metadata(&path).map_err(|source| Error::io("stat", &path, source))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            remove_existing(&path, Some(&metadata))?;
            continue;
        };
        let rel = if rel_dir.is_empty() {
            name
        } else {
            format!("{rel_dir}/{name}")
        };
        match wanted.get(rel.as_str()) {
            None => remove_existing(&path, Some(&metadata))?,
            Some(&index) => {
                let wants_dir = kind(stats[index].mode) == Kind::Dir;
                if wants_dir != metadata.is_dir() {
                    remove_existing(&path, Some(&metadata))?;
                } else if wants_dir {
                    remove_unlisted(dest, &rel, stats, wanted)?;
                }
            }
        }
    }
    Ok(())
}

/// The STAT list as received, validated entry by entry.
#[derive(Debug, Default)]
struct StatList {
    stats: Vec<Stat>,
    dirs: HashSet<String>,
    files: HashSet<String>,
    symlinks: HashSet<String>,
}

impl StatList {
    /// Appends `stat` if its path is clean and relative, sorts after the
    /// previous one, sits in a directory already listed and (for hardlinks)
    /// names a regular file already listed.
    fn push(&mut self, stat: Stat) -> Result<(), Error> {
        if let Some(reason) = path_problem(&stat.path) {
            return Err(Error::InvalidPath {
                path: stat.path,
                reason,
            });
        }
        if let Some(previous) = self.stats.last() {
            if compare_path(&previous.path, &stat.path) != std::cmp::Ordering::Less {
                return Err(Error::OutOfOrder {
                    path: stat.path,
                    previous: previous.path.clone(),
                });
            }
        }
        let parent_dir = parent(&stat.path);
        if self.symlinks.contains(parent_dir) {
            return Err(Error::InvalidPath {
                path: stat.path,
                reason: "path goes through a symlink",
            });
        }
        if !parent_dir.is_empty() && !self.dirs.contains(parent_dir) {
            return Err(Error::ParentMissing { path: stat.path });
        }
        match kind(stat.mode) {
            Kind::Dir => {
                self.dirs.insert(stat.path.clone());
            }
            Kind::Symlink => {
                self.symlinks.insert(stat.path.clone());
            }
            Kind::File if stat.linkname.is_empty() => {
                self.files.insert(stat.path.clone());
            }
            Kind::File if !self.files.contains(&stat.linkname) => {
                return Err(Error::InvalidHardlink {
                    path: stat.path,
                    target: stat.linkname,
                });
            }
            _ => {}
        }
        self.stats.push(stat);
        Ok(())
    }
}

fn packet_name(packet_type: i32) -> &'static str {
    match PacketType::try_from(packet_type) {
        Ok(PacketType::PacketStat) => "STAT",
        Ok(PacketType::PacketReq) => "REQ",
        Ok(PacketType::PacketData) => "DATA",
        Ok(PacketType::PacketFin) => "FIN",
        Ok(PacketType::PacketErr) => "ERR",
        Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::filemode;

    fn stat(path: &str, mode: u32, linkname: &str) -> Stat {
        Stat {
            path: path.to_string(),
            mode,
            linkname: linkname.to_string(),
            ..Stat::default()
        }
    }

    #[test]
    fn stat_list_validation_table() {
        const DIR: u32 = filemode::DIR | 0o755;
        const FILE: u32 = 0o644;
        // (entries, expected error text or None)
        type Entry = (&'static str, u32, &'static str);
        let cases: &[(&[Entry], Option<&str>)] = &[
            (
                &[("a", DIR, ""), ("a/b", FILE, ""), ("a.b", FILE, "")],
                None,
            ),
            (&[("a", FILE, ""), ("hard", FILE, "a")], None),
            (
                &[("../x", FILE, "")],
                Some("invalid path \"../x\": path escapes the destination"),
            ),
            (
                &[("/etc", DIR, "")],
                Some("invalid path \"/etc\": absolute path"),
            ),
            (
                &[("a//b", FILE, "")],
                Some("invalid path \"a//b\": path is not clean"),
            ),
            (
                &[("b", FILE, ""), ("a", FILE, "")],
                Some("changes out of order: \"a\" after \"b\""),
            ),
            (
                &[("a.b", FILE, ""), ("a", DIR, ""), ("a/b", FILE, "")],
                Some("changes out of order: \"a\" after \"a.b\""),
            ),
            (
                &[("a", FILE, ""), ("a/b", FILE, "")],
                Some("changes out of order: parent of \"a/b\" not seen as a directory"),
            ),
            (
                &[("x/y", FILE, "")],
                Some("changes out of order: parent of \"x/y\" not seen as a directory"),
            ),
            (
                &[("a", DIR, ""), ("b", FILE, "a")],
                Some("invalid hardlink \"b\" to \"a\""),
            ),
            (
                &[
                    ("l", filemode::SYMLINK | 0o777, "/etc"),
                    ("l/passwd", FILE, ""),
                ],
                Some("invalid path \"l/passwd\": path goes through a symlink"),
            ),
            (
                &[("a", FILE, ""), ("b", FILE, "../a")],
                Some("invalid hardlink \"b\" to \"../a\""),
            ),
        ];
        for (entries, want) in cases {
            let mut list = StatList::default();
            let result = entries
                .iter()
                .try_for_each(|(path, mode, link)| list.push(stat(path, *mode, link)));
            let got = result.err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), *want, "{entries:?}");
        }
    }

    /// Runs the receiver over a scripted sender and returns its error text
    /// and the packets it sent back.
    async fn receive_scripted(dest: &Path, stats: Vec<Stat>) -> (String, Vec<Packet>) {
        let mut packets: Vec<Result<Packet, tonic::Status>> = stats
            .into_iter()
            .map(|stat| {
                Ok(Packet {
                    r#type: PacketType::PacketStat as i32,
                    stat: Some(stat),
                    ..Packet::default()
                })
            })
            .collect();
        packets.push(Ok(Packet {
            r#type: PacketType::PacketStat as i32,
            ..Packet::default()
        }));
        let (tx, mut rx) = mpsc::channel(16);
        let options = ReceiveOptions {
            dest: dest.to_path_buf(),
            differ: Differ::Metadata,
            merge: true,
            owner: (0, 0),
            method: "test",
        };
        let error = receive_packets(futures::stream::iter(packets), tx, options)
            .await
            .unwrap_err();
        let mut back = Vec::new();
        while let Ok(packet) = rx.try_recv() {
            back.push(packet);
        }
        (error.to_string(), back)
    }

    #[tokio::test]
    async fn hostile_paths_are_refused_and_nothing_is_written_outside() {
        const DIR: u32 = filemode::DIR | 0o755;
        const LINK: u32 = filemode::SYMLINK | 0o777;
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let dest = temp.path().join("dest");
        let outside_text = outside.display().to_string();
        let cases: Vec<(Vec<Stat>, &str)> = vec![
            (
                vec![stat("../outside/x", 0o644, "")],
                "invalid path \"../outside/x\": path escapes the destination",
            ),
            (
                vec![stat("a", DIR, ""), stat("a/../../x", 0o644, "")],
                "invalid path \"a/../../x\": path escapes the destination",
            ),
            (vec![stat(&outside_text, 0o644, "")], "absolute path"),
            (
                vec![stat("l", LINK, &outside_text), stat("l/x", 0o644, "")],
                "invalid path \"l/x\": path goes through a symlink",
            ),
        ];
        for (stats, want) in cases {
            let (error, back) = receive_scripted(&dest, stats).await;
            assert!(error.contains(want), "{error} (want {want})");
            // The sender is told why.
            assert!(
                back.iter().any(|p| p.r#type == PacketType::PacketErr as i32
                    && String::from_utf8_lossy(&p.data).contains(want)),
                "{back:?}"
            );
            assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        }
    }
}
