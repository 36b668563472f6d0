//! Layer compression benchmark (not a test): how fast kiln turns a directory into a compressed
//! layer, next to single-threaded `gzip -6` and `zstd -3` on the same tar bytes, and how that
//! compares with the disk's sequential write speed.
//!
//! Run through `scripts/bench compression` (or `cargo run --release -p kiln-image --example
//! compression_bench -- [--size-mb N] [--dir DIR] [--keep]`). Steps, in order:
//!
//! 1. generate a tree of `N` MiB (default 512) of partly compressible files — source-like text,
//!    incompressible random bytes (as already-compressed assets are) and structured binary
//!    records with zero padding (as executables and databases are) — from a fixed seed, so every
//!    run measures the same bytes;
//! 2. `kiln export`: [`layer::diff_upper`] on the tree, the real export path (tar walk, diff id,
//!    parallel gzip, blob digest in one pass);
//! 3. the tar bytes of that layer are decompressed once (untimed) into `layer.tar`; the other
//!    rows all read that file: kiln's gzip and zstd [`Encoder`]s, `gzip -6`, `zstd -3 -T1`;
//! 4. `dd if=/dev/zero bs=1M conv=fdatasync` of the tar's size: the disk's sequential write speed.
//!
//! Throughput is uncompressed tar bytes per second (MB = 10^6 bytes, as dd). Outputs go to files in
//! the work dir without fsync, so the rows measure compression, the `dd` row the disk; `x disk`
//! is a row's throughput over dd's (above 1: the disk, not the compressor, would be the limit).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_image::compression::{self, Compression, CompressionOptions, Encoder};
use kiln_image::layer;

struct Args {
    size_mb: u64,
    dir: PathBuf,
    keep: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size_mb: 512,
        dir: PathBuf::from("/var/tmp"),
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--size-mb" => {
                let v = it.next().context("--size-mb needs a value")?;
                args.size_mb = v
                    .parse()
                    .with_context(|| format!("--size-mb must be a number, not {v:?}"))?;
            }
            "--dir" => args.dir = PathBuf::from(it.next().context("--dir needs a value")?),
            "--keep" => args.keep = true,
            other => bail!("unknown argument {other:?} (expected --size-mb N, --dir DIR, --keep)"),
        }
    }
    if args.size_mb == 0 {
        bail!("--size-mb must be at least 1");
    }
    Ok(args)
}

/// xorshift64*: a fixed-seed generator, so every run benchmarks the same bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "self", "return", "match", "impl", "struct", "pub", "use", "if", "else",
    "for", "in", "while", "loop", "const", "static", "type", "where", "async", "await", "Ok",
    "Err", "Some", "None", "layer", "digest", "snapshot", "vertex", "cache", "config", "error",
    "result", "buffer", "index", "manifest", "registry", "upload", "chunk", "status", "value",
];

/// Source-like text: words, identifiers, numbers, indentation and line breaks.
fn fill_text(rng: &mut Rng, out: &mut Vec<u8>, size: usize) {
    while out.len() < size {
        let indent = rng.below(4) as usize * 4;
        out.extend(std::iter::repeat_n(b' ', indent));
        for _ in 0..1 + rng.below(10) {
            match rng.below(8) {
                0 => out.extend_from_slice(format!("{}", rng.below(100_000)).as_bytes()),
                1 => out.extend_from_slice(format!("v{:x}", rng.next() & 0xffff).as_bytes()),
                _ => {
                    out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes())
                }
            }
            out.push(if rng.below(5) == 0 { b'(' } else { b' ' });
        }
        out.extend_from_slice(b";\n");
    }
    out.truncate(size);
}

