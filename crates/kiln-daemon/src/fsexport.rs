//! The file exporters: the result filesystem itself, not an image.
//!
//! - `local`: the solved snapshot's tree goes to the client over
//!   `FileSend.DiffCopy` as fsutil packets, kilnd being the DiffCopy sender
//!   and the client merging it into its `dest` directory
//!   ([`kiln_session::filesend::send_dir`]).
//! - `tar`: one tar stream of the same tree over `FileSend` bytes.
//!
//! Both read the snapshot through a read-only [`kiln_worker::SnapshotView`];
//! a scratch result is an empty tree. With `source-date-epoch`, modification
//! times later than the epoch are clamped to it (reproducible output).
//! A multi-platform result goes one directory per platform (`linux_amd64/`, `linux_arm64/`)
//! unless `platform-split=false` merges the platforms' trees (the later platform winning on a
//! shared path), as BuildKit; `platform-split=true` splits a single platform too.
//! `mode=delete` is refused.

use std::collections::{BTreeMap, HashMap};
use std::fs::Metadata;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use kiln_solver::VertexProgress;

use crate::exporter::{bool_attr, ExportInput, ExporterKind};
use kiln_session::filesend::DirTree;

/// Runs the `local` or `tar` exporter number `index`; their response is
/// empty, as BuildKit's.
pub async fn export(
    kind: ExporterKind,
    index: usize,
    attrs: &BTreeMap<String, String>,
    input: &ExportInput<'_>,
    vertex: &VertexProgress,
) -> anyhow::Result<BTreeMap<String, String>> {
    // As BuildKit: a multi-platform result goes one directory per platform unless
    // `platform-split=false` merges them; a single platform only splits when asked.
    let split = bool_attr(attrs, "platform-split", input.multi_platform)?;
    match attrs.get("mode").map(String::as_str) {
        None | Some("") | Some("copy") => {}
        Some("delete") => bail!("mode=delete of the local exporter is not supported yet"),
        Some(other) => bail!("invalid mode {other:?} for the local exporter (copy or delete)"),
    }
    let epoch = match attrs.get("source-date-epoch").map(|v| v.trim()) {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<i64>()
                .with_context(|| format!("invalid source-date-epoch {v:?}"))?,
        ),
    };
    let session = input
        .session
        .context("the local and tar exporters need a session to send the files to")?;

    // Each platform's tree: its snapshot's read-only view, or an empty directory for scratch.
    std::fs::create_dir_all(input.tmp_dir)
        .with_context(|| format!("failed to create {}", input.tmp_dir.display()))?;
    let mut views = Vec::new();
    let mut empties = Vec::new();
    let mut trees = Vec::with_capacity(input.refs.len());
    for one in input.refs {
        // A base image nobody pulled: its tree is needed now.
        let pulled = match (&one.snapshot, &one.lazy) {
            (None, Some(lazy)) => lazy.snapshot().await.with_context(|| {
                format!("failed to pull {} for the local export", lazy.reference)
            })?,
            _ => None,
        };
        let root = match one.snapshot.as_ref().or(pulled.as_ref()) {
            Some(id) => {
                let view = input.worker.snapshot_path(id).await.with_context(|| {
                    format!(
                        "failed to open the result filesystem of {}",
                        one.platform.id()
                    )
                })?;
                let root = view.path().to_path_buf();
                views.push(view);
                root
            }
            None => {
                let empty = tempfile::tempdir_in(input.tmp_dir)
                    .context("failed to create an empty directory")?;
                let root = empty.path().to_path_buf();
                empties.push(empty);
                root
            }
        };
        trees.push(DirTree {
            prefix: split.then(|| one.platform.id().replace('/', "_")),
            root,
        });
    }
    // Platform directories in name order (the transfer is sorted anyway; the tar follows it).
    trees.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    let response = BTreeMap::new();
    match kind {
        ExporterKind::Local => {
            vertex.status("copying files", "copying files", 0, None, false);
            let stats = kiln_session::filesend::send_dirs(
                session.channel(),
                index,
                &response,
                &trees,
                epoch,
            )
            .await
            .context("failed to copy the files to the client")?;
            tracing::info!(
                entries = stats.entries,
                files = stats.files_sent,
                bytes = stats.bytes_sent,
                "local export sent"
            );
            vertex.status(
                "copying files",
                "copying files",
                stats.bytes_sent,
                Some(stats.bytes_sent),
                true,
            );
        }
        ExporterKind::Tar => {
            let tmp_dir = input.tmp_dir.to_path_buf();
            let file = tokio::task::spawn_blocking(move || -> anyhow::Result<std::fs::File> {
                let mut file = tempfile::tempfile_in(&tmp_dir)
                    .context("failed to create a temporary tarball")?;
                {
                    let mut writer = std::io::BufWriter::new(&mut file);
                    write_tars(&trees, &mut writer, epoch)?;
                    writer.flush().context("failed to write the tarball")?;
                }
                std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
                    .context("failed to rewind the tarball")?;
                Ok(file)
            })
            .await
            .context("tar writer panicked")??;
            vertex.status("sending tarball", "sending tarball", 0, None, false);
            let sent = kiln_session::filesend::send(
                session.channel(),
                index,
                &response,
                tokio::fs::File::from_std(file),
            )
            .await
            .context("failed to send the tarball to the client")?;
            vertex.status("sending tarball", "sending tarball", sent, Some(sent), true);
        }
        other => bail!("{other:?} is not a file exporter"),
    }
    drop(views);
    drop(empties);
    Ok(response)
}

