//! Dockerfile language features end to end: the real `kiln` against a sandboxed `kilnd`, with
//! the built image unpacked (docker archive → config + layers) and its files and config checked.
//! The Dockerfiles also assert inside their own `RUN` steps, so a wrong mount or owner fails the
//! build itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, Namespace, Output, BUSYBOX};

/// A build directory with its own daemon (fields drop in order: the daemon stops before its
/// containerd namespace is removed).
struct Bench {
    daemon: Kilnd,
    namespace: Option<Namespace>,
    work: tempfile::TempDir,
    socket: String,
}

impl Bench {
    /// kilnd with its OCI worker.
    fn new() -> Self {
        Self::start(&[], None)
    }

    /// kilnd with only its containerd worker, in a fresh namespace.
    fn containerd(name: &str) -> Self {
        let namespace = format!("kiln-df-{name}-{}", std::process::id());
        let args = [
            "--oci-worker=false",
            "--containerd-worker=true",
            "--containerd-worker-namespace",
            namespace.as_str(),
        ];
        Self::start(&args, Some(Namespace(namespace.clone())))
    }

    fn start(args: &[&str], namespace: Option<Namespace>) -> Self {
        let work = tempfile::tempdir().unwrap();
        let socket = format!("unix://{}/kilnd.sock", work.path().display());
        let daemon = Kilnd::start(&socket, args);
        Self {
            daemon,
            namespace,
            work,
            socket,
        }
    }

    /// Writes `files` (path, content) into a fresh context named `name`.
    fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.work.path().join(name);
        for (path, content) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    /// `kiln build` of `context` into a docker archive; returns the output and the archive.
    fn build(&self, context: &Path, extra: &[&str]) -> (Output, PathBuf) {
        let dest = context.with_extension("tar");
        let out = run(Command::new(cargo_bin("kiln"))
            .args(["build", "--progress=plain", "--buildkit-host", &self.socket])
            .args(extra)
            .arg("-o")
            .arg(format!("type=docker,dest={}", dest.display()))
            .arg(context));
        (out, dest)
    }

    fn build_ok(&self, context: &Path, extra: &[&str]) -> Image {
        let (out, dest) = self.build(context, extra);
        assert_eq!(
            out.code,
            0,
            "{}\nkilnd:\n{}",
            out.stderr,
            self.daemon.log_text()
        );
        Image::unpack(&dest, &context.with_extension("image"))
    }
}

/// A docker archive unpacked: the image config and the layers applied in order.
struct Image {
    config: serde_json::Value,
    rootfs: PathBuf,
}