/// Incompressible bytes.
fn fill_random(rng: &mut Rng, out: &mut Vec<u8>, size: usize) {
    while out.len() < size {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(size);
}

/// Records of slowly changing little-endian integers and random words, with zero padding.
fn fill_binary(rng: &mut Rng, out: &mut Vec<u8>, size: usize) {
    let mut counter = rng.next() & 0xffff_ffff;
    while out.len() < size {
        counter += 1 + rng.below(16);
        out.extend_from_slice(&counter.to_le_bytes());
        out.extend_from_slice(&(rng.next() & 0xff_ffff).to_le_bytes());
        if rng.below(8) == 0 {
            out.extend(std::iter::repeat_n(0u8, 16 * (1 + rng.below(32) as usize)));
        }
    }
    out.truncate(size);
}

/// Writes the tree: directories of 64 files of 4 KiB to 8 MiB, about 45% text, 30% random and
/// 25% binary by bytes. Returns the bytes of file content written.
fn generate_tree(root: &Path, total: u64) -> Result<u64> {
    let mut rng = Rng(0x6b69_6c6e_6265_6e63);
    let mut written = 0u64;
    let mut buf = Vec::new();
    let mut n = 0u64;
    while written < total {
        let dir = root.join(format!("d{:03}", n / 64));
        if n.is_multiple_of(64) {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Log-uniform sizes from 4 KiB to 8 MiB.
        let size = (4096u64 << rng.below(12)).min(total - written) as usize;
        let size = size.max(1);
        buf.clear();
        let (kind, ext) = match rng.below(20) {
            0..=8 => (0, "rs"),
            9..=14 => (1, "gz"),
            _ => (2, "bin"),
        };
        match kind {
            0 => fill_text(&mut rng, &mut buf, size),
            1 => fill_random(&mut rng, &mut buf, size),
            _ => fill_binary(&mut rng, &mut buf, size),
        }
        let path = dir.join(format!("f{n}.{ext}"));
        fs::write(&path, &buf).with_context(|| format!("writing {}", path.display()))?;
        written += size as u64;
        n += 1;
    }
    Ok(written)
}

struct Row {
    name: String,
    seconds: f64,
    output: u64,
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let value = f()?;
    Ok((value, start.elapsed().as_secs_f64()))
}

/// kiln's [`Encoder`] on `input`, into `output`.
fn kiln_encode(input: &Path, output: &Path, kind: Compression) -> Result<u64> {
    let options = CompressionOptions::new(kind, None)?;
    let mut reader = BufReader::with_capacity(1 << 20, File::open(input)?);
    let writer = BufWriter::with_capacity(1 << 20, File::create(output)?);
    let mut encoder = Encoder::new(writer, &options)?;
    io::copy(&mut reader, &mut encoder)?;
    encoder.finish()?.flush()?;
    Ok(fs::metadata(output)?.len())
}

/// `program args… < input > output`.
fn external(program: &str, args: &[&str], input: &Path, output: &Path) -> Result<u64> {
    let status = Command::new(program)
        .args(args)
        .stdin(File::open(input)?)
        .stdout(File::create(output)?)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(fs::metadata(output)?.len())
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() -> Result<()> {
    let args = parse_args()?;
    fs::create_dir_all(&args.dir)?;
    let work = tempfile::Builder::new()
        .prefix("kiln-compression-bench.")
        .tempdir_in(&args.dir)?;
    let tree = work.path().join("tree");
    let total = args.size_mb * 1024 * 1024;
    eprintln!("generating {} MiB under {}", args.size_mb, tree.display());
    let content = generate_tree(&tree, total)?;

    let mut rows = Vec::new();
    eprintln!("kiln export (tar + parallel gzip + digests)");
    let export_path = work.path().join("layer.kiln-export.tar.gz");
    let (blob, seconds) = time(|| {
        let out = BufWriter::with_capacity(1 << 20, File::create(&export_path)?);
        Ok(layer::diff_upper(&tree, out)?)
    })?;
    rows.push(Row {
        name: "kiln export (gzip)".into(),
        seconds,
        output: blob.size,
    });

    // The same tar bytes, uncompressed, for everything else.
    let tar = work.path().join("layer.tar");
    {
        let mut decoder =
            compression::decoder(BufReader::with_capacity(1 << 20, File::open(&export_path)?))?;
        let mut out = BufWriter::new(File::create(&tar)?);
        io::copy(&mut decoder, &mut out)?;
        out.flush()?;
    }
    let tar_size = fs::metadata(&tar)?.len();
    // Warm the page cache so no row pays for reading the tar from disk.
    io::copy(&mut File::open(&tar)?, &mut io::sink())?;

    for (name, kind, file) in [
        ("kiln gzip -6 (Encoder)", Compression::Gzip, "kiln.tar.gz"),
        ("kiln zstd -3 (Encoder)", Compression::Zstd, "kiln.tar.zst"),
    ] {
        eprintln!("{name}");
        let out = work.path().join(file);
        let (output, seconds) = time(|| kiln_encode(&tar, &out, kind))?;
        rows.push(Row {
            name: name.into(),
            seconds,
            output,
        });
        fs::remove_file(&out)?;
    }
    let mut externals = vec![("gzip -6", "gzip", vec!["-6", "-c"], "gzip.tar.gz")];
    if have("zstd") {
        externals.push((
            "zstd -3 -T1",
            "zstd",
            vec!["-3", "-T1", "-q", "-c"],
            "zstd.tar.zst",
        ));
    } else {
        eprintln!("zstd not installed (Debian package zstd): skipping zstd -3");
    }
    for (name, program, program_args, file) in externals {
        eprintln!("{name}");
        let out = work.path().join(file);
        let (output, seconds) = time(|| external(program, &program_args, &tar, &out))?;
        rows.push(Row {
            name: name.into(),
            seconds,
            output,
        });
        fs::remove_file(&out)?;
    }

    eprintln!("dd conv=fdatasync");
    let dd_out = work.path().join("dd.out");
    let count = tar_size.div_ceil(1 << 20);
    let ((), dd_seconds) = time(|| {
        let status = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", dd_out.display()))
            .args(["bs=1M", &format!("count={count}"), "conv=fdatasync"])
            .stderr(Stdio::null())
            .status()
            .context("running dd")?;
        if !status.success() {
            bail!("dd failed: {status}");
        }
        Ok(())
    })?;
    let dd_rate = mb(count << 20) / dd_seconds;
    fs::remove_file(&dd_out)?;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "layer: {:.1} MB of files, tar {:.1} MB; {cores} cores; disk (dd {count} MiB, conv=fdatasync): {dd_rate:.1} MB/s",
        mb(content),
        mb(tar_size),
    );
    println!(
        "{:<24} {:>8} {:>9} {:>11} {:>7} {:>7}",
        "", "seconds", "MB/s", "output MB", "ratio", "x disk"
    );
    for row in &rows {
        let rate = mb(tar_size) / row.seconds;
        println!(
            "{:<24} {:>8.2} {:>9.1} {:>11.1} {:>7.3} {:>7.2}",
            row.name,
            row.seconds,
            rate,
            mb(row.output),
            row.output as f64 / tar_size as f64,
            rate / dd_rate
        );
    }
    println!(
        "{:<24} {:>8.2} {:>9.1} {:>11} {:>7} {:>7.2}",
        "dd (disk write)", dd_seconds, dd_rate, "-", "-", 1.0
    );

    if args.keep {
        let kept = work.keep();
        eprintln!("work dir kept: {}", kept.display());
    }
    Ok(())
}
