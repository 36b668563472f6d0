//! End-to-end through the real `kiln` and `kilnd` binaries (OCI worker,
//! runc): the file exporters (`local`, `tar`), the `oci` tarball checked by
//! skopeo and umoci, reproducible images with `SOURCE_DATE_EPOCH`, and the
//! `--metadata-file` shape. Each test starts its own kilnd on a socket in a
//! temporary directory; none of them touches containerd.
//!
//! Needs `cargo build -p kiln-cli -p kiln-daemon --bins` first.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_testkit::{cargo_bin, run, Kilnd, Namespace, Output, BUSYBOX};

fn kiln(host: &str, args: &[&str], cwd: &Path, epoch: Option<&str>) -> Output {
    let mut command = Command::new(cargo_bin("kiln"));
    command
        .arg("build")
        .arg("--buildkit-host")
        .arg(host)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env_remove("BUILDKIT_HOST")
        .env_remove("BUILDKIT_PROGRESS")
        .env_remove("SOURCE_DATE_EPOCH");
    if let Some(epoch) = epoch {
        command.env("SOURCE_DATE_EPOCH", epoch);
    }
    run(&mut command)
}

fn daemon(dir: &Path) -> Kilnd {
    Kilnd::start(&format!("unix://{}/kilnd.sock", dir.display()), &[])
}

fn write_context(dir: &Path, dockerfile: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
}

fn tar_entries(path: &Path) -> Vec<String> {
    let out = run(Command::new("tar").arg("-tf").arg(path)).success();
    out.stdout.lines().map(str::to_string).collect()
}

fn metadata(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A result with a file, an executable in a subdirectory and a symlink.
const FILES: &str = "FROM {BUSYBOX} AS build\n\
RUN mkdir -p /out/sub && echo hello > /out/hello.txt && printf '#!/bin/sh\\n' > /out/sub/run.sh \
&& chmod 0750 /out/sub/run.sh && ln -s hello.txt /out/link\n\
FROM scratch\n\
COPY --from=build /out/ /\n";

fn assert_result_files(dir: &Path) {
    assert_eq!(
        std::fs::read_to_string(dir.join("hello.txt")).unwrap(),
        "hello\n"
    );
    let run_sh = std::fs::metadata(dir.join("sub/run.sh")).unwrap();
    assert_eq!(run_sh.permissions().mode() & 0o7777, 0o750);
    assert_eq!(run_sh.uid(), nix::unistd::getuid().as_raw());
    assert_eq!(run_sh.gid(), nix::unistd::getgid().as_raw());
    assert_eq!(
        std::fs::read_link(dir.join("link")).unwrap(),
        Path::new("hello.txt")
    );
}

#[test]
fn local_and_tar_exporters_deliver_the_files() {
    let work = tempfile::tempdir().unwrap();
    let kilnd = daemon(work.path());
    let host = kilnd.address.clone();
    let cwd = work.path();
    write_context(&cwd.join("ctx"), &FILES.replace("{BUSYBOX}", BUSYBOX));

    // type=local,dest=<dir>, with --metadata-file: no image, no image keys.
    kiln(
        &host,
        &[
            "--progress=plain",
            "-o",
            "type=local,dest=out-local",
            "--metadata-file",
            "local.json",
            "ctx",
        ],
        cwd,
        None,
    )
    .success();
    assert_result_files(&cwd.join("out-local"));
    let meta = metadata(&cwd.join("local.json"));
    assert!(meta.get("containerimage.digest").is_none(), "{meta}");

    // The bare path is type=local; the files are merged into what is there.
    std::fs::create_dir_all(cwd.join("out-bare")).unwrap();
    std::fs::write(cwd.join("out-bare/mine.txt"), "mine").unwrap();
    kiln(&host, &["-q", "-o", "out-bare", "ctx"], cwd, None).success();
    assert_result_files(&cwd.join("out-bare"));
    assert_eq!(
        std::fs::read_to_string(cwd.join("out-bare/mine.txt")).unwrap(),
        "mine"
    );

    // type=tar,dest=<file>: one tar of the files.
    kiln(
        &host,
        &["-q", "-o", "type=tar,dest=files.tar", "ctx"],
        cwd,
        None,
    )
    .success();
    let mut entries = tar_entries(&cwd.join("files.tar"));
    entries.sort();
    assert_eq!(entries, ["hello.txt", "link", "sub/", "sub/run.sh"]);
    let listing = run(Command::new("tar").arg("-tvf").arg(cwd.join("files.tar")))
        .success()
        .stdout;
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-x---") && l.ends_with("sub/run.sh")),
        "{listing}"
    );
    assert!(listing.contains("link -> hello.txt"), "{listing}");

    // dest=- writes it to stdout (not a terminal here).
    let output = Command::new(cargo_bin("kiln"))
        .args(["build", "--buildkit-host", &host, "-q"])
        .args(["-o", "type=tar,dest=-", "ctx"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(cwd.join("stdout.tar"), &output.stdout).unwrap();
    assert_eq!(
        std::fs::read(cwd.join("stdout.tar")).unwrap(),
        std::fs::read(cwd.join("files.tar")).unwrap(),
        "the same tree gives the same tar"
    );
}

#[test]
fn oci_tarball_passes_skopeo_and_umoci_and_metadata_matches() {
    let work = tempfile::tempdir().unwrap();
    let kilnd = daemon(work.path());
    let host = kilnd.address.clone();
    let cwd = work.path();
    write_context(
        &cwd.join("ctx"),
        &format!("FROM {BUSYBOX}\nRUN echo built > /built.txt\n"),
    );
    let name = "127.0.0.1:5000/kilntest/exporters-oci:1";
    kiln(
        &host,
        &[
            "-q",
            "-t",
            name,
            "-o",
            "type=oci,dest=image.tar",
            "--metadata-file",
            "meta.json",
            "ctx",
        ],
        cwd,
        None,
    )
    .success();
    let archive = format!("oci-archive:{}", cwd.join("image.tar").display());
    let raw_manifest = run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(&archive))
    .success()
    .stdout;
    let raw_config = run(Command::new("skopeo")
        .args(["inspect", "--config", "--raw"])
        .arg(&archive))
    .success()
    .stdout;

    // buildctl's metadata shape, checked against what skopeo reads.
    let meta = metadata(&cwd.join("meta.json"));
    let manifest_digest = kiln_image::Digest::of(raw_manifest.as_bytes()).to_string();
    let config_digest = kiln_image::Digest::of(raw_config.as_bytes()).to_string();
    assert_eq!(meta["containerimage.digest"], manifest_digest.as_str());
    assert_eq!(meta["containerimage.config.digest"], config_digest.as_str());
    let descriptor = &meta["containerimage.descriptor"];
    assert_eq!(descriptor["digest"], manifest_digest.as_str());
    assert_eq!(descriptor["size"], raw_manifest.len() as u64);
    assert_eq!(
        descriptor["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(meta["image.name"], name);

    // umoci unpacks the layout into a runtime bundle holding the file.
    let layout = cwd.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(cwd.join("image.tar"))
        .arg("-C")
        .arg(&layout))
    .success();
    let index = metadata(&layout.join("index.json"));
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or("1")
        .to_string();
    let bundle = cwd.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle))
    .success();
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/built.txt")).unwrap(),
        "built\n"
    );
    assert!(bundle.join("rootfs/bin/busybox").exists());
}

