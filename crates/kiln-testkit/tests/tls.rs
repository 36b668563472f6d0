//! kilnd serving a unix socket and TLS on tcp:// at once, with client
//! certificates required (`--tlscacert`): certificates are made by the
//! `openssl` CLI in the test.

use std::path::PathBuf;
use std::process::Command;

use kiln_testkit::{cargo_bin, free_port, make_ca, run, Kilnd, Output, BUSYBOX};

struct Fixture {
    certs: PathBuf,
    context: PathBuf,
    out: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.certs.join(name).display().to_string()
    }

    fn build(&self, host: &str, tls: &[(&str, &str)]) -> Output {
        let mut command = Command::new(cargo_bin("kiln"));
        command.args(["build", "--progress=plain", "--buildkit-host", host]);
        for (flag, file) in tls {
            command.arg(format!("--{flag}={}", self.path(file)));
        }
        command
            .arg("-o")
            .arg(format!("type=oci,dest={}", self.out.display()))
            .arg(&self.context);
        run(&mut command)
    }
}

#[test]
fn tls_daemon_requires_a_client_certificate_from_its_ca() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    make_ca(
        &certs,
        "good",
        &[
            ("server", Some("IP:127.0.0.1,DNS:localhost")),
            ("client", None),
        ],
    );
    make_ca(&certs, "evil", &[("client", None)]);
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN echo over-tls > /tls\n"),
    )
    .unwrap();
    let fixture = Fixture {
        certs,
        context,
        out: work.path().join("image.tar"),
    };

    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let tcp = format!("tcp://127.0.0.1:{}", free_port());
    let daemon = Kilnd::start(
        &socket,
        &[
            "--addr",
            &tcp,
            "--tlscert",
            &fixture.path("good-server.pem"),
            "--tlskey",
            &fixture.path("good-server-key.pem"),
            "--tlscacert",
            &fixture.path("good-ca.pem"),
        ],
    );

    // The right client certificate: the build runs over TLS.
    let good = fixture.build(
        &tcp,
        &[
            ("tlscacert", "good-ca.pem"),
            ("tlscert", "good-client.pem"),
            ("tlskey", "good-client-key.pem"),
        ],
    );
    assert_eq!(good.code, 0, "{}\n{}", good.stderr, daemon.log_text());
    assert!(std::fs::metadata(&fixture.out).unwrap().len() > 0);
    // The unix socket of the same daemon stays plain (the TLS flags are ignored there).
    let unix = fixture.build(&socket, &[("tlscacert", "good-ca.pem")]);
    assert_eq!(unix.code, 0, "{}", unix.stderr);

    // No client certificate: refused.
    let anonymous = fixture.build(&tcp, &[("tlscacert", "good-ca.pem")]);
    assert_ne!(anonymous.code, 0);
    assert!(
        anonymous.stderr.contains("refused the TLS connection")
            && anonymous.stderr.contains("pass --tlscert and --tlskey"),
        "{}",
        anonymous.stderr
    );
    // A client certificate from another CA: refused.
    let stranger = fixture.build(
        &tcp,
        &[
            ("tlscacert", "good-ca.pem"),
            ("tlscert", "evil-client.pem"),
            ("tlskey", "evil-client-key.pem"),
        ],
    );
    assert_ne!(stranger.code, 0);
    assert!(
        stranger
            .stderr
            .contains("did not accept the client certificate")
            && stranger.stderr.contains("evil-client.pem"),
        "{}",
        stranger.stderr
    );
    // Plaintext to the TLS port: refused.
    let plain = fixture.build(&tcp, &[]);
    assert_ne!(plain.code, 0);
    // The client does not trust a server whose CA it was not given.
    let distrust = fixture.build(
        &tcp,
        &[
            ("tlscacert", "evil-ca.pem"),
            ("tlscert", "good-client.pem"),
            ("tlskey", "good-client-key.pem"),
        ],
    );
    assert_ne!(distrust.code, 0);
    assert!(
        distrust
            .stderr
            .contains("invalid peer certificate: UnknownIssuer"),
        "{}",
        distrust.stderr
    );
}
