//! Layer compression: the algorithms an exporter can ask for, their media types, and encoders
//! that use every core while producing the same bytes on every run.
//!
//! [`ParallelGzEncoder`] splits the stream into fixed-size blocks, deflates them in parallel and
//! joins them into one gzip member the way pigz does: every block but the last ends with a sync
//! flush (so it stops on a byte boundary and the next block can follow), the last one finishes the
//! deflate stream, and the CRC-32 of the whole input is combined from the blocks' CRCs. Blocks are
//! compressed independently (no shared dictionary), so the output depends only on the input, the
//! block size and the level — never on the number of threads.
//!
//! zstd uses libzstd's own worker threads; with one or more workers its output does not depend on
//! how many there are (libzstd's multi-threaded format is fixed by the parameters), which the unit
//! tests check.

use std::io::{self, BufRead, Read, Write};

use flate2::{Compress, FlushCompress, Status};

use crate::oci::media_types;

/// Default block size of [`ParallelGzEncoder`] (1 MiB, as pigz's default of 128 KiB would cost
/// more in flush overhead for layer-sized inputs).
pub const DEFAULT_GZIP_BLOCK_SIZE: usize = 1 << 20;
/// Default gzip level (as `gzip` and BuildKit).
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// Default zstd level (as BuildKit).
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// An invalid compression attribute.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unknown algorithm name.
    #[error("unsupported compression type {name:?} (expected uncompressed, gzip or zstd)")]
    UnknownType {
        /// The name given.
        name: String,
    },
    /// Level out of range for the algorithm.
    #[error("invalid compression level {level} for {kind} (expected {min}..={max})")]
    Level {
        /// The algorithm.
        kind: &'static str,
        /// The level given.
        level: i32,
        /// Lowest valid level.
        min: i32,
        /// Highest valid level.
        max: i32,
    },
}

/// A layer compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Compression {
    /// A plain tar.
    Uncompressed,
    /// gzip (deflate).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Parses an exporter's `compression` value.
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "uncompressed" => Ok(Self::Uncompressed),
            "gzip" => Ok(Self::Gzip),
            "zstd" => Ok(Self::Zstd),
            other => Err(Error::UnknownType {
                name: other.to_owned(),
            }),
        }
    }

    /// The name used in attrs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uncompressed => "uncompressed",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        }
    }

    /// The layer media type for this compression; docker media types exist for uncompressed and
    /// gzip only, so zstd layers always get the OCI type (as BuildKit).
    pub fn layer_media_type(self, oci: bool) -> &'static str {
        match (self, oci) {
            (Self::Uncompressed, true) => media_types::OCI_LAYER,
            (Self::Uncompressed, false) => media_types::DOCKER_LAYER,
            (Self::Gzip, true) => media_types::OCI_LAYER_GZIP,
            (Self::Gzip, false) => media_types::DOCKER_LAYER_GZIP,
            (Self::Zstd, _) => media_types::OCI_LAYER_ZSTD,
        }
    }

    /// The compression a layer media type says, if it is a layer type we know.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            media_types::OCI_LAYER | media_types::DOCKER_LAYER => Some(Self::Uncompressed),
            media_types::OCI_LAYER_GZIP | media_types::DOCKER_LAYER_GZIP => Some(Self::Gzip),
            media_types::OCI_LAYER_ZSTD => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The compression of a stream that starts with `magic`.
    pub fn detect(magic: &[u8]) -> Self {
        if magic.starts_with(&GZIP_MAGIC) {
            Self::Gzip
        } else if magic.starts_with(&ZSTD_MAGIC) {
            Self::Zstd
        } else {
            Self::Uncompressed
        }
    }
}

/// An algorithm with its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressionOptions {
    /// The algorithm.
    pub kind: Compression,
    /// The level; `None` = the algorithm's default.
    pub level: Option<i32>,
}

impl Default for CompressionOptions {
    fn default() -> Self {
        Self {
            kind: Compression::Gzip,
            level: None,
        }
    }
}

impl CompressionOptions {
    /// Checks the level against the algorithm's range (gzip 0..=9, zstd 1..=22).
    pub fn new(kind: Compression, level: Option<i32>) -> Result<Self, Error> {
        if let Some(level) = level {
            let (min, max) = match kind {
                Compression::Gzip => (0, 9),
                Compression::Zstd => (1, 22),
                Compression::Uncompressed => (i32::MIN, i32::MAX),
            };
            if level < min || level > max {
                return Err(Error::Level {
                    kind: kind.name(),
                    level,
                    min,
                    max,
                });
            }
        }
        Ok(Self { kind, level })
    }

