//! Registry authentication end to end: a real `docker-registry` with htpasswd auth started by
//! the test on a free loopback port (plain http), the client's credentials in a temporary
//! `DOCKER_CONFIG`, served to kilnd over the session's `Auth` service.
//!
//! Checked: `FROM` an image of the protected registry and `push=true` into it work with the
//! credentials (the pushed image is inspected with `skopeo --creds`); the same with the
//! credentials from a `docker-credential-*` helper; without credentials, and with a wrong
//! password, the build fails with a 401 naming the registry; kilnd's debug log never holds the
//! password.
//!
//! The Bearer flow runs against the same `docker-registry` with `auth: token` (JWTs verified
//! against a certificate the test makes with openssl) and a small token endpoint in the test
//! that grants a signed token only to USER/PASSWORD basic auth: the client fetches tokens over
//! the session's `FetchToken` with its credentials; without them the build fails naming the
//! endpoint and the registry; neither password nor token reach kilnd's log.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use kiln_testkit::{cargo_bin, run, Kilnd, Registry, BUSYBOX};

const USER: &str = "kilnuser";
const PASSWORD: &str = "Sup3r-s3cret-pw";

/// Starts docker-registry with htpasswd auth for USER/PASSWORD under `dir`.
fn start_registry(dir: &Path) -> Registry {
    let htpasswd = run(Command::new("htpasswd").args(["-Bbn", USER, PASSWORD])).success();
    std::fs::write(dir.join("htpasswd"), htpasswd.stdout.trim()).unwrap();
    let auth = format!(
        "  htpasswd:\n    realm: kiln-test\n    path: {}\n",
        dir.join("htpasswd").display()
    );
    start_registry_with(dir, &auth)
}

/// Starts docker-registry under `dir` with the `auth:` section `auth`.
fn start_registry_with(dir: &Path, auth: &str) -> Registry {
    Registry::start(dir, "", &format!("auth:\n{auth}"))
}

/// A DOCKER_CONFIG directory holding `json` as config.json.
fn docker_config(parent: &Path, name: &str, json: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), json).unwrap();
    dir
}

#[test]
fn htpasswd_registry_pull_and_push_with_docker_config_credentials() {
    let work = tempfile::tempdir().unwrap();
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let registry = start_registry(&registry_dir);
    let host = registry.host.clone();

    // The registry really refuses anonymous access.
    let anonymous = run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{host}/busybox:latest"),
    ]));
    assert_ne!(anonymous.code, 0);
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--dest-creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("docker://{BUSYBOX}"),
        &format!("docker://{host}/busybox:latest"),
    ]))
    .success();

    let context = work.path().join("ctx");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {host}/busybox:latest\nRUN echo authenticated > /auth.txt\n"),
    )
    .unwrap();

    let root = work.path().join("kilnd");
    let kilnd_config = work.path().join("buildkitd.toml");
    std::fs::write(
        &kilnd_config,
        format!("[registry.\"127.0.0.1:5000\"]\nhttp = true\n[registry.\"{host}\"]\nhttp = true\n"),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start_in(&root, &kilnd_config, &socket, &["--debug"]);

    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let with_auth = docker_config(
        work.path(),
        "with-auth",
        &format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
    );
    let build = |config_dir: &Path, target: &str, path: Option<&str>| {
        let mut command = Command::new(cargo_bin("kiln"));
        command
            .env("DOCKER_CONFIG", config_dir)
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=image,name={host}/{target},push=true"))
            .arg(&context);
        if let Some(path) = path {
            command.env("PATH", path);
        }
        run(&mut command)
    };

    // With credentials: FROM the protected registry and push into it.
    let built = build(&with_auth, "out:1", None);
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    let inspect = |target: &str| {
        run(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("docker://{host}/{target}"),
        ]))
    };
    let pushed = inspect("out:1").success();
    let base = inspect("busybox:latest").success();
    let layers = |json: &str| json.matches("\"sha256:").count();
    assert!(
        pushed.stdout.contains("\"Layers\"") && layers(&pushed.stdout) > layers(&base.stdout),
        "the pushed image has the base layers plus the RUN layer:\n{}",
        pushed.stdout
    );

    // Credentials from a credential helper (docker's protocol: host on stdin, JSON out).
    let helpers = work.path().join("helpers");
    std::fs::create_dir_all(&helpers).unwrap();
    let helper = helpers.join("docker-credential-kilntest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread host\n\
             [ \"$host\" = \"{host}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$host\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let with_helper = docker_config(
        work.path(),
        "with-helper",
        &format!(r#"{{"credHelpers": {{"{host}": "kilntest"}}}}"#),
    );
    let path = format!(
        "{}:{}",
        helpers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let built = build(&with_helper, "out:helper", Some(&path));
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    inspect("out:helper").success();

    // Without credentials, or with a wrong password: a clear 401 naming the registry.
    let empty = docker_config(work.path(), "empty", "{}");
    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:wrong"));
    let with_wrong = docker_config(
        work.path(),
        "wrong",
        &format!(r#"{{"auths": {{"{host}": {{"auth": "{wrong}"}}}}}}"#),
    );
    for config in [&empty, &with_wrong] {
        let refused = build(config, "out:2", None);
        assert_ne!(refused.code, 0, "{}", refused.stderr);
        assert!(
            refused.stderr.contains("401 Unauthorized")
                && refused
                    .stderr
                    .contains(&format!("unauthorized to registry {host}")),
            "{}",
            refused.stderr
        );
    }
    assert_ne!(
        inspect("out:2").code,
        0,
        "nothing was pushed without credentials"
    );

    // The secret never reaches kilnd's log (debug level), in clear or encoded.
    let log = daemon.log_text();
    assert!(
        log.contains("registry credentials from the session"),
        "the log is at debug level and saw the auth flow:\n{log}"
    );
    assert!(!log.contains(PASSWORD), "password in kilnd's log");
    assert!(!log.contains(&auth), "encoded credentials in kilnd's log");
}

/// base64url without padding (JWT segments).
fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT the registry's token auth accepts: RS256 by a self-signed certificate carried in the
/// `x5c` header, pull and push on `busybox` and `out`.
fn signed_token(dir: &Path) -> String {
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kiln-token",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem")))
    .success();
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    assert!(der.status.success());
    let cert = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = format!(r#"{{"typ":"JWT","alg":"RS256","x5c":["{cert}"]}}"#);
    let access = ["busybox", "out"]
        .iter()
        .map(|n| format!(r#"{{"type":"repository","name":"{n}","actions":["pull","push"]}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let claims = format!(
        r#"{{"iss":"kiln-test-issuer","sub":"{USER}","aud":"kiln-test-registry","exp":{},"nbf":{},"iat":{},"jti":"kiln-test","access":[{access}]}}"#,
        now + 3600,
        now - 60,
        now - 60
    );
    let signing_input = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(claims.as_bytes())
    );
    std::fs::write(dir.join("signing-input"), &signing_input).unwrap();
    let signature = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(dir.join("key.pem"))
        .arg(dir.join("signing-input"))
        .output()
        .unwrap();
    assert!(signature.status.success());
    format!("{signing_input}.{}", b64url(&signature.stdout))
}