impl Image {
    fn unpack(archive: &Path, dir: &Path) -> Self {
        let raw = dir.join("raw");
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&raw).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&raw))
        .success();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(raw.join("manifest.json")).unwrap()).unwrap();
        let entry = &manifest[0];
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(raw.join(entry["Config"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        for layer in entry["Layers"].as_array().unwrap() {
            run(Command::new("tar")
                .args(["-xzf"])
                .arg(raw.join(layer.as_str().unwrap()))
                .args(["--numeric-owner", "-C"])
                .arg(&rootfs))
            .success();
        }
        Self { config, rootfs }
    }

    fn path(&self, path: &str) -> PathBuf {
        self.rootfs.join(path.trim_start_matches('/'))
    }

    fn owner(&self, path: &str) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let meta =
            std::fs::symlink_metadata(self.path(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        (meta.uid(), meta.gid())
    }
}

/// `RUN --mount=type=bind` from a stage, an image, a stage index and the build context; read-only
/// by default, `rw` writes discarded; nothing of the mounts ends up in the image.
fn run_mount_bind(bench: &Bench) {
    let context = bench.context(
        "bind",
        &[
            (
                "Dockerfile",
                &format!(
                    r#"FROM {BUSYBOX} AS build
RUN mkdir /out && echo built > /out/artifact

FROM {BUSYBOX}
WORKDIR /work
RUN --mount=type=bind,from=build,source=/out,target=/mnt/out cp /mnt/out/artifact /artifact
RUN --mount=type=bind,from=0,target=/first test -f /first/out/artifact && echo from-index > /from-index
RUN --mount=type=bind,from={BUSYBOX},source=/bin,target=/img test -x /img/busybox
RUN --mount=type=bind,target=ctx test "$(cat ctx/sub/data.txt)" = context-data && ! touch ctx/readonly 2>/dev/null && cp ctx/sub/data.txt /from-context
RUN --mount=type=bind,src=sub,dst=/sub,rw echo changed > /sub/data.txt && touch /sub/new && test "$(cat /sub/data.txt)" = changed
RUN --mount=type=bind,src=sub,dst=/sub test "$(cat /sub/data.txt)" = context-data && test ! -e /sub/new
"#
                ),
            ),
            ("sub/data.txt", "context-data\n"),
        ],
    );
    let image = bench.build_ok(&context, &[]);
    assert_eq!(
        std::fs::read_to_string(image.path("/artifact")).unwrap(),
        "built\n"
    );
    assert_eq!(
        std::fs::read_to_string(image.path("/from-context")).unwrap(),
        "context-data\n"
    );
    assert!(image.path("/from-index").is_file());
    for gone in ["/mnt/out", "/first", "/img", "/work/ctx", "/sub"] {
        assert!(
            !image.path(gone).exists(),
            "mount point {gone} leaked into the image"
        );
    }

    // A source that does not exist fails clearly.
    let missing = bench.context(
        "bind-missing",
        &[(
            "Dockerfile",
            &format!("FROM {BUSYBOX}\nRUN --mount=type=bind,source=nope,target=/m true\n"),
        )],
    );
    let (out, _) = bench.build(&missing, &[]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("source path \"/nope\" does not exist"),
        "{}",
        out.stderr
    );
}

/// `USER name[:group]` and `COPY/ADD --chown=name[:group]` resolved from the image's
/// `/etc/passwd` and `/etc/group`; unknown names fail naming the user.
fn user_and_chown_by_name(bench: &Bench) {
    let context = bench.context(
        "users",
        &[
            (
                "Dockerfile",
                &format!(
                    r#"FROM {BUSYBOX}
RUN echo 'app:x:1234:2345:app:/home/app:/bin/sh' >> /etc/passwd && echo 'appgrp:x:2345:' >> /etc/group && echo 'extra:x:3456:app' >> /etc/group
COPY --chown=app:extra f.txt /owned-both.txt
COPY --chown=app f.txt /owned-user.txt
ADD --chown=app:3456 f.txt /added.txt
COPY --chown=1234 f.txt /owned-id.txt
USER app
RUN test "$(id -u)" = 1234 && test "$(id -g)" = 2345 && id -G | grep -q 3456 && touch /tmp/by-app
WORKDIR /home/app/work
USER app:extra
RUN test "$(id -u)" = 1234 && test "$(id -g)" = 3456 && touch /tmp/by-app-extra
"#
                ),
            ),
            ("f.txt", "owned\n"),
        ],
    );
    let image = bench.build_ok(&context, &[]);
    assert_eq!(image.owner("/owned-both.txt"), (1234, 3456));
    assert_eq!(image.owner("/owned-user.txt"), (1234, 2345));
    assert_eq!(image.owner("/added.txt"), (1234, 3456));
    assert_eq!(image.owner("/owned-id.txt"), (1234, 1234));
    assert_eq!(image.owner("/tmp/by-app"), (1234, 2345));
    assert_eq!(image.owner("/tmp/by-app-extra"), (1234, 3456));
    // WORKDIR under USER app is created owned by app (BuildKit's mkdir with the user's chown).
    assert_eq!(image.owner("/home/app/work"), (1234, 2345));
    assert_eq!(image.config["config"]["User"], "app:extra");

    for (name, dockerfile, expected) in [
        (
            "chown-unknown",
            format!("FROM {BUSYBOX}\nCOPY --chown=ghost f.txt /f\n"),
            "unknown user \"ghost\"",
        ),
        (
            "chown-unknown-group",
            format!("FROM {BUSYBOX}\nCOPY --chown=root:ghosts f.txt /f\n"),
            "unknown group \"ghosts\"",
        ),
        (
            "user-unknown",
            format!("FROM {BUSYBOX}\nUSER ghost\nRUN true\n"),
            "unable to find user ghost",
        ),
    ] {
        let context = bench.context(
            name,
            &[("Dockerfile", dockerfile.as_str()), ("f.txt", "x\n")],
        );
        let (out, _) = bench.build(&context, &[]);
        assert_ne!(out.code, 0, "{name} built");
        assert!(out.stderr.contains(expected), "{name}: {}", out.stderr);
    }
}

/// `COPY/ADD --exclude` (repeatable, expanded, `**` and `!` exceptions) and `COPY --parents`
/// (with and without a `/./` pivot, wildcards, a missing source failing).
fn copy_exclude_and_parents(bench: &Bench) {
    let context = bench.context(
        "filters",
        &[
            (
                "Dockerfile",
                &format!(
                    r#"FROM {BUSYBOX}
ARG DOCS=md
COPY --exclude=*.$DOCS --exclude=tmp --exclude=**/*_test.go --exclude=!keep.md . /app/
ADD --exclude=**/*.txt a /added/
COPY --parents a/b/c.txt ./pkg/./*/main.go /parents/
"#
                ),
            ),
            ("a/b/c.txt", "c\n"),
            ("a/b/d.md", "d\n"),
            ("a/x/y.bin", "y\n"),
            ("keep.md", "keep\n"),
            ("readme.md", "readme\n"),
            ("tmp/junk", "junk\n"),
            ("pkg/one/main.go", "one\n"),
            ("pkg/one/main_test.go", "test\n"),
            ("pkg/two/other.go", "other\n"),
        ],
    );
    let image = bench.build_ok(&context, &[]);
    let present = |p: &str| image.path(p).exists();
    for p in [
        "/app/a/b/c.txt",
        // `*.md` only matches at the top (`*` does not cross `/`), as in .dockerignore.
        "/app/a/b/d.md",
        "/app/keep.md",
        "/app/pkg/one/main.go",
        "/app/pkg/two/other.go",
        "/app/Dockerfile",
        "/added/b/d.md",
        "/added/x/y.bin",
        "/parents/a/b/c.txt",
        "/parents/one/main.go",
    ] {
        assert!(present(p), "{p} is missing");
    }
    for p in [
        "/app/readme.md",
        "/app/tmp",
        "/app/pkg/one/main_test.go",
        "/added/b/c.txt",
        "/parents/a/b/d.md",
        "/parents/a/x",
        "/parents/pkg",
        "/parents/two",
        "/parents/one/main_test.go",
    ] {
        assert!(!present(p), "{p} should not be there");
    }

    let missing = bench.context(
        "parents-missing",
        &[(
            "Dockerfile",
            &format!("FROM {BUSYBOX}\nCOPY --parents nope/file /x/\n"),
        )],
    );
    let (out, _) = bench.build(&missing, &[]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("\"/nope/file\": not found"),
        "{}",
        out.stderr
    );
}

/// A tiny HTTP/1.1 server for `ADD <url>` tests: `/hello.txt` with an `ETag` and a
/// `Last-Modified`, answering `If-None-Match` with 304; anything else is 404.
struct HttpServer {
    port: u16,
    not_modified: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    downloads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const HELLO: &str = "hello from http\n";

impl HttpServer {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let not_modified = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let downloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (nm, dl) = (not_modified.clone(), downloads.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut etag_match = false;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if lower.starts_with("if-none-match:") && lower.contains("\"v1\"") {
                        etag_match = true;
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let response = if path == "/hello.txt" && etag_match {
                    nm.fetch_add(1, Ordering::SeqCst);
                    "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                } else if path == "/hello.txt" {
                    dl.fetch_add(1, Ordering::SeqCst);
                    format!(
                        "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nLast-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HELLO}",
                        HELLO.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = stream.write_all(response.as_bytes());
            }
        });
        Self {
            port,
            not_modified,
            downloads,
        }
    }
}

/// `ADD <url>` fetched by the daemon: default mode 0600, mtime from `Last-Modified`,
/// `--checksum` verified, `--chmod` applied; a rebuild revalidates with the `ETag` instead of
/// downloading; a wrong checksum and a 404 fail clearly.
fn add_http_url(bench: &Bench) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::Ordering;
    let server = HttpServer::start();
    let url = format!("http://127.0.0.1:{}/hello.txt", server.port);
    let sum = {
        // sha256 of HELLO, computed with the system tool for an independent check.
        let file = bench.work.path().join("hello");
        std::fs::write(&file, HELLO).unwrap();
        let out = run(Command::new("sha256sum").arg(&file)).success();
        out.stdout.split_whitespace().next().unwrap().to_string()
    };
    let dockerfile = format!(
        "FROM {BUSYBOX}\nADD {url} /downloads/\nADD --checksum=sha256:{sum} --chmod=644 {url} /checked.txt\nRUN test \"$(cat /downloads/hello.txt)\" = 'hello from http'\n"
    );
    let context = bench.context("http", &[("Dockerfile", dockerfile.as_str())]);
    let image = bench.build_ok(&context, &[]);
    let meta = std::fs::metadata(image.path("/downloads/hello.txt")).unwrap();
    assert_eq!(
        std::fs::read_to_string(image.path("/downloads/hello.txt")).unwrap(),
        HELLO
    );
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.mtime(), 1_445_412_480, "mtime from Last-Modified");
    let checked = std::fs::metadata(image.path("/checked.txt")).unwrap();
    assert_eq!(checked.permissions().mode() & 0o7777, 0o644);
    let downloads = server.downloads.load(Ordering::SeqCst);
    assert!(downloads >= 1);

    // Rebuild: the ETag revalidates (304), nothing is downloaded again, the steps are cached.
    let (out, _) = bench.build(&context, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(server.not_modified.load(Ordering::SeqCst) >= 1);
    assert_eq!(server.downloads.load(Ordering::SeqCst), downloads);
    assert!(out.stderr.contains("CACHED"), "{}", out.stderr);

    for (name, dockerfile, expected) in [
        (
            "http-bad-sum",
            format!(
                "FROM {BUSYBOX}\nADD --checksum=sha256:{} {url} /x\n",
                "0".repeat(64)
            ),
            "digest mismatch",
        ),
        (
            "http-404",
            format!(
                "FROM {BUSYBOX}\nADD http://127.0.0.1:{}/missing /x\n",
                server.port
            ),
            "404",
        ),
    ] {
        let context = bench.context(name, &[("Dockerfile", dockerfile.as_str())]);
        let (out, _) = bench.build(&context, &[]);
        assert_ne!(out.code, 0, "{name} built");
        assert!(out.stderr.contains(expected), "{name}: {}", out.stderr);
    }
}

/// `git daemon` serving a fresh repository on 127.0.0.1; killed on drop.
struct GitDaemon {
    child: std::process::Child,
    port: u16,
    commit: String,
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GitDaemon {
    /// A repository `repo.git` under `base` with `README`, `sub/inner.txt`, branch `main`
    /// and tag `v1`.
    fn start(base: &Path) -> Self {
        let work = base.join("work");
        std::fs::create_dir_all(work.join("sub")).unwrap();
        std::fs::write(work.join("README"), "from git\n").unwrap();
        std::fs::write(work.join("sub/inner.txt"), "inner\n").unwrap();
        let git = |dir: &Path, args: &[&str]| {
            run(Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["-c", "user.name=kiln", "-c", "user.email=kiln@example.com"])
                .args(args))
            .success()
        };
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "initial"]);
        git(&work, &["tag", "v1"]);
        let commit = git(&work, &["rev-parse", "HEAD"]).stdout.trim().to_string();
        let served = base.join("served");
        std::fs::create_dir_all(&served).unwrap();
        run(Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(served.join("repo.git")))
        .success();
        // A free port: bind, read it, release it for the daemon.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", served.display()))
            .arg(&served)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "git daemon did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self {
            child,
            port,
            commit,
        }
    }
}

/// `ADD <git ref>`: a branch, a tag with a subdirectory, `--keep-git-dir` and `--checksum`;
/// a wrong checksum and an unknown ref fail clearly.
fn add_git_repository(bench: &Bench) {
    let daemon = GitDaemon::start(&bench.work.path().join("git"));
    let repo = format!("git://127.0.0.1:{}/repo.git", daemon.port);
    let short = &daemon.commit[..12];
    let dockerfile = format!(
        "FROM {BUSYBOX}\nADD {repo}#main /src\nADD {repo}#v1:sub /sub/\nADD --keep-git-dir=true --checksum={short} {repo} /withgit\n"
    );
    let context = bench.context("git", &[("Dockerfile", dockerfile.as_str())]);
    let image = bench.build_ok(&context, &[]);
    assert_eq!(
        std::fs::read_to_string(image.path("/src/README")).unwrap(),
        "from git\n"
    );
    assert!(image.path("/src/sub/inner.txt").is_file());
    assert!(
        !image.path("/src/.git").exists(),
        ".git is dropped by default"
    );
    assert_eq!(
        std::fs::read_to_string(image.path("/sub/inner.txt")).unwrap(),
        "inner\n"
    );
    assert!(!image.path("/sub/README").exists());
    assert!(image.path("/withgit/.git").is_dir());
    assert!(image.path("/withgit/README").is_file());

    for (name, dockerfile, expected) in [
        (
            "git-bad-sum",
            format!("FROM {BUSYBOX}\nADD --checksum=deadbeef {repo} /x\n"),
            "expected checksum to match deadbeef",
        ),
        (
            "git-no-ref",
            format!("FROM {BUSYBOX}\nADD {repo}#nope /x\n"),
            "ref \"nope\" not found",
        ),
    ] {
        let context = bench.context(name, &[("Dockerfile", dockerfile.as_str())]);
        let (out, _) = bench.build(&context, &[]);
        assert_ne!(out.code, 0, "{name} built");
        assert!(out.stderr.contains(expected), "{name}: {}", out.stderr);
    }
}

#[test]
fn oci_worker() {
    let bench = Bench::new();
    run_mount_bind(&bench);
    user_and_chown_by_name(&bench);
    copy_exclude_and_parents(&bench);
    add_http_url(&bench);
    add_git_repository(&bench);
}

/// The same cases on the containerd worker (its exec and file ops reuse the OCI worker's
/// engine, its snapshots are containerd's).
#[test]
fn containerd_worker() {
    let bench = Bench::containerd("lang");
    assert!(bench.namespace.is_some());
    run_mount_bind(&bench);
    user_and_chown_by_name(&bench);
    copy_exclude_and_parents(&bench);
    add_http_url(&bench);
    add_git_repository(&bench);
}
