//! Lazy base-image layers with the OCI worker (issue 8): a layer a build never needs is never
//! downloaded, and a push of an unchanged base layer mounts it instead of uploading it.
//!
//! kilnd reaches the shared registry (127.0.0.1:5000) only through a counting TCP proxy this
//! test runs, which logs every request line the daemon sends; the test counts
//! `GET /v2/…/blobs/<layer>` requests for busybox's layers.
//!
//! Checked: a `FROM` + `LABEL`/`ENV`/`CMD` build pushed to a new repository downloads no layer,
//! and the pushed manifest names busybox's layers as they are (digest, size, media type) with
//! busybox's diff ids; the same result exported as an OCI tarball fetches each layer once (and
//! the tarball holds it); the local exporter pulls the image for its tree; a build with a `RUN`
//! then downloads nothing again, and on a fresh daemon downloads each layer exactly once.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use kiln_testkit::{cargo_bin, run, Kilnd, Output, BUSYBOX};

/// A TCP proxy to 127.0.0.1:5000 recording what clients send (request lines, headers, bodies).
struct CountingProxy {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl CountingProxy {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect("127.0.0.1:5000") else {
                    continue;
                };
                let (client_read, server_write) = (client.try_clone().unwrap(), server);
                let (server_read, client_write) = (server_write.try_clone().unwrap(), client);
                let log = log.clone();
                std::thread::spawn(move || pump(client_read, server_write, Some(log)));
                std::thread::spawn(move || pump(server_read, client_write, None));
            }
        });
        Self { port, sent }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// How many `GET` requests asked for the blob `digest`.
    fn blob_gets(&self, digest: &str) -> usize {
        let sent = self.sent.lock().unwrap();
        let text = String::from_utf8_lossy(&sent);
        let wanted = format!("/blobs/{digest} HTTP/1.1");
        text.split("\r\n")
            .filter(|line| line.starts_with("GET /v2/") && line.ends_with(&wanted))
            .count()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, log: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(log) = &log {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn skopeo_json(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("skopeo").args(args)).success();
    serde_json::from_str(&out.stdout).unwrap()
}

fn build(address: &str, context: &Path, dockerfile: &str, output: &str) -> Output {
    std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", address])
        .arg("-o")
        .arg(output)
        .arg(context))
}

fn daemon(work: &Path, name: &str, proxy: &CountingProxy) -> Kilnd {
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[registry.\"127.0.0.1:5000\"]\nhttp = true\n[registry.\"{}\"]\nhttp = true\n",
            proxy.host()
        ),
    )
    .unwrap();
    let address = format!("unix://{}/{name}.sock", work.display());
    Kilnd::start_in(&work.join(format!("root-{name}")), &config, &address, &[])
}

fn blob_names(tar_path: &Path) -> Vec<String> {
    let mut archive = tar::Archive::new(std::fs::File::open(tar_path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn base_layers_are_fetched_only_when_needed() {
    let work = tempfile::tempdir().unwrap();
    let proxy = CountingProxy::start();
    let base = BUSYBOX.replace("127.0.0.1:5000", &proxy.host());
    let busybox = skopeo_json(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{BUSYBOX}"),
    ]);
    let busybox_config = skopeo_json(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{BUSYBOX}"),
    ]);
    let layers: Vec<String> = busybox["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert!(!layers.is_empty(), "{busybox}");

    let daemon_a = daemon(work.path(), "a", &proxy);
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let nonce: u64 = rand::random();
    let repo = format!("kiln-test/lazy-{nonce:x}");

    // Metadata only: pushed to a new repository without downloading a layer.
    let labelled = format!(
        "FROM {base}\nLABEL org.example.lazy=yes\nENV LAZY=1\nCMD [\"sh\", \"-c\", \"true\"]\n"
    );
    let pushed = build(
        &daemon_a.address,
        &context,
        &labelled,
        &format!(
            "type=image,name={}/{repo}:v1,push=true,oci-mediatypes=true",
            proxy.host()
        ),
    );
    assert_eq!(
        pushed.code,
        0,
        "push failed:\n{}\nkilnd:\n{}",
        pushed.stderr,
        daemon_a.log_text()
    );
    for layer in &layers {
        assert_eq!(proxy.blob_gets(layer), 0, "layer {layer} was downloaded");
    }
    let manifest = skopeo_json(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://127.0.0.1:5000/{repo}:v1"),
    ]);
    assert_eq!(manifest["layers"], busybox["layers"], "{manifest}");
    let config = skopeo_json(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://127.0.0.1:5000/{repo}:v1"),
    ]);
    assert_eq!(config["rootfs"], busybox_config["rootfs"], "{config}");
    assert_eq!(config["config"]["Labels"]["org.example.lazy"], "yes");

    // The same result as a tarball needs the bytes: each layer fetched once, not unpacked.
    let tarball = work.path().join("lazy.tar");
    let exported = build(
        &daemon_a.address,
        &context,
        &labelled,
        &format!("type=oci,dest={}", tarball.display()),
    );
    assert_eq!(exported.code, 0, "oci export failed:\n{}", exported.stderr);
    let names = blob_names(&tarball);
    for layer in &layers {
        assert_eq!(proxy.blob_gets(layer), 1, "layer {layer}");
        let hex = layer.trim_start_matches("sha256:");
        assert!(
            names.iter().any(|n| n == &format!("blobs/sha256/{hex}")),
            "{names:?}"
        );
    }

    // The local exporter needs the tree: the image is pulled then (from the fetched blob).
    let local = work.path().join("local");
    let exported = build(
        &daemon_a.address,
        &context,
        &labelled,
        &format!("type=local,dest={}", local.display()),
    );
    assert_eq!(
        exported.code, 0,
        "local export failed:\n{}",
        exported.stderr
    );
    assert!(
        local.join("bin/busybox").is_file(),
        "no busybox tree in {}",
        local.display()
    );

    // A step that runs on the image uses that pull; nothing is downloaded again.
    let ran = build(
        &daemon_a.address,
        &context,
        &format!("FROM {base}\nRUN echo ran > /ran\n"),
        &format!("type=oci,dest={}", work.path().join("ran.tar").display()),
    );
    assert_eq!(ran.code, 0, "RUN build failed:\n{}", ran.stderr);
    for layer in &layers {
        assert_eq!(proxy.blob_gets(layer), 1, "layer {layer} downloaded again");
    }
    drop(daemon_a);

    // On a fresh daemon the RUN build downloads each layer exactly once.
    let daemon_b = daemon(work.path(), "b", &proxy);
    let ran = build(
        &daemon_b.address,
        &context,
        &format!("FROM {base}\nRUN echo fresh > /fresh\n"),
        &format!("type=oci,dest={}", work.path().join("fresh.tar").display()),
    );
    assert_eq!(ran.code, 0, "RUN build failed:\n{}", ran.stderr);
    for layer in &layers {
        assert_eq!(proxy.blob_gets(layer), 2, "layer {layer}");
    }
}