/// Writes the trees as one tar to `out`, each under its prefix directory, or at the top
/// without one (merged: a path in several trees appears once per tree, the last winning on
/// extraction, as BuildKit's `platform-split=false`). Entries in sorted depth-first order,
/// paths relative (directories with a trailing `/`), owners, modes, symlinks, hardlinks and
/// device nodes kept, sockets skipped; times later than `epoch` (seconds) clamped to it.
pub fn write_tars(trees: &[DirTree], out: impl Write, epoch: Option<i64>) -> anyhow::Result<()> {
    let mut builder = tar::Builder::new(out);
    for tree in trees {
        let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
        let top = match &tree.prefix {
            Some(prefix) => {
                let metadata = std::fs::symlink_metadata(&tree.root)
                    .with_context(|| format!("failed to stat {}", tree.root.display()))?;
                append_entry(
                    &mut builder,
                    &tree.root,
                    Path::new(prefix),
                    &metadata,
                    epoch,
                    &mut inodes,
                )
                .with_context(|| format!("failed to add {prefix} to the tarball"))?;
                PathBuf::from(prefix)
            }
            None => PathBuf::new(),
        };
        append_dir(
            &mut builder,
            &tree.root,
            Path::new(""),
            &top,
            epoch,
            &mut inodes,
        )?;
    }
    builder
        .into_inner()
        .context("failed to finish the tarball")?
        .flush()
        .context("failed to write the tarball")?;
    Ok(())
}

/// Appends the entries under `root/rel_dir`, named `top/rel…` in the tarball.
fn append_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    rel_dir: &Path,
    top: &Path,
    epoch: Option<i64>,
    inodes: &mut HashMap<(u64, u64), PathBuf>,
) -> anyhow::Result<()> {
    let dir = root.join(rel_dir);
    let mut names = std::fs::read_dir(&dir)
        .with_context(|| format!("failed to read directory {}", dir.display()))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("failed to read directory {}", dir.display()))?;
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let rel = rel_dir.join(&name);
        let path = root.join(&rel);
        let metadata = std::fs::symlink_metadata(&path)
            .with_context(|| format!("failed to stat {}", path.display()))?;
        let name = top.join(&rel);
        append_entry(builder, &path, &name, &metadata, epoch, inodes)
            .with_context(|| format!("failed to add {} to the tarball", name.display()))?;
        if metadata.is_dir() {
            append_dir(builder, root, &rel, top, epoch, inodes)?;
        }
    }
    Ok(())
}

fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    rel: &Path,
    metadata: &Metadata,
    epoch: Option<i64>,
    inodes: &mut HashMap<(u64, u64), PathBuf>,
) -> anyhow::Result<()> {
    let file_type = metadata.file_type();
    if file_type.is_socket() {
        return Ok(());
    }
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(metadata, tar::HeaderMode::Complete);
    let mtime = metadata.mtime().max(0);
    let mtime = epoch.map_or(mtime, |e| mtime.min(e.max(0)));
    header.set_mtime(mtime as u64);
    if file_type.is_dir() {
        header.set_size(0);
        let mut name = rel.as_os_str().to_owned();
        name.push("/");
        builder.append_data(&mut header, Path::new(&name), std::io::empty())?;
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(path)?;
        header.set_size(0);
        builder.append_link(&mut header, rel, target)?;
    } else if file_type.is_file() {
        if metadata.nlink() > 1 {
            let key = (metadata.dev(), metadata.ino());
            if let Some(first) = inodes.get(&key) {
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                builder.append_link(&mut header, rel, first)?;
                return Ok(());
            }
            inodes.insert(key, rel.to_path_buf());
        }
        let file = std::fs::File::open(path)?;
        builder.append_data(&mut header, rel, file)?;
    } else {
        // Devices and fifos: the header says it all.
        header.set_size(0);
        builder.append_data(&mut header, rel, std::io::empty())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tar_of_a_tree_keeps_types_and_clamps_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/app")).unwrap();
        std::fs::write(root.join("etc/app/conf"), "x=1\n").unwrap();
        std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::os::unix::fs::symlink("etc/app/conf", root.join("conf")).unwrap();
        std::fs::hard_link(root.join("run.sh"), root.join("run2.sh")).unwrap();
        nix::unistd::mkfifo(&root.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();

        let mut bytes = Vec::new();
        let tree = |prefix: Option<&str>| DirTree {
            prefix: prefix.map(str::to_string),
            root: root.to_path_buf(),
        };
        write_tars(&[tree(None)], &mut bytes, Some(1_000)).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            let path = entry.path().unwrap().display().to_string();
            assert_eq!(header.mtime().unwrap(), 1_000, "{path}");
            let detail = match header.entry_type() {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    format!(" -> {}", entry.link_name().unwrap().unwrap().display())
                }
                tar::EntryType::Regular => format!(" {:o}", header.mode().unwrap() & 0o7777),
                tar::EntryType::Fifo => " fifo".to_string(),
                _ => String::new(),
            };
            seen.push(format!("{path}{detail}"));
        }
        assert_eq!(
            seen,
            [
                "conf -> etc/app/conf",
                "etc/",
                "etc/app/",
                "etc/app/conf 644",
                "pipe fifo",
                "run.sh 750",
                "run2.sh -> run.sh",
            ]
        );

        // One directory per platform; hard links stay inside their platform's directory.
        let mut bytes = Vec::new();
        write_tars(
            &[tree(Some("linux_amd64")), tree(Some("linux_arm64"))],
            &mut bytes,
            None,
        )
        .unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut paths = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let mut path = entry.path().unwrap().display().to_string();
            if entry.header().entry_type() == tar::EntryType::Link {
                path.push_str(&format!(
                    " -> {}",
                    entry.link_name().unwrap().unwrap().display()
                ));
            }
            paths.push(path);
        }
        assert_eq!(paths[0], "linux_amd64/");
        assert!(
            paths.contains(&"linux_arm64/etc/app/conf".to_string()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"linux_arm64/run2.sh -> linux_arm64/run.sh".to_string()),
            "{paths:?}"
        );
        assert_eq!(paths.len(), 16, "{paths:?}");
    }
}
