//! fsutil DiffCopy **sender**: walks a local directory in `ComparePath`
//! order, sends one STAT per entry and serves file contents on request.

use std::collections::{BTreeMap, HashMap};
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use kiln_proto::fsutil::types::{Packet, PacketType, Stat};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::patterns::PatternMatcher;
use crate::stat::{go_mode, kind, mtime_nanos, Kind};
use crate::Error;

/// Size of one DATA chunk.
const CHUNK: usize = 32 * 1024;

/// One entry of the walk: what is sent and where it lives.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The STAT sent for it.
    pub(crate) stat: Stat,
    /// Absolute path on disk.
    pub(crate) source: PathBuf,
}

/// Filters applied during the walk.
#[derive(Debug, Default)]
pub(crate) struct WalkFilter {
    /// Only these paths (and their parents) when non-empty.
    pub(crate) includes: PatternMatcher,
    /// Paths dropped (with `!` exceptions).
    pub(crate) excludes: PatternMatcher,
}

impl WalkFilter {
    /// Builds the filter from the request's patterns; `followpaths` are
    /// added to the includes together with the targets of symlinks among
    /// them.
    pub(crate) fn new(
        root: &Path,
        include_patterns: &[String],
        exclude_patterns: &[String],
        followpaths: &[String],
    ) -> Result<Self, Error> {
        let mut includes: Vec<String> = include_patterns.to_vec();
        for path in follow_links(root, followpaths) {
            includes.push(escape_pattern(&path));
        }
        Ok(WalkFilter {
            includes: PatternMatcher::new(&includes)?,
            excludes: PatternMatcher::new(exclude_patterns)?,
        })
    }
}