    /// The effective level (the default when none was given; 0 for uncompressed).
    pub fn effective_level(&self) -> i32 {
        match (self.kind, self.level) {
            (Compression::Uncompressed, _) => 0,
            (_, Some(level)) => level,
            (Compression::Gzip, None) => DEFAULT_GZIP_LEVEL as i32,
            (Compression::Zstd, None) => DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// A writer compressing with one of the algorithms; call [`finish`](Self::finish) to end the
/// stream and get the inner writer back.
pub enum Encoder<W: Write> {
    /// No compression.
    Plain(W),
    /// Parallel gzip.
    Gzip(ParallelGzEncoder<W>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    /// An encoder for `options` writing to `out`.
    pub fn new(out: W, options: &CompressionOptions) -> io::Result<Self> {
        let level = options.effective_level();
        Ok(match options.kind {
            Compression::Uncompressed => Self::Plain(out),
            Compression::Gzip => Self::Gzip(ParallelGzEncoder::new(
                out,
                u32::try_from(level).unwrap_or(DEFAULT_GZIP_LEVEL),
            )),
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
                // A fixed worker count keeps the frame layout identical across machines.
                encoder.multithread(ZSTD_WORKERS)?;
                Self::Zstd(encoder)
            }
        })
    }

    /// Ends the compressed stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Self::Plain(w) => Ok(w),
            Self::Gzip(e) => e.finish(),
            Self::Zstd(e) => e.finish(),
        }
    }
}

/// zstd worker threads (fixed; libzstd's multi-threaded output does not depend on it, but a fixed
/// value keeps that an implementation detail we do not rely on).
const ZSTD_WORKERS: u32 = 4;

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(w) => w.write(buf),
            Self::Gzip(e) => e.write(buf),
            Self::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(w) => w.flush(),
            Self::Gzip(e) => e.flush(),
            Self::Zstd(e) => e.flush(),
        }
    }
}

/// A reader decompressing `input` whatever its compression (gzip, zstd or none, detected by the
/// magic bytes).
pub fn decoder<'a, R: BufRead + 'a>(mut input: R) -> io::Result<Box<dyn Read + 'a>> {
    let magic = input.fill_buf()?;
    Ok(match Compression::detect(magic) {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
        Compression::Uncompressed => Box::new(input),
    })
}

/// A gzip writer that deflates fixed-size blocks on several threads and writes one gzip member
/// whose bytes depend only on the input, the block size and the level.
pub struct ParallelGzEncoder<W: Write> {
    out: Option<W>,
    level: u32,
    block_size: usize,
    threads: usize,
    /// Full blocks waiting to be compressed.
    pending: Vec<Vec<u8>>,
    /// The block being filled.
    current: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Input bytes so far.
    size: u64,
    header_written: bool,
}

impl<W: Write> ParallelGzEncoder<W> {
    /// An encoder at `level` (0..=9) with 1 MiB blocks on all available cores.
    pub fn new(out: W, level: u32) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_options(out, level, DEFAULT_GZIP_BLOCK_SIZE, threads)
    }

    /// An encoder with an explicit block size and thread count (both at least 1).
    pub fn with_options(out: W, level: u32, block_size: usize, threads: usize) -> Self {
        let block_size = block_size.max(1);
        Self {
            out: Some(out),
            level: level.min(9),
            block_size,
            threads: threads.max(1),
            pending: Vec::new(),
            current: Vec::with_capacity(block_size),
            crc: crc32fast::Hasher::new(),
            size: 0,
            header_written: false,
        }
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))
    }

    fn write_header(&mut self) -> io::Result<()> {
        if self.header_written {
            return Ok(());
        }
        let xfl = match self.level {
            9 => 2,
            1 => 4,
            _ => 0,
        };
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS=unknown: nothing that varies between runs.
        let header = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255];
        self.out()?.write_all(&header)?;
        self.header_written = true;
        Ok(())
    }

    /// Compresses the pending full blocks (none of them is the last) and writes them in order.
    fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write_header()?;
        let blocks = std::mem::take(&mut self.pending);
        let level = self.level;
        let results: Vec<io::Result<(Vec<u8>, crc32fast::Hasher)>> = if self.threads == 1 {
            blocks
                .iter()
                .map(|b| deflate_block(b, level, false))
                .collect()
        } else {
            let per_thread = blocks.len().div_ceil(self.threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = blocks
                    .chunks(per_thread)
                    .map(|chunk| {
                        scope.spawn(move || {
                            chunk
                                .iter()
                                .map(|b| deflate_block(b, level, false))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| {
                        h.join().unwrap_or_else(|_| {
                            vec![Err(io::Error::other("gzip worker thread panicked"))]
                        })
                    })
                    .collect()
            })
        };
        for result in results {
            let (compressed, crc) = result?;
            self.crc.combine(&crc);
            self.out()?.write_all(&compressed)?;
        }
        Ok(())
    }

    /// Ends the gzip member (last block, CRC-32, input size) and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_pending()?;
        self.write_header()?;
        let last = std::mem::take(&mut self.current);
        let (compressed, crc) = deflate_block(&last, self.level, true)?;
        self.crc.combine(&crc);
        let size = self.size;
        let crc = std::mem::take(&mut self.crc).finalize();
        let mut out = self
            .out
            .take()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))?;
        out.write_all(&compressed)?;
        out.write_all(&crc.to_le_bytes())?;
        // ISIZE is the input size modulo 2^32.
        out.write_all(&(size as u32).to_le_bytes())?;
        out.flush()?;
        Ok(out)
    }
}

