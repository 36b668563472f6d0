//! Landing through the session content store (issue 9): `kiln build` against a sandboxed kilnd
//! OCI worker (which does not share the client's containerd) asks for `tar=false`, and the
//! exporter writes only the blobs containerd lacks. What crossed is counted at both ends: the
//! `landed …: sent N blobs (…), skipped M blobs (…)` line kiln prints, and the exporter's own
//! `sent=… bytes=… present=…` log line in kilnd.
//!
//! Needs `cargo build -p kiln-cli -p kiln-daemon --bins` first, containerd, runc and the local
//! registry holding the busybox fixture.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, containerd_available, run, Kilnd, Output, BUSYBOX};

/// A unique containerd namespace, emptied and removed on drop.
struct Namespace(String);

impl Namespace {
    fn new() -> Self {
        Namespace(unique("kilntest-landing"))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let images: Vec<String> = ctr(&["-n", &self.0, "images", "ls", "-q"])
            .stdout
            .lines()
            .map(str::to_string)
            .collect();
        if !images.is_empty() {
            let mut args = vec!["-n", &self.0, "images", "rm", "--sync"];
            args.extend(images.iter().map(String::as_str));
            ctr(&args);
        }
        for _ in 0..50 {
            if ctr(&["namespaces", "rm", &self.0]).code == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// A name no other test run uses.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{nanos:08x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn ctr(args: &[&str]) -> Output {
    run(Command::new("ctr").args(args))
}

fn kiln_build(ns: &Namespace, host: &str, tag: &str, ctx: &Path) -> Output {
    run(Command::new(cargo_bin("kiln"))
        .args(["--namespace", &ns.0, "build", "--buildkit-host", host])
        .args(["--progress=plain", "-t", tag])
        .arg(ctx)
        .env_remove("BUILDKIT_HOST")
        .env_remove("BUILDKIT_PROGRESS")
        .env_remove("SOURCE_DATE_EPOCH"))
    .success()
}

/// What kiln's `landed` line says crossed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Landed {
    blobs_sent: u64,
    bytes_sent: f64,
    blobs_skipped: u64,
    bytes_skipped: f64,
}

/// Parses `landed <name>: sent 1 blob (1.2 KiB), skipped 3 blobs (512.3 MiB) already in
/// containerd`.
fn landed(stderr: &str) -> Landed {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("landed "))
        .unwrap_or_else(|| panic!("no landed line in:\n{stderr}"));
    let part = |word: &str| -> (u64, f64) {
        let rest = &line[line.find(word).unwrap_or_else(|| panic!("{line}")) + word.len()..];
        let count: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
        let inside = &rest[rest.find('(').unwrap() + 1..rest.find(')').unwrap()];
        let (value, unit) = inside.split_once(' ').unwrap();
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => panic!("unit {other} in {line}"),
        };
        (count, value.parse::<f64>().unwrap() * scale)
    };
    let (blobs_sent, bytes_sent) = part("sent ");
    let (blobs_skipped, bytes_skipped) = part("skipped ");
    Landed {
        blobs_sent,
        bytes_sent,
        blobs_skipped,
        bytes_skipped,
    }
}

