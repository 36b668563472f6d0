//! Layer conversion for exporters: recompressing a layer blob (`compression`,
//! `force-compression`) and clamping its file times (`rewrite-timestamp`).
//!
//! A conversion is done once: its result is remembered in `<content root>/conversions/`, keyed by
//! (diff id, compression, level, clamp time), so exporting the same layer again with the same
//! settings reuses the converted blob.

use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::compression::{self, CompressionOptions, Encoder};
use crate::content::{self, ContentStore};
use crate::oci::Descriptor;
use crate::{Digest, DigestWriter};

/// A conversion failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source blob could not be read or the target stored.
    #[error("failed to convert layer {digest}")]
    Content {
        /// The source blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: content::Error,
    },
    /// Decompressing, rewriting or compressing failed.
    #[error("failed to convert layer {digest}")]
    Io {
        /// The source blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The source blob's uncompressed digest is not the diff id it was given with.
    #[error("layer {digest} has diff id {actual}, expected {expected}")]
    DiffId {
        /// The source blob.
        digest: Digest,
        /// The diff id given.
        expected: Digest,
        /// The diff id found.
        actual: Digest,
    },
}

/// Result of conversions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a layer should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertTarget {
    /// Compression and level.
    pub compression: CompressionOptions,
    /// Use OCI media types (else docker's where they exist).
    pub oci_media_types: bool,
    /// Clamp every entry's mtime newer than this (seconds since the epoch) to it.
    pub clamp_mtime: Option<u64>,
}

/// A layer after conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedLayer {
    /// The blob, in the content store.
    pub descriptor: Descriptor,
    /// Its uncompressed digest (changes only when times were clamped).
    pub diff_id: Digest,
}

#[derive(Serialize, Deserialize)]
struct IndexEntry {
    digest: Digest,
    size: u64,
    diff_id: Digest,
}

fn index_path(store: &ContentStore, diff_id: &Digest, target: &ConvertTarget) -> PathBuf {
    let key = format!(
        "{diff_id} {} {} {}",
        target.compression.kind.name(),
        target.compression.effective_level(),
        target
            .clamp_mtime
            .map_or_else(|| "-".to_owned(), |t| t.to_string())
    );
    store
        .root()
        .join("conversions")
        .join(Digest::of(key.as_bytes()).hex())
}

/// Whether `layer` (with its media type) already is what `target` asks for, without rewriting.
pub fn matches(layer: &Descriptor, target: &ConvertTarget) -> bool {
    target.clamp_mtime.is_none()
        && compression::Compression::from_media_type(&layer.media_type)
            == Some(target.compression.kind)
}

/// Converts `layer` (diff id `diff_id`, blob in `store`) to `target`, or returns the conversion
/// done before. The source is decompressed whatever its compression (detected by magic bytes).
pub fn convert_layer(
    store: &ContentStore,
    layer: &Descriptor,
    diff_id: &Digest,
    target: &ConvertTarget,
) -> Result<ConvertedLayer> {
    let media_type = target
        .compression
        .kind
        .layer_media_type(target.oci_media_types);
    let index = index_path(store, diff_id, target);
    if let Some(entry) = fs::read(&index)
        .ok()
        .and_then(|b| serde_json::from_slice::<IndexEntry>(&b).ok())
        .filter(|e| store.has(&e.digest))
    {
        tracing::debug!(%diff_id, digest = %entry.digest, "layer conversion reused");
        return Ok(ConvertedLayer {
            descriptor: Descriptor::new(media_type, entry.digest, entry.size),
            diff_id: entry.diff_id,
        });
    }
    let content_err = |source| Error::Content {
        digest: layer.digest.clone(),
        source,
    };
    let io_err = |source| Error::Io {
        digest: layer.digest.clone(),
        source,
    };
    let source = store.open_blob(&layer.digest).map_err(content_err)?;
    let mut input =
        compression::decoder(BufReader::with_capacity(1 << 20, source)).map_err(io_err)?;
    let writer = store.writer().map_err(content_err)?;
    let encoder = Encoder::new(DigestWriter::new(writer), &target.compression).map_err(io_err)?;
    let mut uncompressed = DigestWriter::new(encoder);
    // The source's own diff id is checked as it streams through.
    let mut source_hash = DigestWriter::new(io::sink());
    let mut tee = Tee {
        inner: &mut input,
        copy: &mut source_hash,
    };
    match target.clamp_mtime {
        Some(epoch) => clamp_tar_mtimes(&mut tee, &mut uncompressed, epoch).map_err(io_err)?,
        None => {
            io::copy(&mut tee, &mut uncompressed).map_err(io_err)?;
        }
    }
    let (_, source_diff_id, _) = source_hash.finish();
    if source_diff_id != *diff_id {
        return Err(Error::DiffId {
            digest: layer.digest.clone(),
            expected: diff_id.clone(),
            actual: source_diff_id,
        });
    }
    let (encoder, new_diff_id, _) = uncompressed.finish();
    let compressed = encoder.finish().map_err(io_err)?;
    let (writer, digest, size) = compressed.finish();
    writer.commit(Some(&digest)).map_err(content_err)?;
    let entry = IndexEntry {
        digest: digest.clone(),
        size,
        diff_id: new_diff_id.clone(),
    };
    if let Err(e) = write_index(&index, &entry) {
        tracing::warn!(path = %index.display(), error = %e, "failed to record layer conversion");
    }
    tracing::debug!(source = %layer.digest, %digest, media_type, "converted layer");
    Ok(ConvertedLayer {
        descriptor: Descriptor::new(media_type, digest, size),
        diff_id: new_diff_id,
    })
}