/// A token endpoint on a free port: answers `token` to requests with USER/PASSWORD basic auth,
/// 401 otherwise. Returns its realm URL and the count of authenticated token requests.
fn start_token_server(token: String) -> (String, Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let granted = Arc::new(AtomicUsize::new(0));
    let counter = granted.clone();
    let expected = format!(
        "authorization: basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    )
    .to_ascii_lowercase();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut authorized = false;
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                let lower = line.trim().to_ascii_lowercase();
                authorized |= lower == expected;
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (status, body) = if authorized {
                counter.fetch_add(1, Ordering::SeqCst);
                (
                    "200 OK",
                    format!(r#"{{"token":"{token}","expires_in":3600}}"#),
                )
            } else {
                (
                    "401 Unauthorized",
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_owned(),
                )
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (realm, granted)
}

#[test]
fn token_registry_pull_and_push_with_tokens_the_client_fetches() {
    let work = tempfile::tempdir().unwrap();
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let token = signed_token(&registry_dir);
    let (realm, granted) = start_token_server(token.clone());
    let auth = format!(
        "  token:\n    realm: {realm}\n    service: kiln-test-registry\n    issuer: kiln-test-issuer\n    rootcertbundle: {}\n",
        registry_dir.join("cert.pem").display()
    );
    let registry = start_registry_with(&registry_dir, &auth);
    let host = registry.host.clone();
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        "--dest-creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("docker://{BUSYBOX}"),
        &format!("docker://{host}/busybox:latest"),
    ]))
    .success();

    let context = work.path().join("ctx");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {host}/busybox:latest\nRUN echo bearer > /auth.txt\n"),
    )
    .unwrap();
    let kilnd_config = work.path().join("buildkitd.toml");
    std::fs::write(
        &kilnd_config,
        format!("[registry.\"127.0.0.1:5000\"]\nhttp = true\n[registry.\"{host}\"]\nhttp = true\n"),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start_in(
        &work.path().join("kilnd"),
        &kilnd_config,
        &socket,
        &["--debug"],
    );
    let build = |config_dir: &Path| {
        run(Command::new(cargo_bin("kiln"))
            .env("DOCKER_CONFIG", config_dir)
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=image,name={host}/out:bearer,push=true"))
            .arg(&context))
    };

    // Without credentials the client's anonymous token request is refused: a clear failure
    // naming the token endpoint and the registry.
    let empty = docker_config(work.path(), "empty", "{}");
    let before = granted.load(Ordering::SeqCst);
    let refused = build(&empty);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains(&realm)
            && refused.stderr.contains("401 Unauthorized")
            && refused
                .stderr
                .contains(&format!("failed to get token for registry {host}")),
        "{}",
        refused.stderr
    );

    // With credentials (username/password form): pull and push with client-fetched tokens.
    let with_auth = docker_config(
        work.path(),
        "with-auth",
        &format!(
            r#"{{"auths": {{"{host}": {{"username": "{USER}", "password": "{PASSWORD}"}}}}}}"#
        ),
    );
    let built = build(&with_auth);
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    assert!(
        granted.load(Ordering::SeqCst) > before,
        "the client fetched tokens with its credentials"
    );
    run(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("docker://{host}/out:bearer"),
    ]))
    .success();
    let log = daemon.log_text();
    assert!(
        log.contains("registry token from the session"),
        "kilnd asked the session for tokens:\n{log}"
    );
    assert!(!log.contains(PASSWORD), "password in kilnd's log");
    assert!(!log.contains(&token), "token in kilnd's log");
}
