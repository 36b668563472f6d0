//! Differential check against a builder we did not write: a fixed set of corpus Dockerfiles is
//! built by kiln and by Debian's `buildah bud` (vfs storage in a temporary root, chroot
//! isolation), and the two images are compared — the config fields a Dockerfile sets (`Env`,
//! `Cmd`, `Entrypoint`, `WorkingDir`, `User`, `Labels`, `ExposedPorts`, `Volumes`) and the
//! unpacked file trees (kind, mode, owner, content, symlink target).
//!
//! Both images go through the same path: an OCI layout (`skopeo copy` of kiln's OCI tarball,
//! `buildah push oci:` for buildah) unpacked by `umoci raw unpack`. Differences that are
//! BuildKit's own behaviour are listed in `docs/dockerfile.md` ("Differences from buildah"),
//! which this test reads: a listed difference is allowed, any other fails the test, and a
//! listed one that no longer shows up is reported so the list stays true.
//!
//! Skipped only when `buildah` is not installed and `KILN_REQUIRE_BUILDAH` is unset (CI sets it).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd};

/// Corpus cases built by both builders: no heredocs and no BuildKit-only flags (buildah 1.28
/// has neither), covering config interplay, expansion, COPY forms and stages.
const CASES: &[&str] = &[
    "cmd_then_entrypoint_keeps_cmd",
    "entrypoint_exec_resets_cmd",
    "env_forms",
    "expose_forms",
    "label_forms",
    "volume_forms",
    "workdir_relative",
    "user_numeric",
    "copy_dir_contents",
    "copy_wildcard",
    "multistage_from_stage",
    "arg_stage_scope",
];

const CONFIG_KEYS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `(case or *, difference)` rows of the allow-list table in docs/dockerfile.md.
fn allowed_differences() -> BTreeSet<(String, String)> {
    let doc = std::fs::read_to_string(repo_root().join("docs/dockerfile.md"))
        .expect("docs/dockerfile.md");
    let section = doc
        .split("## Differences from buildah")
        .nth(1)
        .expect("docs/dockerfile.md has a \"Differences from buildah\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| case"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(|c| c.trim().trim_matches('`')).collect();
            (cells.len() >= 4).then(|| (cells[1].to_string(), cells[2].to_string()))
        })
        .collect()
}