fn write_index(path: &std::path::Path, entry: &IndexEntry) -> io::Result<()> {
    let dir = path.parent().unwrap_or(path);
    fs::create_dir_all(dir)?;
    // Unique per write: two conversions of one layer may finish together.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let temp = dir.join(format!(
        ".{}.{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    fs::write(&temp, serde_json::to_vec(entry).map_err(io::Error::other)?)?;
    fs::rename(&temp, path)
}

/// A reader that copies what it reads into a writer.
struct Tee<'a, R: Read, W: Write> {
    inner: &'a mut R,
    copy: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

const BLOCK: usize = 512;

/// Copies the tar stream `input` to `out`, setting every entry's mtime (ustar header field and PAX
/// `mtime` records) that is later than `epoch` to `epoch`. Everything else is copied byte for
/// byte; headers whose mtime changed get their checksum recomputed.
pub fn clamp_tar_mtimes(mut input: impl Read, mut out: impl Write, epoch: u64) -> io::Result<()> {
    let mut header = [0u8; BLOCK];
    // A PAX `size` record overrides the next header's size field.
    let mut next_size: Option<u64> = None;
    loop {
        if !read_block(&mut input, &mut header)? {
            // A tar without end-of-archive blocks: accept what was there.
            return out.flush();
        }
        if header.iter().all(|&b| b == 0) {
            out.write_all(&header)?;
            io::copy(&mut input, &mut out)?;
            return out.flush();
        }
        let header_size = parse_numeric(&header[124..136]);
        let kind = header[156];
        if kind == b'x' || kind == b'g' {
            let len = usize::try_from(header_size).map_err(io::Error::other)?;
            let mut data = vec![0u8; len.div_ceil(BLOCK) * BLOCK];
            input.read_exact(&mut data)?;
            data.truncate(len);
            let (data, size) = clamp_pax(&data, epoch);
            if kind == b'x' {
                next_size = size;
            }
            set_octal(&mut header[124..136], data.len() as u64);
            set_checksum(&mut header);
            out.write_all(&header)?;
            out.write_all(&data)?;
            let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
            out.write_all(&[0u8; BLOCK][..pad])?;
            continue;
        }
        let mtime = parse_numeric(&header[136..148]);
        if mtime > epoch {
            set_octal(&mut header[136..148], epoch);
            set_checksum(&mut header);
        }
        out.write_all(&header)?;
        let size = if kind == b'L' || kind == b'K' {
            header_size
        } else {
            next_size.take().unwrap_or(header_size)
        };
        // Hard links, symlinks, directories and devices carry no data whatever the size says.
        let has_data = matches!(kind, b'0' | 0 | b'7' | b'L' | b'K') || kind.is_ascii_uppercase();
        if has_data {
            let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
            let copied = io::copy(&mut (&mut input).take(padded), &mut out)?;
            if copied != padded {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar entry data is truncated",
                ));
            }
        }
    }
}

fn read_block(input: &mut impl Read, block: &mut [u8; BLOCK]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < BLOCK {
        match input.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar header is truncated",
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// An octal (NUL/space padded) or base-256 (high bit set) tar number.
fn parse_numeric(field: &[u8]) -> u64 {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value.wrapping_shl(8) | u64::from(b);
        }
        return value;
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b))
        .collect();
    std::str::from_utf8(&text)
        .ok()
        .and_then(|t| u64::from_str_radix(t, 8).ok())
        .unwrap_or(0)
}

/// Writes `value` as zero-padded octal followed by NUL, filling `field`.
fn set_octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    if text.len() > width {
        // Too large for octal: base-256.
        field.fill(0);
        field[0] = 0x80;
        let bytes = value.to_be_bytes();
        let n = bytes.len().min(field.len() - 1);
        let start = field.len() - n;
        field[start..].copy_from_slice(&bytes[bytes.len() - n..]);
        return;
    }
    field[..width].copy_from_slice(text.as_bytes());
    field[width] = 0;
}

fn set_checksum(header: &mut [u8; BLOCK]) {
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}");
    header[148..154].copy_from_slice(&text.as_bytes()[text.len() - 6..]);
    header[154] = 0;
    header[155] = b' ';
}

