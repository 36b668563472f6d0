//! Cache that travels: `--cache-to` on one kilnd, `--cache-from` on a fresh
//! one (empty root) — every step comes from the imported cache, no container
//! starts, and the image has the same layers. Both `type=registry` (against
//! the local registry) and `type=local`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, Output, BUSYBOX};

/// A runc that records each invocation (as e2e.rs does).
fn counting_runc(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let log = dir.join(format!("{name}-runc.log"));
    let script = dir.join(format!("{name}-runc"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec runc \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, log)
}

fn container_runs(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "run"))
        .count()
}

/// The Dockerfile steps (`#N [k/m] …`) of plain progress: (id, title, cached).
fn steps(plain: &str) -> Vec<(String, String, bool)> {
    let mut out: Vec<(String, String, bool)> = Vec::new();
    for line in plain.lines() {
        let mut words = line.splitn(2, ' ');
        let (Some(id), Some(rest)) = (words.next(), words.next()) else {
            continue;
        };
        if id.starts_with('#') && rest.starts_with('[') && !rest.starts_with("[internal]") {
            let cached = plain.lines().any(|l| l == format!("{id} CACHED"));
            if !out.iter().any(|(seen, _, _)| seen == id) {
                out.push((id.to_string(), rest.to_string(), cached));
            }
        }
    }
    out
}

/// The layer digests of the image in an OCI tarball.
fn layer_digests(archive: &Path) -> Vec<String> {
    let mut files = std::collections::HashMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        files.insert(name, bytes);
    }
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice::<serde_json::Value>(&files[&format!("blobs/sha256/{hex}")]).unwrap()
    };
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let mut manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    if manifest.get("manifests").is_some() {
        manifest = blob(manifest["manifests"][0]["digest"].as_str().unwrap());
    }
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// A kilnd with an empty root, named `name`, whose runc counts container starts: the daemon,
/// its address and the runc log.
fn counting_daemon(dir: &Path, name: &str) -> (Kilnd, String, PathBuf) {
    let (runc, log) = counting_runc(dir, name);
    let address = format!("unix://{}/{name}.sock", dir.display());
    let daemon = Kilnd::start(&address, &["--oci-worker-binary", runc.to_str().unwrap()]);
    (daemon, address, log)
}

struct Build<'a> {
    address: &'a str,
    context: &'a Path,
    out: PathBuf,
}

impl Build<'_> {
    fn run(&self, cache: &[&str]) -> Output {
        let mut command = Command::new(cargo_bin("kiln"));
        command
            .args(["build", "--progress=plain", "--buildkit-host", self.address])
            .args(cache)
            .arg("-o")
            .arg(format!("type=oci,dest={}", self.out.display()))
            .arg(self.context);
        run(&mut command)
    }
}

fn dockerfile(context: &Path, last: &str) {
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\nRUN echo one > /one\nRUN echo two > /two\nRUN echo {last} > /three\n"
        ),
    )
    .unwrap();
}

fn assert_all_cached(output: &Output, what: &str) {
    let steps = steps(&output.stderr);
    let runs: Vec<_> = steps.iter().filter(|(_, t, _)| t.contains("RUN")).collect();
    assert_eq!(
        runs.len(),
        3,
        "{what}: expected 3 RUN steps:\n{}",
        output.stderr
    );
    for (id, title, cached) in &runs {
        assert!(
            cached,
            "{what}: step {id} {title} not CACHED:\n{}",
            output.stderr
        );
    }
}

