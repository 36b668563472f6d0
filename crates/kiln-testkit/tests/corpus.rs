//! The Dockerfile conformance corpus: every directory under `tests/corpus/<case>/` holds a
//! `Dockerfile` (plus context files) and an `expect.toml` stating what BuildKit builds from it —
//! image config fields, files (content, mode, owner, symlink target), paths that must be absent,
//! the number of layers, the tail of the history — or the error it fails with.
//!
//! One sandboxed `kilnd` (OCI worker) builds every case through the real `kiln` binary, two at a
//! time, exporting an OCI tarball that this test unpacks itself (whiteouts applied). All failing
//! cases are reported at the end with their differences. A case marked
//! `known_failure = "<reason>"` is expected to differ (kiln does not match BuildKit there yet): it
//! is reported but does not fail the test, unless it starts passing (then drop the marker).
//!
//! `KILN_CORPUS=a,b` runs only the cases whose names contain one of the given words.
//!
//! `expect.toml` keys (all optional):
//!
//! ```toml
//! known_failure = "why kiln differs from BuildKit"
//! build_args = ["K=V"]                # --build-arg
//! target = "stage"                     # --target
//! prepare = "tar -cf a.tar d"          # sh command run in a copy of the case dir before the build
//! layers = 2                           # total layers of the image (the base has one)
//! absent = ["/bin/ls"]                 # paths that must not exist in the image
//! absent_config = ["Cmd"]              # config keys that must be missing or null
//! [config]                             # config keys compared exactly (JSON values)
//! Env = ["PATH=..."]
//! [image]                              # top-level config keys (author, os, ...)
//! [[history]]                          # the last N history entries, in order
//! created_by = "RUN /bin/sh -c true # buildkit"
//! empty_layer = false
//! [[file]]
//! path = "/a"
//! content = "hi\n"                     # exact content
//! contains = "hi"                      # substring of the content
//! mode = 0o644                         # permission bits (& 0o7777)
//! uid = 0
//! gid = 0
//! kind = "file"                        # file | dir | symlink
//! target = "/b"                        # symlink target
//! [error]                              # the build must fail
//! contains = "unknown instruction: FOO"
//! line = 3                             # reported as `Dockerfile:3`
//! excerpt = "   3 | >>> FOO x\n     |     ^^^"  # part of the rendered source excerpt
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln_testkit::{cargo_bin, run, Kilnd};
use serde::Deserialize;