/// Escapes glob syntax so a literal path can be used as a pattern.
fn escape_pattern(path: &str) -> String {
    let mut escaped = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// The paths themselves plus, for each that is a symlink inside `root`, its
/// target (followed up to 40 links).
fn follow_links(root: &Path, paths: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for path in paths {
        let mut current = clean_relative(path);
        for _ in 0..40 {
            if current.is_empty() || out.contains(&current) {
                break;
            }
            out.push(current.clone());
            let Ok(target) = std::fs::read_link(root.join(&current)) else {
                break;
            };
            let target = target.to_string_lossy().into_owned();
            current = if target.starts_with('/') {
                clean_relative(&target)
            } else {
                let parent = crate::stat::parent(&current);
                clean_relative(&format!("{parent}/{target}"))
            };
        }
    }
    out
}

/// Lexically cleans a path and makes it relative to the root (`..` cannot
/// climb above it).
fn clean_relative(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

/// Walks `root` and returns the entries to send, in order.
/// The entries of several trees as one sorted transfer: each tree's paths under its prefix
/// (the prefix directory itself sent with the tree root's mode and time), or, without a
/// prefix, at the top. A path present in several trees is sent from the last (a merge, the
/// later tree winning, as BuildKit's `platform-split=false`).
pub(crate) fn combine(
    trees: Vec<(Option<String>, PathBuf, Vec<Entry>)>,
) -> Result<Vec<Entry>, Error> {
    // fsutil's ComparePath order: component by component, i.e. `/` sorting before any byte.
    let key = |path: &str| -> Vec<u8> {
        path.bytes()
            .map(|b| if b == b'/' { 0 } else { b })
            .collect()
    };
    let mut out: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    for (prefix, root, entries) in trees {
        if let Some(prefix) = &prefix {
            let metadata = std::fs::symlink_metadata(&root)
                .map_err(|source| Error::io("stat", &root, source))?;
            let stat = Stat {
                path: prefix.clone(),
                mode: go_mode(&metadata),
                mod_time: mtime_nanos(&metadata),
                ..Stat::default()
            };
            out.insert(
                key(prefix),
                Entry {
                    stat,
                    source: root.clone(),
                },
            );
        }
        for mut entry in entries {
            if let Some(prefix) = &prefix {
                entry.stat.path = format!("{prefix}/{}", entry.stat.path);
                // A hard link names the first path of its inode in the same transfer.
                if kind(entry.stat.mode) == Kind::File && !entry.stat.linkname.is_empty() {
                    entry.stat.linkname = format!("{prefix}/{}", entry.stat.linkname);
                }
            }
            out.insert(key(&entry.stat.path), entry);
        }
    }
    Ok(out.into_values().collect())
}

pub(crate) fn walk(root: &Path, filter: &WalkFilter) -> Result<Vec<Entry>, Error> {
    let metadata =
        std::fs::metadata(root).map_err(|source| Error::io("stat local dir", root, source))?;
    if !metadata.is_dir() {
        return Err(Error::io(
            "walk local dir",
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let mut walker = Walker {
        filter,
        out: Vec::new(),
        pending: Vec::new(),
        inodes: HashMap::new(),
    };
    walker.walk_dir(root, "")?;
    Ok(walker.out)
}

struct Walker<'a> {
    filter: &'a WalkFilter,
    out: Vec<Entry>,
    /// Directories on the current path that are not emitted yet: they are
    /// emitted only when something inside them is.
    pending: Vec<Entry>,
    /// First path of each multiply-linked inode.
    inodes: HashMap<(u64, u64), String>,
}

impl Walker<'_> {
    fn walk_dir(&mut self, dir: &Path, rel_dir: &str) -> Result<(), Error> {
        let reader =
            std::fs::read_dir(dir).map_err(|source| Error::io("read directory", dir, source))?;
        let mut names = Vec::new();
        for entry in reader {
            let entry = entry.map_err(|source| Error::io("read directory", dir, source))?;
            names.push(entry.file_name());
        }
        // Byte order of names = ComparePath order among siblings.
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));

        for name in names {
            let source = dir.join(&name);
            let name = name.into_string().map_err(|_| Error::InvalidPath {
                path: source.display().to_string(),
                reason: "file name is not UTF-8",
            })?;
            let rel = if rel_dir.is_empty() {
                name
            } else {
                format!("{rel_dir}/{name}")
            };
            let metadata = std::fs::symlink_metadata(&source)
                .map_err(|source_err| Error::io("stat", &source, source_err))?;
            let is_dir = metadata.is_dir();
            if metadata.file_type().is_socket() {
                continue;
            }

            // Include patterns: only matching paths; a non-matching dir is
            // walked (and emitted lazily) when a pattern may match inside.
            let mut lazy = false;
            if !self.filter.includes.is_empty() && !self.filter.includes.matches(&rel) {
                if is_dir && self.filter.includes.may_match_inside(&rel, false) {
                    lazy = true;
                } else {
                    continue;
                }
            }
            // Exclude patterns: a matched dir is still walked when an
            // exception may re-include something inside it.
            if self.filter.excludes.matches(&rel) {
                if is_dir && self.filter.excludes.may_match_inside(&rel, true) {
                    lazy = true;
                } else {
                    continue;
                }
            }

            let entry = Entry {
                stat: self.stat_for(&rel, &source, &metadata)?,
                source: source.clone(),
            };
            if is_dir {
                let depth = self.pending.len();
                if lazy {
                    self.pending.push(entry);
                } else {
                    self.emit(entry, &metadata);
                }
                self.walk_dir(&source, &rel)?;
                self.pending.truncate(depth);
            } else {
                self.emit(entry, &metadata);
            }
        }
        Ok(())
    }

    fn emit(&mut self, mut entry: Entry, metadata: &Metadata) {
        self.out.append(&mut self.pending);
        if kind(entry.stat.mode) == Kind::File && metadata.nlink() > 1 {
            let key = (metadata.dev(), metadata.ino());
            match self.inodes.get(&key) {
                Some(first) => {
                    entry.stat.linkname = first.clone();
                    entry.stat.size = 0;
                }
                None => {
                    self.inodes.insert(key, entry.stat.path.clone());
                }
            }
        }
        self.out.push(entry);
    }

    fn stat_for(&self, rel: &str, source: &Path, metadata: &Metadata) -> Result<Stat, Error> {
        let mode = go_mode(metadata);
        let mut stat = Stat {
            path: rel.to_string(),
            mode,
            // The client always resets ownership (§5.6).
            uid: 0,
            gid: 0,
            mod_time: mtime_nanos(metadata),
            ..Stat::default()
        };
        match kind(mode) {
            Kind::Dir => {}
            Kind::Symlink => {
                let target = std::fs::read_link(source)
                    .map_err(|source_err| Error::io("read symlink", source, source_err))?;
                stat.linkname = target.to_string_lossy().into_owned();
                stat.size = metadata.len() as i64;
            }
            Kind::BlockDevice | Kind::CharDevice => {
                let rdev = metadata.rdev();
                stat.devmajor = nix::sys::stat::major(rdev) as i64;
                stat.devminor = nix::sys::stat::minor(rdev) as i64;
                stat.size = metadata.len() as i64;
            }
            _ => stat.size = metadata.len() as i64,
        }
        Ok(stat)
    }
}

/// Counters the sender updates.
pub(crate) trait SendStats: Send + Sync {
    /// One file's data was sent in full.
    fn file_sent(&self, bytes: u64);
}

/// Runs the sender half of DiffCopy: STATs, then REQ/DATA until FIN.
/// `inbound` carries the receiver's packets, `method` names the call in
/// errors.
pub(crate) async fn serve<S>(
    entries: Vec<Entry>,
    inbound: &mut S,
    out: &mpsc::Sender<Result<Packet, tonic::Status>>,
    stats: &dyn SendStats,
    method: &'static str,
) -> Result<(), Error>
where
    S: Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    for entry in &entries {
        send(
            out,
            Packet {
                r#type: PacketType::PacketStat as i32,
                stat: Some(entry.stat.clone()),
                ..Packet::default()
            },
        )
        .await?;
    }
    // An empty STAT closes the list.
    send(
        out,
        Packet {
            r#type: PacketType::PacketStat as i32,
            ..Packet::default()
        },
    )
    .await?;

    loop {
        let packet = inbound
            .next()
            .await
            .transpose()
            .map_err(|status| Error::Rpc { method, status })?
            .ok_or(Error::StreamEnded {
                context: "before FIN from the receiver",
            })?;
        match PacketType::try_from(packet.r#type) {
            Ok(PacketType::PacketReq) => {
                let entry = entries
                    .get(packet.id as usize)
                    .filter(|e| kind(e.stat.mode) == Kind::File && e.stat.linkname.is_empty())
                    .ok_or(Error::UnknownFileId { id: packet.id })?;
                let bytes = send_file(out, packet.id, &entry.source).await?;
                stats.file_sent(bytes);
            }
            Ok(PacketType::PacketFin) => {
                send(
                    out,
                    Packet {
                        r#type: PacketType::PacketFin as i32,
                        ..Packet::default()
                    },
                )
                .await?;
                return Ok(());
            }
            Ok(PacketType::PacketErr) => {
                return Err(Error::Remote {
                    message: String::from_utf8_lossy(&packet.data).into_owned(),
                })
            }
            Ok(PacketType::PacketStat) => {
                return Err(Error::UnexpectedPacket {
                    packet: "STAT",
                    context: "from the receiver",
                })
            }
            Ok(PacketType::PacketData) => {
                return Err(Error::UnexpectedPacket {
                    packet: "DATA",
                    context: "from the receiver",
                })
            }
            Err(_) => {
                return Err(Error::UnexpectedPacket {
                    packet: "unknown",
                    context: "from the receiver",
                })
            }
        }
    }
}