#[test]
fn registry_and_local_cache_travel_to_an_empty_daemon() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    // Unique content per run, so no earlier cache in the registry matters.
    let nonce: u64 = rand::random();
    dockerfile(&context, &format!("three-{nonce}"));
    let cache_ref = format!("127.0.0.1:5000/kiln-test/cache-{nonce:x}:latest");

    // kilnd A builds and exports (registry, mode=max).
    let (daemon_a, address_a, log_a) = counting_daemon(work.path(), "a");
    let build_a = Build {
        address: &address_a,
        context: &context,
        out: work.path().join("a.tar"),
    };
    // A cache that does not exist yet (first build) is a warning, not a failure.
    let exported = build_a.run(&[
        "--cache-from",
        &format!("127.0.0.1:5000/kiln-test/cache-{nonce:x}:absent"),
        "--cache-to",
        &format!("type=registry,ref={cache_ref},mode=max"),
    ]);
    assert_eq!(
        exported.code,
        0,
        "export build failed:\n{}\nkilnd A:\n{}",
        exported.stderr,
        daemon_a.log_text()
    );
    assert_eq!(container_runs(&log_a), 3, "A runs the three RUN steps");
    assert!(
        exported.stderr.contains("WARNING: failed to import cache"),
        "{}",
        exported.stderr
    );
    let layers_a = layer_digests(&build_a.out);
    assert_eq!(
        layers_a.len(),
        4,
        "busybox + three RUN layers: {layers_a:?}"
    );
    let skopeo = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{cache_ref}"),
    ]))
    .success();
    assert!(
        skopeo
            .stdout
            .contains("application/vnd.buildkit.cacheconfig.v0"),
        "skopeo sees no cache config in {cache_ref}: {}",
        skopeo.stdout
    );

    // kilnd B, empty root: everything from the registry cache (bare ref form).
    let (daemon_b, address_b, log_b) = counting_daemon(work.path(), "b");
    let build_b = Build {
        address: &address_b,
        context: &context,
        out: work.path().join("b.tar"),
    };
    let imported = build_b.run(&["--cache-from", &cache_ref]);
    assert_eq!(
        imported.code,
        0,
        "import build failed:\n{}\nkilnd B:\n{}",
        imported.stderr,
        daemon_b.log_text()
    );
    assert_all_cached(&imported, "registry import");
    assert_eq!(
        container_runs(&log_b),
        0,
        "B started a container:\n{}",
        imported.stderr
    );
    assert_eq!(
        layer_digests(&build_b.out),
        layers_a,
        "B's image has other layers"
    );

    // mode=min (the default): only the result's layers travel; a fresh D
    // still takes every step from the cache, running none.
    let min_ref = format!("127.0.0.1:5000/kiln-test/cache-{nonce:x}:min");
    let min_export = build_a.run(&["--cache-to", &min_ref]);
    assert_eq!(min_export.code, 0, "{}", min_export.stderr);
    let (daemon_d, address_d, log_d) = counting_daemon(work.path(), "d");
    let build_d = Build {
        address: &address_d,
        context: &context,
        out: work.path().join("d.tar"),
    };
    let min_import = build_d.run(&["--cache-from", &format!("type=registry,ref={min_ref}")]);
    assert_eq!(
        min_import.code,
        0,
        "min import build failed:\n{}\nkilnd D:\n{}",
        min_import.stderr,
        daemon_d.log_text()
    );
    assert_all_cached(&min_import, "registry min import");
    assert_eq!(container_runs(&log_d), 0, "D started a container");
    assert_eq!(layer_digests(&build_d.out), layers_a);

    // A changed last step on B reruns that step only.
    dockerfile(&context, &format!("changed-{nonce}"));
    let changed = build_b.run(&["--cache-from", &cache_ref]);
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    let runs: Vec<_> = steps(&changed.stderr)
        .into_iter()
        .filter(|(_, t, _)| t.contains("RUN"))
        .collect();
    assert_eq!(runs.len(), 3, "{}", changed.stderr);
    assert!(
        runs[0].2 && runs[1].2,
        "first two RUN steps cached:\n{}",
        changed.stderr
    );
    assert!(!runs[2].2, "the changed step ran:\n{}", changed.stderr);
    assert_eq!(
        container_runs(&log_b),
        1,
        "only the changed step started a container"
    );
    let changed_layers = layer_digests(&build_b.out);
    assert_eq!(changed_layers[..3], layers_a[..3]);
    assert_ne!(changed_layers[3], layers_a[3]);

    // type=local: A exports into a client directory, a fresh C imports it.
    dockerfile(&context, &format!("three-{nonce}"));
    let cache_dir = work.path().join("cache-dir");
    let local_export = build_a.run(&[
        "--cache-to",
        &format!("type=local,dest={},mode=max", cache_dir.display()),
    ]);
    assert_eq!(local_export.code, 0, "{}", local_export.stderr);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache_dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let (daemon_c, address_c, log_c) = counting_daemon(work.path(), "c");
    let build_c = Build {
        address: &address_c,
        context: &context,
        out: work.path().join("c.tar"),
    };
    let local_import = build_c.run(&[
        "--cache-from",
        &format!("type=local,src={}", cache_dir.display()),
    ]);
    assert_eq!(
        local_import.code,
        0,
        "local import build failed:\n{}\nkilnd C:\n{}",
        local_import.stderr,
        daemon_c.log_text()
    );
    assert_all_cached(&local_import, "local import");
    assert_eq!(container_runs(&log_c), 0, "C started a container");
    assert_eq!(layer_digests(&build_c.out), layers_a);
}