/// Clamps `mtime` records of PAX data; returns the new data and the `size` record, if any.
fn clamp_pax(data: &[u8], epoch: u64) -> (Vec<u8>, Option<u64>) {
    let mut out = Vec::with_capacity(data.len());
    let mut size = None;
    let mut rest = data;
    while !rest.is_empty() {
        // "<len> <key>=<value>\n"
        let Some(space) = rest.iter().position(|&b| b == b' ') else {
            out.extend_from_slice(rest);
            break;
        };
        let len = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|t| t.parse::<usize>().ok())
            .filter(|&l| l > space && l <= rest.len());
        let Some(len) = len else {
            out.extend_from_slice(rest);
            break;
        };
        let record = &rest[..len];
        rest = &rest[len..];
        let body = &record[space + 1..record.len().saturating_sub(1)];
        let Some(eq) = body.iter().position(|&b| b == b'=') else {
            out.extend_from_slice(record);
            continue;
        };
        let (key, value) = (&body[..eq], &body[eq + 1..]);
        if key == b"size" {
            size = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        }
        if key == b"mtime" {
            let seconds = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.parse::<i64>().ok());
            let epoch_text = epoch.to_string();
            let epoch_secs = i64::try_from(epoch).unwrap_or(i64::MAX);
            let later = seconds.is_some_and(|s| s > epoch_secs)
                || (seconds == Some(epoch_secs) && value != epoch_text.as_bytes());
            if later {
                out.extend_from_slice(&pax_record("mtime", epoch.to_string().as_bytes()));
                continue;
            }
        }
        out.extend_from_slice(record);
    }
    (out, size)
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compression::Compression;

    fn tar_with_times() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, mtime) in [("old.txt", 100u64), ("new.txt", 2_000_000_000)] {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(5);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut h, name, &b"hello"[..]).unwrap();
        }
        // A long name forces a PAX or GNU header in front.
        let long = format!("{}/file.txt", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        h.set_mtime(2_000_000_001);
        builder.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        builder.into_inner().unwrap()
    }

    fn mtimes(tar_bytes: &[u8]) -> Vec<(String, u64)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn clamping_rewrites_only_later_times_and_keeps_a_valid_tar() {
        let input = tar_with_times();
        let mut out = Vec::new();
        clamp_tar_mtimes(&input[..], &mut out, 1_000_000).unwrap();
        let times = mtimes(&out);
        assert_eq!(times.len(), 3);
        assert_eq!(times[0], ("old.txt".to_owned(), 100));
        assert_eq!(times[1], ("new.txt".to_owned(), 1_000_000));
        assert_eq!(times[2].1, 1_000_000);
        assert!(times[2].0.ends_with("/file.txt"));
        assert_eq!(out.len(), input.len());

        // Nothing later than the epoch: identical bytes.
        let mut same = Vec::new();
        clamp_tar_mtimes(&input[..], &mut same, 3_000_000_000).unwrap();
        assert_eq!(same, input);
    }

    #[test]
    fn pax_mtime_records_are_clamped() {
        let data = [
            pax_record("path", b"a/b"),
            pax_record("mtime", b"2000000000.5"),
        ]
        .concat();
        let (out, size) = clamp_pax(&data, 10);
        assert_eq!(size, None);
        assert_eq!(
            out,
            [pax_record("path", b"a/b"), pax_record("mtime", b"10")].concat()
        );
    }

    #[test]
    fn conversion_is_done_once_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let tar_bytes = tar_with_times();
        let diff_id = Digest::of(&tar_bytes);
        let mut gz = crate::compression::ParallelGzEncoder::new(Vec::new(), 6);
        gz.write_all(&tar_bytes).unwrap();
        let gz = gz.finish().unwrap();
        let source_digest = store.write_blob(&gz).unwrap();
        let source = Descriptor::new(
            crate::oci::media_types::OCI_LAYER_GZIP,
            source_digest,
            gz.len() as u64,
        );
        let target = ConvertTarget {
            compression: CompressionOptions::new(Compression::Zstd, Some(5)).unwrap(),
            oci_media_types: true,
            clamp_mtime: None,
        };
        assert!(!matches(&source, &target));
        let converted = convert_layer(&store, &source, &diff_id, &target).unwrap();
        assert_eq!(converted.diff_id, diff_id);
        assert_eq!(
            converted.descriptor.media_type,
            crate::oci::media_types::OCI_LAYER_ZSTD
        );
        let blob = store.read(&converted.descriptor.digest).unwrap();
        assert_eq!(Compression::detect(&blob), Compression::Zstd);
        let mut back = Vec::new();
        compression::decoder(&blob[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, tar_bytes);

        // Remembered: deleting the source does not matter the second time.
        store.delete(&source.digest).unwrap();
        let again = convert_layer(&store, &source, &diff_id, &target).unwrap();
        assert_eq!(again, converted);

        // Clamping gives a new diff id; wrong diff ids are caught.
        store.write_blob(&gz).unwrap();
        let clamp = ConvertTarget {
            clamp_mtime: Some(1_000),
            ..target
        };
        let clamped = convert_layer(&store, &source, &diff_id, &clamp).unwrap();
        assert_ne!(clamped.diff_id, diff_id);
        let err = convert_layer(
            &store,
            &source,
            &Digest::of(b"x"),
            &ConvertTarget {
                compression: CompressionOptions::new(Compression::Uncompressed, None).unwrap(),
                ..clamp
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::DiffId { .. }), "{err}");
    }
}
