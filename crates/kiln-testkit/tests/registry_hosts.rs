//! `[registry."host"]` settings of buildkitd.toml beyond `http`/`insecure`, against real
//! registries: the shared one on 127.0.0.1:5000 and a TLS `docker-registry` the test starts
//! with a certificate from a test CA (made with `openssl`).
//!
//! Checked: `mirrors` — `FROM example.invalid/busybox:latest` (a host that does not exist)
//! resolves through its mirror 127.0.0.1:5000; an image the mirror lacks is pulled from the
//! host itself. `ca` — pulls from and pushes to the TLS registry work with its CA configured,
//! and fail on the certificate without it.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, make_ca, run, Kilnd, Output, Registry, BUSYBOX};

fn build(address: &str, context: &Path, dockerfile: &str, output: &str) -> Output {
    std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();
    run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", address])
        .arg("-o")
        .arg(output)
        .arg(context))
}

#[test]
fn mirrors_and_registry_ca() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    make_ca(&certs, "reg", &[("server", Some("IP:127.0.0.1"))]);
    let registry_dir = work.path().join("registry");
    std::fs::create_dir(&registry_dir).unwrap();
    let tls = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        certs.join("reg-server.pem").display(),
        certs.join("reg-server-key.pem").display()
    );
    let registry = Registry::start(&registry_dir, &tls, "");
    let host = registry.host.clone();
    // An image only the TLS registry holds (the mirror 127.0.0.1:5000 does not).
    let only_here = format!("{host}/kiln-only-here:latest");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{BUSYBOX}"),
        &format!("docker://{only_here}"),
    ]))
    .success();

    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let ca = certs.join("reg-ca.pem");
    let config = work.path().join("with-ca.toml");
    std::fs::write(
        &config,
        format!(
            "[registry.\"127.0.0.1:5000\"]\nhttp = true\n\
             [registry.\"example.invalid\"]\nmirrors = [\"127.0.0.1:5000\"]\n\
             [registry.\"{host}\"]\nca = [\"{}\"]\nmirrors = [\"127.0.0.1:5000\"]\n",
            ca.display()
        ),
    )
    .unwrap();
    let address = format!("unix://{}/a.sock", work.path().display());
    let daemon = Kilnd::start_in(&work.path().join("root-a"), &config, &address, &[]);
    let out = work.path().join("out.tar");
    let oci = format!("type=oci,dest={}", out.display());

    // A host that does not exist, served by its mirror.
    let mirrored = build(
        &address,
        &context,
        "FROM example.invalid/busybox:latest\nRUN echo mirrored > /m\n",
        &oci,
    );
    assert_eq!(
        mirrored.code,
        0,
        "FROM through the mirror failed:\n{}\nkilnd:\n{}",
        mirrored.stderr,
        daemon.log_text()
    );

    // The mirror lacks it: pulled from the TLS host itself, trusted through `ca`; and a push
    // over TLS (pushes never go to mirrors).
    let pushed = format!("{host}/kiln-pushed:1");
    let fallback = build(
        &address,
        &context,
        &format!("FROM {only_here}\nRUN echo fallback > /f\n"),
        &format!("type=image,name={pushed},push=true"),
    );
    assert_eq!(
        fallback.code,
        0,
        "FROM the TLS host after the mirror failed:\n{}\nkilnd:\n{}",
        fallback.stderr,
        daemon.log_text()
    );
    let inspect = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{pushed}"),
    ]))
    .success();
    assert!(inspect.stdout.contains("\"layers\""), "{}", inspect.stdout);

    // Without the CA the same pull fails on the certificate.
    let config = work.path().join("without-ca.toml");
    std::fs::write(
        &config,
        format!("[registry.\"127.0.0.1:5000\"]\nhttp = true\n[registry.\"{host}\"]\n"),
    )
    .unwrap();
    let address = format!("unix://{}/b.sock", work.path().display());
    let _daemon = Kilnd::start_in(&work.path().join("root-b"), &config, &address, &[]);
    let refused = build(
        &address,
        &context,
        &format!("FROM {only_here}\nRUN echo fallback > /f\n"),
        &oci,
    );
    assert_ne!(refused.code, 0, "pulled over TLS without the CA");
    assert!(
        refused.stderr.contains(&host) && refused.stderr.to_lowercase().contains("certificate"),
        "the failure names neither the host nor the certificate:\n{}",
        refused.stderr
    );
}