impl<W: Write> Write for ParallelGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.block_size - self.current.len();
        let n = room.min(buf.len());
        self.current.extend_from_slice(&buf[..n]);
        self.size += n as u64;
        if self.current.len() == self.block_size {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(self.block_size));
            self.pending.push(full);
            // Two blocks per thread per batch keeps every core busy without holding much memory.
            if self.pending.len() >= self.threads * 2 {
                self.flush_pending()?;
            }
        }
        Ok(n)
    }

    /// Writes out the compressed full blocks; the partial block stays buffered (flushing it would
    /// make the output depend on when `flush` was called).
    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending()?;
        self.out()?.flush()
    }
}

/// Raw-deflates one block: ended by a sync flush (byte-aligned, not final) or, for the last block,
/// by the final deflate block. Returns the bytes and the CRC-32 of the input block.
fn deflate_block(data: &[u8], level: u32, last: bool) -> io::Result<(Vec<u8>, crc32fast::Hasher)> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    let mut compress = Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let consumed = usize::try_from(compress.total_in()).unwrap_or(data.len());
        let status = compress
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = usize::try_from(compress.total_in()).unwrap_or(0) == data.len();
        if last {
            if status == Status::StreamEnd {
                break;
            }
        } else if all_in && out.len() < out.capacity() {
            // A sync flush is complete when all input is consumed and output space was left over.
            break;
        }
    }
    Ok((out, crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible but not trivial: text-like with a pseudo-random component.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 12345;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 7 == 0 {
                    (x >> 16) as u8
                } else {
                    b"kiln layer data "[i % 16]
                }
            })
            .collect()
    }

    fn gzip(data: &[u8], block: usize, threads: usize, write_size: usize) -> Vec<u8> {
        let mut e = ParallelGzEncoder::with_options(Vec::new(), 6, block, threads);
        for chunk in data.chunks(write_size.max(1)) {
            e.write_all(chunk).unwrap();
        }
        e.finish().unwrap()
    }

    #[test]
    fn parallel_gzip_output_does_not_depend_on_threads_or_write_sizes() {
        let data = sample(5 * 65536 + 123);
        let one = gzip(&data, 65536, 1, 4096);
        let four = gzip(&data, 65536, 4, 100_000);
        let three = gzip(&data, 65536, 3, 1);
        assert_eq!(one, four);
        assert_eq!(one, three);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        assert!(one.len() < data.len());
    }

    #[test]
    fn parallel_gzip_edge_sizes_round_trip() {
        for len in [0, 1, 65535, 65536, 65537, 3 * 65536] {
            let data = sample(len);
            let out = gzip(&data, 65536, 2, 7000);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data, "length {len}");
        }
    }

    #[test]
    fn gunzip_accepts_parallel_gzip() {
        let data = sample(3 * DEFAULT_GZIP_BLOCK_SIZE + 999);
        let mut e = ParallelGzEncoder::new(Vec::new(), 6);
        e.write_all(&data).unwrap();
        let out = e.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gz");
        std::fs::write(&path, &out).unwrap();
        let test = std::process::Command::new("gzip")
            .arg("-t")
            .arg(&path)
            .status()
            .unwrap();
        assert!(test.success());
        let cat = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap();
        assert!(cat.status.success());
        assert_eq!(cat.stdout, data);
    }

    #[test]
    fn zstd_output_is_the_same_with_any_worker_count_and_round_trips() {
        let data = sample(3 << 20);
        let run = |workers: u32| {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            e.multithread(workers).unwrap();
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(4));
        let mut back = Vec::new();
        decoder(&one[..]).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn encoder_and_decoder_for_every_kind() {
        let data = sample(100_000);
        for kind in [
            Compression::Uncompressed,
            Compression::Gzip,
            Compression::Zstd,
        ] {
            let options = CompressionOptions::new(kind, None).unwrap();
            let mut e = Encoder::new(Vec::new(), &options).unwrap();
            e.write_all(&data).unwrap();
            let out = e.finish().unwrap();
            assert_eq!(Compression::detect(&out), kind);
            let mut back = Vec::new();
            decoder(&out[..]).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "{kind:?}");
        }
    }

    #[test]
    fn names_levels_and_media_types() {
        assert_eq!(Compression::parse("zstd").unwrap(), Compression::Zstd);
        assert!(Compression::parse("estargz").is_err());
        assert!(CompressionOptions::new(Compression::Gzip, Some(10)).is_err());
        assert!(CompressionOptions::new(Compression::Zstd, Some(0)).is_err());
        assert_eq!(
            CompressionOptions::new(Compression::Zstd, None)
                .unwrap()
                .effective_level(),
            3
        );
        assert_eq!(
            Compression::Gzip.layer_media_type(false),
            media_types::DOCKER_LAYER_GZIP
        );
        assert_eq!(
            Compression::from_media_type(media_types::OCI_LAYER_ZSTD),
            Some(Compression::Zstd)
        );
    }
}