/// An image unpacked from an OCI layout: its config and a description of every path.
struct Image {
    config: serde_json::Value,
    files: BTreeMap<String, String>,
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Unpacks the single image of the OCI layout `layout` (tag `img`) into `rootfs`.
fn unpack(layout: &Path, rootfs: &Path) -> Image {
    let index = read_json(&layout.join("index.json"));
    let manifest = read_json(&blob(
        layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let config = read_json(&blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    run(Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:img", layout.display()))
        .arg(rootfs))
    .success();
    let mut files = BTreeMap::new();
    walk(rootfs, rootfs, &mut files);
    Image {
        config: config["config"].clone(),
        files,
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let owner = format!("{}:{}", meta.uid(), meta.gid());
        let mode = meta.mode() & 0o7777;
        let what = if meta.file_type().is_symlink() {
            format!(
                "symlink -> {}",
                std::fs::read_link(&path).unwrap().display()
            )
        } else if meta.is_dir() {
            format!("dir {mode:o} {owner}")
        } else if meta.is_file() {
            let data = std::fs::read(&path).unwrap();
            let content = match std::str::from_utf8(&data) {
                Ok(text) if data.len() <= 64 => format!("{text:?}"),
                _ => format!("{} bytes", data.len()),
            };
            format!("file {mode:o} {owner} {content}")
        } else {
            format!("special {mode:o} {owner}")
        };
        let relative = format!("/{}", path.strip_prefix(root).unwrap().display());
        out.insert(relative, what);
        if meta.is_dir() {
            walk(root, &path, out);
        }
    }
}

/// Differences as `config.<Key>[.<label>]` or `file <path>`, each with both sides.
fn compare(kiln: &Image, buildah: &Image) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for key in CONFIG_KEYS {
        let (a, b) = (&kiln.config[key], &buildah.config[key]);
        if *key == "Labels" {
            let empty = serde_json::Map::new();
            let a = a.as_object().unwrap_or(&empty);
            let b = b.as_object().unwrap_or(&empty);
            let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for name in names {
                if a.get(name) != b.get(name) {
                    out.push((
                        format!("config.Labels.{name}"),
                        format!("kiln {:?} buildah {:?}", a.get(name), b.get(name)),
                    ));
                }
            }
            continue;
        }
        let null = |v: &serde_json::Value| match v {
            serde_json::Value::Array(a) if a.is_empty() => serde_json::Value::Null,
            serde_json::Value::Object(o) if o.is_empty() => serde_json::Value::Null,
            serde_json::Value::String(s) if s.is_empty() => serde_json::Value::Null,
            other => other.clone(),
        };
        if null(a) != null(b) {
            out.push((format!("config.{key}"), format!("kiln {a} buildah {b}")));
        }
    }
    let paths: BTreeSet<&String> = kiln.files.keys().chain(buildah.files.keys()).collect();
    for path in paths {
        let (a, b) = (kiln.files.get(path), buildah.files.get(path));
        if a != b {
            out.push((format!("file {path}"), format!("kiln {a:?} buildah {b:?}")));
        }
    }
    out
}

#[test]
fn kiln_and_buildah_build_the_same_images() {
    if !have("buildah") {
        assert!(
            std::env::var_os("KILN_REQUIRE_BUILDAH").is_none(),
            "KILN_REQUIRE_BUILDAH is set but buildah is not installed"
        );
        eprintln!("skipped: buildah is not installed (set KILN_REQUIRE_BUILDAH=1 to require it)");
        return;
    }
    for tool in ["umoci", "skopeo"] {
        assert!(have(tool), "{tool} is needed to compare images");
    }
    let allowed = allowed_differences();
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let storage = [
        "--root".to_string(),
        work.path().join("buildah-root").display().to_string(),
        "--runroot".to_string(),
        work.path().join("buildah-run").display().to_string(),
        "--storage-driver".to_string(),
        "vfs".to_string(),
    ];
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");

    let mut unexpected = Vec::new();
    let mut seen_allowed = BTreeSet::new();
    for case in CASES {
        let dir = work.path().join(case);
        std::fs::create_dir_all(&dir).unwrap();
        let context = dir.join("context");
        run(Command::new("cp")
            .arg("-a")
            .arg(corpus.join(case))
            .arg(&context))
        .success();
        let _ = std::fs::remove_file(context.join("expect.toml"));

        // kiln: OCI tarball → OCI layout.
        let tar = dir.join("kiln.tar");
        let built = run(Command::new(cargo_bin("kiln"))
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=oci,dest={}", tar.display()))
            .arg(&context));
        assert_eq!(
            built.code,
            0,
            "{case}: kiln build failed\n{}\nkilnd:\n{}",
            built.stderr,
            daemon.log_text()
        );
        let kiln_layout = dir.join("kiln-oci");
        run(Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci-archive:{}", tar.display()))
            .arg(format!("oci:{}:img", kiln_layout.display())))
        .success();

        // buildah: bud, then push to an OCI layout.
        let tag = format!("localhost/kiln-differential/{case}:latest");
        let bud = run(Command::new("buildah")
            .args(&storage)
            .args(["bud", "--isolation", "chroot", "--tls-verify=false"])
            .args(["--format", "oci", "-t", &tag])
            .arg(&context));
        assert_eq!(bud.code, 0, "{case}: buildah bud failed\n{}", bud.stderr);
        let buildah_layout = dir.join("buildah-oci");
        run(Command::new("buildah")
            .args(&storage)
            .arg("push")
            .arg(&tag)
            .arg(format!("oci:{}:img", buildah_layout.display())))
        .success();

        let kiln = unpack(&kiln_layout, &dir.join("kiln-rootfs"));
        let buildah = unpack(&buildah_layout, &dir.join("buildah-rootfs"));
        for (what, detail) in compare(&kiln, &buildah) {
            let key = |c: &str| (c.to_string(), what.clone());
            if allowed.contains(&key(case)) {
                seen_allowed.insert(key(case));
            } else if allowed.contains(&key("*")) {
                seen_allowed.insert(key("*"));
            } else {
                unexpected.push(format!("{case}: {what}: {detail}"));
            }
        }
    }
    let stale: Vec<_> = allowed.difference(&seen_allowed).collect();
    assert!(
        unexpected.is_empty() && stale.is_empty(),
        "differences from buildah not documented in docs/dockerfile.md:\n{}\n\
         documented differences that no longer show up:\n{stale:?}",
        unexpected.join("\n")
    );
}