#[test]
fn source_date_epoch_gives_reproducible_digests() {
    let work = tempfile::tempdir().unwrap();
    let kilnd = daemon(work.path());
    let host = kilnd.address.clone();
    let cwd = work.path();
    // The step really reruns (--no-cache), so its files get new times.
    write_context(
        &cwd.join("ctx"),
        &format!("FROM {BUSYBOX}\nRUN mkdir -p /app && echo same > /app/f && touch /app/g\n"),
    );
    let build = |epoch: &str, out: &str| {
        let meta_file = format!("{out}.json");
        kiln(
            &host,
            &[
                "-q",
                "--no-cache",
                "-o",
                &format!("type=oci,dest={out}.tar,rewrite-timestamp=true"),
                "--metadata-file",
                &meta_file,
                "ctx",
            ],
            cwd,
            Some(epoch),
        )
        .success();
        metadata(&cwd.join(meta_file))
    };
    let first = build("1700000000", "one");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let second = build("1700000000", "two");
    assert_eq!(
        first["containerimage.digest"], second["containerimage.digest"],
        "same epoch, same manifest"
    );
    let other = build("1700000100", "three");
    assert_ne!(
        first["containerimage.digest"],
        other["containerimage.digest"]
    );

    // The config's times are the epoch.
    let config = run(Command::new("skopeo")
        .args(["inspect", "--config", "--raw"])
        .arg(format!("oci-archive:{}", cwd.join("one.tar").display())))
    .success()
    .stdout;
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    let last = config["history"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["created"], "2023-11-14T22:13:20Z", "{config}");

    // The local exporter clamps file times to the epoch too.
    kiln(
        &host,
        &["-q", "-o", "type=local,dest=files", "ctx"],
        cwd,
        Some("1700000000"),
    )
    .success();
    let f = std::fs::metadata(cwd.join("files/app/f")).unwrap();
    assert_eq!(f.mtime(), 1_700_000_000);
}

#[test]
fn file_exporters_with_the_containerd_worker() {
    if !kiln_testkit::containerd_available() {
        eprintln!("containerd is not available: skipped");
        return;
    }
    let namespace = Namespace(format!("kilntest-export-{:08x}", rand::random::<u32>()));
    let work = tempfile::tempdir().unwrap();
    let kilnd = Kilnd::start(
        &format!("unix://{}/kilnd.sock", work.path().display()),
        &[
            "--oci-worker=false",
            "--containerd-worker=true",
            "--containerd-worker-namespace",
            &namespace.0,
        ],
    );
    let host = kilnd.address.clone();
    let cwd = work.path();
    write_context(&cwd.join("ctx"), &FILES.replace("{BUSYBOX}", BUSYBOX));
    let out = kiln(&host, &["-o", "type=local,dest=out", "ctx"], cwd, None);
    assert_eq!(out.code, 0, "{}\nkilnd:\n{}", out.stderr, kilnd.log_text());
    assert_result_files(&cwd.join("out"));
    kiln(&host, &["-o", "type=tar,dest=files.tar", "ctx"], cwd, None).success();
    let mut entries = tar_entries(&cwd.join("files.tar"));
    entries.sort();
    assert_eq!(entries, ["hello.txt", "link", "sub/", "sub/run.sh"]);
}