/// Builds running at once (the machine has 2 cores).
const POOL: usize = 2;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    known_failure: Option<String>,
    #[serde(default)]
    build_args: Vec<String>,
    target: Option<String>,
    prepare: Option<String>,
    layers: Option<usize>,
    #[serde(default)]
    absent: Vec<String>,
    #[serde(default)]
    absent_config: Vec<String>,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
    #[serde(default)]
    image: BTreeMap<String, toml::Value>,
    #[serde(default)]
    history: Vec<HistoryExpect>,
    #[serde(default)]
    file: Vec<FileExpect>,
    error: Option<ErrorExpect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryExpect {
    created_by: String,
    #[serde(default)]
    empty_layer: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExpect {
    path: String,
    content: Option<String>,
    contains: Option<String>,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    kind: Option<String>,
    target: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorExpect {
    contains: String,
    line: Option<usize>,
    excerpt: Option<String>,
}

/// One case: its name, directory and expectations.
struct Case {
    name: String,
    dir: PathBuf,
    expect: Expect,
}

/// What a case came to.
enum Outcome {
    Pass,
    Fail(Vec<String>),
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load_cases() -> Vec<Case> {
    let filter: Vec<String> = std::env::var("KILN_CORPUS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let mut cases = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for dir in entries {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let text = std::fs::read_to_string(dir.join("expect.toml"))
            .unwrap_or_else(|e| panic!("{name}: expect.toml: {e}"));
        let expect: Expect =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: expect.toml: {e}"));
        assert!(
            dir.join("Dockerfile").is_file(),
            "{name}: no Dockerfile in the case directory"
        );
        cases.push(Case { name, dir, expect });
    }
    cases
}

/// Copies a directory tree (files, directories, symlinks, modes).
fn copy_tree(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to)).success();
}

/// Builds one case and checks it.
fn run_case(case: &Case, socket: &str, work: &Path) -> Outcome {
    let context = work.join(&case.name);
    copy_tree(&case.dir, &context);
    let _ = std::fs::remove_file(context.join("expect.toml"));
    if let Some(prepare) = &case.expect.prepare {
        let out = run(Command::new("sh")
            .arg("-ec")
            .arg(prepare)
            .current_dir(&context));
        if out.code != 0 {
            return Outcome::Fail(vec![format!("prepare failed: {}", out.stderr)]);
        }
    }
    let dest = work.join(format!("{}.tar", case.name));
    let mut command = Command::new(cargo_bin("kiln"));
    command
        .args(["build", "--progress=plain", "--buildkit-host", socket])
        .arg("-o")
        .arg(format!("type=oci,dest={}", dest.display()));
    for arg in &case.expect.build_args {
        command.arg("--build-arg").arg(arg);
    }
    if let Some(target) = &case.expect.target {
        command.arg("--target").arg(target);
    }
    let out = run(command.arg(&context));

    if let Some(error) = &case.expect.error {
        let mut problems = Vec::new();
        if out.code == 0 {
            problems.push(format!(
                "expected the build to fail with {:?}, it succeeded",
                error.contains
            ));
            return Outcome::Fail(problems);
        }
        let stderr = out.stderr.as_str();
        if !stderr.contains(&error.contains) {
            problems.push(format!(
                "error text: expected to contain {:?}\nstderr tail:\n{}",
                error.contains,
                tail(stderr, 12)
            ));
        }
        if let Some(excerpt) = &error.excerpt {
            if !stderr.contains(excerpt.as_str()) {
                problems.push(format!(
                    "error excerpt: expected to contain\n{excerpt}\nstderr tail:\n{}",
                    tail(stderr, 12)
                ));
            }
        }
        if let Some(line) = error.line {
            if !mentions_line(stderr, line) {
                problems.push(format!(
                    "error line: expected `Dockerfile:{line}`\nstderr tail:\n{}",
                    tail(stderr, 12)
                ));
            }
        }
        return verdict(problems);
    }
    if out.code != 0 {
        return Outcome::Fail(vec![format!("build failed:\n{}", tail(&out.stderr, 20))]);
    }
    let image = match Image::unpack(&dest, &work.join(format!("{}.image", case.name))) {
        Ok(image) => image,
        Err(e) => return Outcome::Fail(vec![format!("unpacking the image: {e}")]),
    };
    verdict(check_image(&case.expect, &image))
}

fn verdict(problems: Vec<String>) -> Outcome {
    if problems.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail(problems)
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether `stderr` names `Dockerfile:<line>` (not followed by another digit).
fn mentions_line(stderr: &str, line: usize) -> bool {
    let needle = format!("Dockerfile:{line}");
    stderr.match_indices(&needle).any(|(at, _)| {
        !stderr[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

fn to_json(value: &toml::Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap()
}

fn check_image(expect: &Expect, image: &Image) -> Vec<String> {
    let mut problems = Vec::new();
    let config = &image.config["config"];
    for (key, want) in &expect.config {
        let want = to_json(want);
        let got = config.get(key).cloned().unwrap_or(serde_json::Value::Null);
        if got != want {
            problems.push(format!(
                "config.{key}:\n  expected {}\n  actual   {}",
                want, got
            ));
        }
    }
    for (key, want) in &expect.image {
        let want = to_json(want);
        let got = image
            .config
            .get(key)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        if got != want {
            problems.push(format!("{key}:\n  expected {}\n  actual   {}", want, got));
        }
    }
    for key in &expect.absent_config {
        if let Some(got) = config.get(key).filter(|v| !v.is_null()) {
            problems.push(format!("config.{key}: expected absent, actual {got}"));
        }
    }
    if let Some(layers) = expect.layers {
        if image.layers != layers {
            problems.push(format!(
                "layers: expected {layers}, actual {}",
                image.layers
            ));
        }
    }
    if !expect.history.is_empty() {
        let history = image.config["history"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let actual: Vec<(String, bool)> = history
            .iter()
            .map(|h| {
                (
                    h["created_by"].as_str().unwrap_or("").to_string(),
                    h["empty_layer"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        let want: Vec<(String, bool)> = expect
            .history
            .iter()
            .map(|h| (h.created_by.clone(), h.empty_layer))
            .collect();
        let got = &actual[actual.len().saturating_sub(want.len())..];
        if got != want.as_slice() {
            problems.push(format!(
                "history (last {}):\n  expected {:?}\n  actual   {:?}",
                want.len(),
                want,
                got
            ));
        }
    }
    for path in &expect.absent {
        if std::fs::symlink_metadata(image.path(path)).is_ok() {
            problems.push(format!("{path}: expected absent, it exists"));
        }
    }
    for file in &expect.file {
        check_file(file, image, &mut problems);
    }
    problems
}

fn check_file(file: &FileExpect, image: &Image, problems: &mut Vec<String>) {
    let path = image.path(&file.path);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) => {
            problems.push(format!("{}: {e}", file.path));
            return;
        }
    };
    let kind = if meta.file_type().is_symlink() {
        "symlink"
    } else if meta.is_dir() {
        "dir"
    } else {
        "file"
    };
    let want_kind = file.kind.as_deref().unwrap_or(if file.target.is_some() {
        "symlink"
    } else if file.content.is_some() || file.contains.is_some() {
        "file"
    } else {
        kind
    });
    if kind != want_kind {
        problems.push(format!(
            "{}: expected a {want_kind}, found a {kind}",
            file.path
        ));
        return;
    }
    if let Some(target) = &file.target {
        let got = std::fs::read_link(&path).unwrap_or_default();
        if got != Path::new(target) {
            problems.push(format!(
                "{}: symlink target expected {target:?}, actual {:?}",
                file.path, got
            ));
        }
    }
    if file.content.is_some() || file.contains.is_some() {
        let got = std::fs::read(&path).unwrap_or_default();
        let got = String::from_utf8_lossy(&got);
        if let Some(content) = &file.content {
            if got != *content {
                problems.push(format!(
                    "{}: content\n  expected {content:?}\n  actual   {got:?}",
                    file.path
                ));
            }
        }
        if let Some(part) = &file.contains {
            if !got.contains(part.as_str()) {
                problems.push(format!(
                    "{}: content expected to contain {part:?}, actual {got:?}",
                    file.path
                ));
            }
        }
    }
    if let Some(mode) = file.mode {
        let got = meta.mode() & 0o7777;
        if got != mode {
            problems.push(format!(
                "{}: mode expected {mode:#o}, actual {got:#o}",
                file.path
            ));
        }
    }
    if let Some(uid) = file.uid {
        if meta.uid() != uid {
            problems.push(format!(
                "{}: uid expected {uid}, actual {}",
                file.path,
                meta.uid()
            ));
        }
    }
    if let Some(gid) = file.gid {
        if meta.gid() != gid {
            problems.push(format!(
                "{}: gid expected {gid}, actual {}",
                file.path,
                meta.gid()
            ));
        }
    }
}

/// An OCI tarball unpacked: the image config, the number of layers and the root filesystem
/// (layers applied bottom to top, OCI whiteouts honoured).
struct Image {
    config: serde_json::Value,
    layers: usize,
    rootfs: PathBuf,
}

impl Image {
    fn unpack(archive: &Path, dir: &Path) -> Result<Self, String> {
        let layout = dir.join("layout");
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&layout).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&rootfs).map_err(|e| e.to_string())?;
        let file = std::fs::File::open(archive).map_err(|e| format!("{archive:?}: {e}"))?;
        tar::Archive::new(file)
            .unpack(&layout)
            .map_err(|e| format!("oci tarball: {e}"))?;
        let json = |path: PathBuf| -> Result<serde_json::Value, String> {
            let bytes = std::fs::read(&path).map_err(|e| format!("{path:?}: {e}"))?;
            serde_json::from_slice(&bytes).map_err(|e| format!("{path:?}: {e}"))
        };
        let blob = |digest: &serde_json::Value| -> Result<PathBuf, String> {
            let digest = digest.as_str().ok_or("descriptor without digest")?;
            let hex = digest
                .strip_prefix("sha256:")
                .ok_or("not a sha256 digest")?;
            Ok(layout.join("blobs/sha256").join(hex))
        };
        let index = json(layout.join("index.json"))?;
        let manifest = json(blob(&index["manifests"][0]["digest"])?)?;
        let config = json(blob(&manifest["config"]["digest"])?)?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        for layer in &layers {
            apply_layer(&blob(&layer["digest"])?, &rootfs)?;
        }
        Ok(Self {
            config,
            layers: layers.len(),
            rootfs,
        })
    }

    fn path(&self, path: &str) -> PathBuf {
        self.rootfs.join(path.trim_start_matches('/'))
    }
}

/// Applies one layer blob (gzip or plain tar) to `rootfs`: whiteouts first (they only hide
/// lower layers), then the entries, replacing whatever type was there before.
fn apply_layer(blob: &Path, rootfs: &Path) -> Result<(), String> {
    let raw = std::fs::read(blob).map_err(|e| format!("{blob:?}: {e}"))?;
    let data = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("{blob:?}: gzip: {e}"))?;
        out
    } else {
        raw
    };
    let mut archive = tar::Archive::new(&data[..]);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let parent = rootfs.join(path.parent().unwrap_or(Path::new("")));
        if name == ".wh..wh..opq" {
            if let Ok(children) = std::fs::read_dir(&parent) {
                for child in children.flatten() {
                    remove_any(&child.path());
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            remove_any(&parent.join(hidden));
        }
    }
    let mut archive = tar::Archive::new(&data[..]);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
        {
            continue;
        }
        // Joined component-wise: a directory entry's trailing slash would make the lookup of a
        // file in its place fail with ENOTDIR.
        let target: PathBuf = rootfs.join(path.components().collect::<PathBuf>());
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            let is_dir_entry = entry.header().entry_type().is_dir();
            if !(is_dir_entry && meta.is_dir()) {
                remove_any(&target);
            }
        }
        entry
            .unpack_in(rootfs)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

#[test]
fn dockerfile_corpus() {
    let cases = load_cases();
    assert!(!cases.is_empty(), "no corpus case selected");
    let work = tempfile::Builder::new()
        .prefix("kiln-corpus-")
        .tempdir()
        .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);

    let total = cases.len();
    let queue = Arc::new(Mutex::new(cases.into_iter().collect::<Vec<_>>()));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        for _ in 0..POOL {
            let queue = queue.clone();
            let results = results.clone();
            let socket = socket.as_str();
            let work = work.path();
            scope.spawn(move || loop {
                let Some(case) = queue.lock().unwrap().pop() else {
                    break;
                };
                let started = std::time::Instant::now();
                let outcome = run_case(&case, socket, work);
                results
                    .lock()
                    .unwrap()
                    .push((case, outcome, started.elapsed()));
            });
        }
    });

    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut failures = Vec::new();
    let mut known = Vec::new();
    for (case, outcome, elapsed) in &results {
        let status = match (outcome, &case.expect.known_failure) {
            (Outcome::Pass, None) => "ok".to_string(),
            (Outcome::Pass, Some(reason)) => {
                failures.push(format!(
                    "{}: marked known_failure ({reason}) but passes: remove the marker",
                    case.name
                ));
                "FAIL (passes, marked known_failure)".to_string()
            }
            (Outcome::Fail(problems), Some(reason)) => {
                known.push(format!(
                    "{}: {reason}\n    {}",
                    case.name,
                    problems.join("\n    ").replace('\n', "\n    ")
                ));
                "known failure".to_string()
            }
            (Outcome::Fail(problems), None) => {
                failures.push(format!(
                    "{}:\n    {}",
                    case.name,
                    problems.join("\n    ").replace('\n', "\n    ")
                ));
                "FAIL".to_string()
            }
        };
        eprintln!(
            "{:<44} {:>6.1}s  {status}",
            case.name,
            elapsed.as_secs_f64()
        );
    }
    eprintln!(
        "\n{total} cases: {} ok, {} known failures, {} failures",
        total - known.len() - failures.len(),
        known.len(),
        failures.len()
    );
    if !known.is_empty() {
        eprintln!("\nknown failures (kiln differs from BuildKit):");
        for k in &known {
            eprintln!("  {k}");
        }
    }
    if !failures.is_empty() {
        eprintln!("\nkilnd log tail:\n{}", tail(&daemon.log_text(), 30));
        panic!(
            "{} corpus case(s) failed:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
}