/// The `skopeo inspect` of `image` (`--config` or the manifest), raw JSON.
fn skopeo_json(image: &str, config: bool) -> serde_json::Value {
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    if config {
        command.arg("--config");
    }
    let out = run(command.arg(format!("docker://{image}"))).success();
    serde_json::from_str(&out.stdout).unwrap()
}

/// Inline cache: kilnd A pushes an image with `--cache-to type=inline` (and
/// again with the build arg `BUILDKIT_INLINE_CACHE=1`); the records sit in
/// the image config under `moby.buildkit.cache.v0`; a fresh kilnd B given
/// `--cache-from <image>` runs no step and makes the same layers.
#[test]
fn inline_cache_travels_in_the_image() {
    use base64::Engine as _;
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let nonce: u64 = rand::random();
    dockerfile(&context, &format!("inline-{nonce}"));
    let repo = format!("127.0.0.1:5000/kiln-test/inline-{nonce:x}");

    let (daemon_a, address_a, log_a) = counting_daemon(work.path(), "a");
    let push = |tag: &str, extra: &[&str]| {
        let mut command = Command::new(cargo_bin("kiln"));
        command
            .args(["build", "--progress=plain", "--buildkit-host", &address_a])
            .args(extra)
            .arg("-o")
            .arg(format!("type=image,name={repo}:{tag},push=true"))
            .arg(&context);
        let out = run(&mut command);
        assert_eq!(
            out.code,
            0,
            "push {tag} failed:\n{}\nkilnd A:\n{}",
            out.stderr,
            daemon_a.log_text()
        );
        out
    };
    push("inline", &["--cache-to", "type=inline"]);
    assert_eq!(container_runs(&log_a), 3, "A runs the three RUN steps");
    // The build arg buildx users set asks for the same thing; the rebuild is
    // fully cached, so the very same image (with the same cache) results.
    push("arg", &["--build-arg", "BUILDKIT_INLINE_CACHE=1"]);
    let manifest = skopeo_json(&format!("{repo}:inline"), false);
    assert_eq!(
        skopeo_json(&format!("{repo}:arg"), false),
        manifest,
        "the build arg gives another image than type=inline"
    );
    let config = skopeo_json(&format!("{repo}:inline"), true);
    let cache = config["moby.buildkit.cache.v0"]
        .as_str()
        .unwrap_or_else(|| panic!("no inline cache in the config: {config}"));
    let records: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(cache)
            .unwrap(),
    )
    .unwrap();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 4, "busybox + three RUN layers: {manifest}");
    // The base and each RUN step, results pointing into the image's layers.
    let result_layers: Vec<u64> = records
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["layers"][0]["layer"].as_u64())
        .collect();
    assert_eq!(result_layers, vec![0, 1, 2, 3], "records: {records}");

    // Without the cache request the image carries no cache.
    push("plain", &[]);
    assert!(
        skopeo_json(&format!("{repo}:plain"), true)
            .get("moby.buildkit.cache.v0")
            .is_none(),
        "an image built without inline cache carries one"
    );

    // kilnd B, empty root: every step from the image's inline cache.
    let (daemon_b, address_b, log_b) = counting_daemon(work.path(), "b");
    let build_b = Build {
        address: &address_b,
        context: &context,
        out: work.path().join("b.tar"),
    };
    let imported = build_b.run(&["--cache-from", &format!("{repo}:inline")]);
    assert_eq!(
        imported.code,
        0,
        "import build failed:\n{}\nkilnd B:\n{}",
        imported.stderr,
        daemon_b.log_text()
    );
    assert_all_cached(&imported, "inline import");
    assert_eq!(
        container_runs(&log_b),
        0,
        "B started a container:\n{}",
        imported.stderr
    );
    assert_eq!(layer_digests(&build_b.out), layers, "B made other layers");
}