/// The daemon's count of its last session-store export: `(sent blobs, sent bytes, present)`.
fn daemon_count(kilnd: &Kilnd) -> (u64, u64, u64) {
    let log = strip_ansi(&kilnd.log_text());
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("image written to the session content store"))
        .unwrap_or_else(|| panic!("no export line in the kilnd log:\n{log}"));
    let field = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .parse()
            .unwrap()
    };
    (field("sent"), field("bytes"), field("present"))
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn big_layer_lands_once_and_a_cached_rebuild_sends_almost_nothing() {
    if !containerd_available() {
        eprintln!("skipped: containerd is not running");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let kilnd = Kilnd::start(&format!("unix://{}/kilnd.sock", work.path().display()), &[]);
    let ns = Namespace::new();
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    // 64 MiB of incompressible data: the layer cannot hide in gzip.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN head -c 67108864 /dev/urandom > /big\n"),
    )
    .unwrap();
    let tag = "127.0.0.1:5000/kilntest/landing-big:1";

    let cold = kiln_build(&ns, &kilnd.address, tag, &ctx);
    let first = landed(&cold.stderr);
    assert!(first.bytes_sent > 64.0 * MIB, "{first:?}\n{}", cold.stderr);
    // busybox layer + big layer + config + manifest.
    assert_eq!(first.blobs_sent, 4, "{}", cold.stderr);
    let (sent, bytes, _) = daemon_count(&kilnd);
    assert_eq!(sent, 4);
    assert!(bytes as f64 > 64.0 * MIB, "{bytes}");
    assert!(cold.stderr.contains(&format!("Loaded image: {tag}")));

    let cached = kiln_build(&ns, &kilnd.address, tag, &ctx);
    assert!(cached.stderr.contains(" CACHED"), "{}", cached.stderr);
    let again = landed(&cached.stderr);
    assert!(again.bytes_sent < MIB, "{again:?}");
    assert_eq!(again.blobs_sent, 0, "{}", cached.stderr);
    assert_eq!(again.blobs_skipped, 4, "{}", cached.stderr);
    assert!(again.bytes_skipped > 64.0 * MIB, "{again:?}");
    // The daemon agrees: nothing written, everything found present.
    let (sent, bytes, present) = daemon_count(&kilnd);
    assert_eq!((sent, present), (0, 4));
    assert!((bytes as f64) < MIB, "{bytes}");

    // The landed image is a real, unpacked image containerd can run.
    let id = unique("kilntest-landing-run");
    let out = ctr(&[
        "-n",
        &ns.0,
        "run",
        "--rm",
        tag,
        &id,
        "sh",
        "-c",
        "wc -c < /big",
    ])
    .success();
    assert_eq!(out.stdout.trim(), "67108864", "{}", out.stderr);
}

#[test]
fn rebuild_with_a_changed_top_layer_sends_only_that_layer() {
    if !containerd_available() {
        eprintln!("skipped: containerd is not running");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let kilnd = Kilnd::start(&format!("unix://{}/kilnd.sock", work.path().display()), &[]);
    let ns = Namespace::new();
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\nRUN head -c 8388608 /dev/urandom > /big\n\
             RUN echo middle > /middle\nCOPY stamp /stamp\n"
        ),
    )
    .unwrap();
    std::fs::write(ctx.join("stamp"), "one\n").unwrap();
    let tag = "127.0.0.1:5000/kilntest/landing-three:1";

    let cold = landed(&kiln_build(&ns, &kilnd.address, tag, &ctx).stderr);
    // busybox + three layers + config + manifest.
    assert_eq!(cold.blobs_sent, 6, "{cold:?}");

    std::fs::write(ctx.join("stamp"), "two\n").unwrap();
    let out = kiln_build(&ns, &kilnd.address, tag, &ctx);
    let rebuilt = landed(&out.stderr);
    // Only the COPY layer, the config and the manifest are new.
    assert_eq!(rebuilt.blobs_sent, 3, "{}", out.stderr);
    assert_eq!(rebuilt.blobs_skipped, 3, "{}", out.stderr);
    assert!(rebuilt.bytes_sent < MIB, "{rebuilt:?}");
    assert!(rebuilt.bytes_skipped > 8.0 * MIB, "{rebuilt:?}");
    let (sent, bytes, present) = daemon_count(&kilnd);
    assert_eq!((sent, present), (3, 3));
    assert!((bytes as f64) < MIB, "{bytes}");

    let id = unique("kilntest-landing-run");
    let out = ctr(&[
        "-n", &ns.0, "run", "--rm", tag, &id, "cat", "/stamp", "/middle",
    ])
    .success();
    assert_eq!(out.stdout, "two\nmiddle\n", "{}", out.stderr);
}