async fn send_file(
    out: &mpsc::Sender<Result<Packet, tonic::Status>>,
    id: u32,
    path: &Path,
) -> Result<u64, Error> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|source| Error::io("open", path, source))?;
    let mut total = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = file
            .read(&mut buf)
            .await
            .map_err(|source| Error::io("read", path, source))?;
        buf.truncate(n);
        send(
            out,
            Packet {
                r#type: PacketType::PacketData as i32,
                id,
                data: buf,
                ..Packet::default()
            },
        )
        .await?;
        if n == 0 {
            // The empty DATA just sent is the EOF marker.
            return Ok(total);
        }
        total += n as u64;
    }
}

async fn send(
    out: &mpsc::Sender<Result<Packet, tonic::Status>>,
    packet: Packet,
) -> Result<(), Error> {
    out.send(Ok(packet)).await.map_err(|_| Error::StreamEnded {
        context: "while sending to the receiver",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join("secret")).unwrap();
        fs::write(root.join("a/b/c.txt"), "c").unwrap();
        fs::write(root.join("a.b"), "ab").unwrap();
        fs::write(root.join("a-b"), "a-b").unwrap();
        fs::write(root.join("z.log"), "log").unwrap();
        fs::write(root.join("keep.log"), "keep").unwrap();
        fs::write(root.join("secret/key"), "k").unwrap();
        fs::write(root.join("secret/ok"), "ok").unwrap();
        symlink("a/b/c.txt", root.join("link")).unwrap();
        fs::hard_link(root.join("a.b"), root.join("hard")).unwrap();
        dir
    }

    fn paths(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.stat.path.as_str()).collect()
    }

    #[test]
    fn combined_trees_split_under_prefixes_or_merge() {
        let (one, two) = (tree(), tree());
        fs::write(two.path().join("only-two"), "2").unwrap();
        let walked = |dir: &tempfile::TempDir, prefix: Option<&str>| {
            let entries = walk(dir.path(), &WalkFilter::default()).unwrap();
            (
                prefix.map(str::to_string),
                dir.path().to_path_buf(),
                entries,
            )
        };
        let single = walk(one.path(), &WalkFilter::default()).unwrap();

        // A single tree without prefix is the walk itself.
        let same = combine(vec![walked(&one, None)]).unwrap();
        assert_eq!(paths(&same), paths(&single));

        // Prefixes: each tree under its directory, hard links renamed with it, symlinks not.
        let split = combine(vec![
            walked(&one, Some("linux_amd64")),
            walked(&two, Some("linux_arm64")),
        ])
        .unwrap();
        assert_eq!(split.len(), 2 * single.len() + 3);
        assert_eq!(paths(&split)[0], "linux_amd64");
        assert_eq!(paths(&split)[single.len() + 1], "linux_arm64");
        let hard = split
            .iter()
            .find(|e| e.stat.path == "linux_arm64/hard")
            .unwrap();
        assert_eq!(hard.stat.linkname, "linux_arm64/a.b");
        let link = split
            .iter()
            .find(|e| e.stat.path == "linux_arm64/link")
            .unwrap();
        assert_eq!(link.stat.linkname, "a/b/c.txt");

        // No prefixes: one merged tree, each path once, taken from the last tree.
        let merged = combine(vec![walked(&one, None), walked(&two, None)]).unwrap();
        assert_eq!(merged.len(), single.len() + 1);
        let from_two = merged.iter().find(|e| e.stat.path == "a/b/c.txt").unwrap();
        assert!(from_two.source.starts_with(two.path()));
    }

    #[test]
    fn walk_order_and_filters_table() {
        let dir = tree();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // (includes, excludes, followpaths, expected paths)
        type Case = (Vec<String>, Vec<String>, Vec<String>, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            (
                vec![],
                vec![],
                vec![],
                vec![
                    "a",
                    "a/b",
                    "a/b/c.txt",
                    "a-b",
                    "a.b",
                    "hard",
                    "keep.log",
                    "link",
                    "secret",
                    "secret/key",
                    "secret/ok",
                    "z.log",
                ],
            ),
            (
                vec![],
                s(&["*.log", "!keep.log", "secret", "!secret/ok"]),
                vec![],
                vec![
                    "a",
                    "a/b",
                    "a/b/c.txt",
                    "a-b",
                    "a.b",
                    "hard",
                    "keep.log",
                    "link",
                    "secret",
                    "secret/ok",
                ],
            ),
            (
                vec![],
                s(&["secret"]),
                vec![],
                vec![
                    "a",
                    "a/b",
                    "a/b/c.txt",
                    "a-b",
                    "a.b",
                    "hard",
                    "keep.log",
                    "link",
                    "z.log",
                ],
            ),
            (
                s(&["a/b/c.txt"]),
                vec![],
                vec![],
                vec!["a", "a/b", "a/b/c.txt"],
            ),
            (s(&["a"]), s(&["a/b/c.txt"]), vec![], vec!["a", "a/b"]),
            (
                vec![],
                vec![],
                s(&["link"]),
                vec!["a", "a/b", "a/b/c.txt", "link"],
            ),
            (
                s(&["**/*.txt"]),
                vec![],
                vec![],
                vec!["a", "a/b", "a/b/c.txt"],
            ),
        ];
        for (includes, excludes, follow, want) in cases {
            let filter = WalkFilter::new(dir.path(), &includes, &excludes, &follow).unwrap();
            let entries = walk(dir.path(), &filter).unwrap();
            assert_eq!(
                paths(&entries),
                want,
                "includes {includes:?} excludes {excludes:?} follow {follow:?}"
            );
        }
    }

    #[test]
    fn stats_carry_types_links_and_no_owner() {
        let dir = tree();
        let entries = walk(dir.path(), &WalkFilter::default()).unwrap();
        let by_path = |p: &str| {
            entries
                .iter()
                .find(|e| e.stat.path == p)
                .unwrap()
                .stat
                .clone()
        };
        let dir_stat = by_path("a");
        assert_eq!(kind(dir_stat.mode), Kind::Dir);
        assert_eq!(dir_stat.size, 0);
        let link = by_path("link");
        assert_eq!(kind(link.mode), Kind::Symlink);
        assert_eq!(link.linkname, "a/b/c.txt");
        let first = by_path("a.b");
        assert_eq!((first.size, first.linkname.as_str()), (2, ""));
        let hard = by_path("hard");
        assert_eq!((hard.size, hard.linkname.as_str()), (0, "a.b"));
        assert!(entries.iter().all(|e| e.stat.uid == 0 && e.stat.gid == 0));
        assert!(entries
            .iter()
            .all(|e| e.stat.mod_time > 1_000_000_000_000_000_000));
    }
}
