//! `RUN --mount=type=secret` and `type=ssh` through the real `kiln` binary against a sandboxed
//! `kilnd`: the secret is readable in its `RUN` (from a file and from an environment variable),
//! is absent from every exported blob (layers decompressed), from every file under the daemon's
//! root and from its log; a required secret the client lacks fails naming its id; an SSH agent
//! (a real `ssh-agent` holding a key made by `ssh-keygen`) answers `ssh-add -l` inside `RUN`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_testkit::{cargo_bin, run, Kilnd, Namespace, Output, BUSYBOX};

fn random_value(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn build(socket: &str, context: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(cargo_bin("kiln"));
    command
        .args(["build", "--progress=plain", "--buildkit-host", socket])
        .args(extra)
        .arg(context);
    for (k, v) in envs {
        command.env(k, v);
    }
    run(&mut command)
}

/// Every regular file under `dir`, recursively (symlinks and sockets skipped).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            files_under(&entry.path(), out);
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
}

/// The bytes of `path`, and when they are gzip, their decompressed form too.
fn contents(path: &Path) -> Vec<Vec<u8>> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    let mut all = Vec::new();
    if data.starts_with(&[0x1f, 0x8b]) {
        let mut plain = Vec::new();
        if flate2::read::MultiGzDecoder::new(&data[..])
            .read_to_end(&mut plain)
            .is_ok()
        {
            all.push(plain);
        }
    }
    all.push(data);
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Paths of the files whose content (or decompressed content) holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files
        .into_iter()
        .filter(|f| contents(f).iter().any(|c| contains(c, needle)))
        .collect()
}

/// Entry names of every layer tar in an unpacked docker archive.
fn layer_entries(unpacked: &Path) -> Vec<String> {
    let mut files = Vec::new();
    files_under(&unpacked.join("blobs"), &mut files);
    let mut names = Vec::new();
    for file in files {
        for data in contents(&file) {
            let mut archive = tar::Archive::new(&data[..]);
            let Ok(entries) = archive.entries() else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(path) = entry.path() {
                    names.push(path.to_string_lossy().into_owned());
                }
            }
        }
    }
    names
}

#[test]
fn secrets_reach_run_and_nothing_else() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let file_value = random_value("kiln-file-secret");
    let env_value = random_value("kiln-env-secret");
    let secret_file = work.path().join("secret.txt");
    std::fs::write(&secret_file, &file_value).unwrap();
    // The Dockerfile holds digests only: the values must not reach the image history either.
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\n\
             RUN --mount=type=secret,id=s test \"$(sha256sum < /run/secrets/s | cut -d' ' -f1)\" = {file_sum} \
                 && test \"$(stat -c %a:%u /run/secrets/s)\" = 400:0 && echo ran > /ran-file\n\
             RUN --mount=type=secret,id=e,env=TOKEN test \"$(printf %s \"$TOKEN\" | sha256sum | cut -d' ' -f1)\" = {env_sum} \
                 && echo ran > /ran-env\n\
             RUN --mount=type=secret,id=s,target=/etc/app/key,uid=1000,mode=0440 \
                 test \"$(stat -c %a:%u /etc/app/key)\" = 440:1000 && ! test -e /run/secrets/s\n\
             RUN --mount=type=secret,id=absent test ! -e /run/secrets/absent\n",
            file_sum = sha256_hex(file_value.as_bytes()),
            env_sum = sha256_hex(env_value.as_bytes()),
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let dest = work.path().join("image.tar");
    let built = build(
        &socket,
        &context,
        &[
            "--secret",
            &format!("id=s,src={}", secret_file.display()),
            "--secret",
            "id=e,env=KILN_TEST_SECRET",
            "-o",
            &format!("type=docker,dest={}", dest.display()),
        ],
        &[("KILN_TEST_SECRET", &env_value)],
    );
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );

    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&dest)
        .arg("-C")
        .arg(&unpacked))
    .success();
    let entries = layer_entries(&unpacked);
    assert!(
        entries.iter().any(|e| e.ends_with("ran-file"))
            && entries.iter().any(|e| e.ends_with("ran-env")),
        "the RUN steps left their marker files: {entries:?}"
    );
    assert!(
        !entries
            .iter()
            .any(|e| e.contains("run/secrets") || e.contains("etc/app")),
        "a secret mount target reached a layer: {entries:?}"
    );
    for value in [&file_value, &env_value] {
        assert_eq!(
            files_holding(&unpacked, value.as_bytes()),
            Vec::<PathBuf>::new(),
            "secret in the exported image"
        );
        assert_eq!(
            files_holding(&daemon.root, value.as_bytes()),
            Vec::<PathBuf>::new(),
            "secret in the daemon's root"
        );
        assert!(
            !daemon.log_text().contains(value.as_str()),
            "secret in kilnd's log"
        );
        assert!(
            !built.stderr.contains(value.as_str()),
            "secret in the build output"
        );
    }

    // The secret's value is not part of any cache key (as upstream): with other values every
    // step is a cache hit, which the digest checks prove (they would fail if a step re-ran).
    std::fs::write(&secret_file, "another value").unwrap();
    let rebuilt = build(
        &socket,
        &context,
        &[
            "--secret",
            &format!("id=s,src={}", secret_file.display()),
            "--secret",
            "id=e,env=KILN_TEST_SECRET",
            "-o",
            &format!(
                "type=docker,dest={}",
                work.path().join("again.tar").display()
            ),
        ],
        &[("KILN_TEST_SECRET", "another env value")],
    );
    assert_eq!(rebuilt.code, 0, "{}", rebuilt.stderr);
    assert!(rebuilt.stderr.contains("CACHED"), "{}", rebuilt.stderr);
}

#[test]
fn missing_required_secret_fails_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN --mount=type=secret,id=npm_token,required true\n"),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let _daemon = Kilnd::start(&socket, &[]);
    let built = build(&socket, &context, &[], &[]);
    assert_ne!(built.code, 0, "{}", built.stderr);
    assert!(
        built.stderr.contains("secret npm_token not found"),
        "{}",
        built.stderr
    );

    // A --secret file that does not exist fails before the build, naming the id.
    let missing = work.path().join("nope.txt");
    let built = build(
        &socket,
        &context,
        &[
            "--secret",
            &format!("id=npm_token,src={}", missing.display()),
        ],
        &[],
    );
    assert_ne!(built.code, 0);
    assert!(
        built
            .stderr
            .contains("--secret id=npm_token: failed to stat"),
        "{}",
        built.stderr
    );
}

/// A running `ssh-agent` on its own socket, killed on drop.
struct Agent {
    pid: String,
    socket: PathBuf,
}

impl Agent {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("agent.sock");
        let out = run(Command::new("ssh-agent").arg("-a").arg(&socket).arg("-s")).success();
        let pid = out
            .stdout
            .split(';')
            .find_map(|part| part.trim().strip_prefix("SSH_AGENT_PID="))
            .expect("ssh-agent prints its pid")
            .to_string();
        Self { pid, socket }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

/// `ssh-add` and the shared libraries it needs, flat in `dir`, run through the copied loader.
fn copy_ssh_add(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/usr/bin/ssh-add", dir.join("ssh-add")).unwrap();
    let ldd = run(Command::new("ldd").arg("/usr/bin/ssh-add")).success();
    let mut loader = None;
    for line in ldd.stdout.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::copy(path, dir.join(&name)).unwrap();
        if name.starts_with("ld-linux") {
            loader = Some(name);
        }
    }
    let loader = loader.expect("ssh-add has a dynamic loader");
    format!("/opt/ssh/{loader} --library-path /opt/ssh /opt/ssh/ssh-add")
}

#[test]
fn ssh_agent_is_forwarded_into_run() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let agent = Agent::start(work.path());
    let key = work.path().join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test-key", "-f"])
        .arg(&key))
    .success();
    run(Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &agent.socket))
    .success();
    let fingerprint = run(Command::new("ssh-keygen").arg("-lf").arg(&key))
        .success()
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("fingerprint")
        .to_string();
    let ssh_add = copy_ssh_add(&context.join("ssh"));
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\n\
             COPY ssh/ /opt/ssh/\n\
             RUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" \
                 && test \"$SSH_AUTH_SOCK\" = /run/buildkit/ssh_agent.0 \
                 && {ssh_add} -l | grep -q '{fingerprint}'\n\
             RUN --mount=type=ssh,id=work,target=/tmp/agent,mode=0666 \
                 test \"$(stat -c %a /tmp/agent)\" = 666 && {ssh_add} -l | grep -q kiln-test-key\n"
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let built = build(
        &socket,
        &context,
        &[
            "--ssh",
            "default",
            "--ssh",
            &format!("work={}", agent.socket.display()),
        ],
        &[("SSH_AUTH_SOCK", agent.socket.to_str().unwrap())],
    );
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );

    // An agent socket that does not exist fails before the build.
    let gone = work.path().join("gone.sock");
    let built = build(
        &socket,
        &context,
        &["--ssh", &format!("default={}", gone.display())],
        &[],
    );
    assert_ne!(built.code, 0);
    assert!(
        built.stderr.contains("failed to stat agent socket"),
        "{}",
        built.stderr
    );

    // A required agent the client does not forward fails naming it.
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN --mount=type=ssh,id=deploy,required true\n"),
    )
    .unwrap();
    let built = build(&socket, &context, &[], &[]);
    assert_ne!(built.code, 0);
    assert!(
        built.stderr.contains("no ssh agent \"deploy\" forwarded"),
        "{}",
        built.stderr
    );
}

/// The containerd worker shares the OCI worker's executor: the same mounts work there.
#[test]
fn containerd_worker_mounts_secrets_and_agents() {
    if !kiln_testkit::containerd_available() {
        eprintln!("containerd is not running; skipped");
        return;
    }
    let namespace = Namespace(format!("kiln-secrets-e2e-{}", std::process::id()));
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    let value = random_value("kiln-ctrd-secret");
    let secret_file = work.path().join("secret.txt");
    std::fs::write(&secret_file, &value).unwrap();
    let agent = Agent::start(work.path());
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\n\
             RUN --mount=type=secret,id=s --mount=type=ssh \
                 test \"$(sha256sum < /run/secrets/s | cut -d' ' -f1)\" = {sum} \
                 && test -S \"$SSH_AUTH_SOCK\" && echo ok > /ok\n",
            sum = sha256_hex(value.as_bytes()),
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(
        &socket,
        &[
            "--oci-worker=false",
            "--containerd-worker=true",
            "--containerd-worker-namespace",
            &namespace.0,
        ],
    );
    let dest = work.path().join("image.tar");
    let built = build(
        &socket,
        &context,
        &[
            "--secret",
            &format!("id=s,src={}", secret_file.display()),
            "--ssh",
            &format!("default={}", agent.socket.display()),
            "-o",
            &format!("type=docker,dest={}", dest.display()),
        ],
        &[],
    );
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&dest)
        .arg("-C")
        .arg(&unpacked))
    .success();
    let entries = layer_entries(&unpacked);
    assert!(entries.iter().any(|e| e.ends_with("ok")), "{entries:?}");
    assert!(
        !entries
            .iter()
            .any(|e| e.contains("run/secrets") || e.contains("ssh_agent")),
        "{entries:?}"
    );
    assert_eq!(
        files_holding(&unpacked, value.as_bytes()),
        Vec::<PathBuf>::new()
    );
}

/// `kiln compose build` turns `build.secrets` + top-level `secrets:` (file and environment)
/// into `--secret`s the build's `RUN` can read.
#[test]
fn compose_build_secrets_reach_run() {
    let namespace = Namespace(format!("kiln-secrets-compose-{}", std::process::id()));
    let work = tempfile::tempdir().unwrap();
    let project = work.path().join("proj");
    let app = project.join("app");
    std::fs::create_dir_all(&app).unwrap();
    let file_value = random_value("kiln-compose-file");
    let env_value = random_value("kiln-compose-env");
    std::fs::write(app.join("token.txt"), &file_value).unwrap();
    std::fs::write(
        app.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\n\
             RUN --mount=type=secret,id=token --mount=type=secret,id=npmrc \
                 test \"$(sha256sum < /run/secrets/token | cut -d' ' -f1)\" = {file_sum} \
                 && test \"$(sha256sum < /run/secrets/npmrc | cut -d' ' -f1)\" = {env_sum} \
                 && echo ok > /ok\n",
            file_sum = sha256_hex(file_value.as_bytes()),
            env_sum = sha256_hex(env_value.as_bytes()),
        ),
    )
    .unwrap();
    std::fs::write(
        project.join("compose.yaml"),
        "services:\n  app:\n    image: 127.0.0.1:5000/kilntest/compose-secrets:1\n    build:\n      context: app\n      secrets:\n        - token\n        - source: npm\n          target: npmrc\n\
         secrets:\n  token:\n    file: ./token.txt\n  npm:\n    environment: KILN_TEST_NPM\n",
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let out = run(Command::new(cargo_bin("kiln"))
        .args(["--namespace", &namespace.0, "compose", "build"])
        .args(["--buildkit-host", &socket, "--progress=plain"])
        .env("KILN_TEST_NPM", &env_value)
        .current_dir(&project));
    assert_eq!(out.code, 0, "{}\nkilnd:\n{}", out.stderr, daemon.log_text());
    let images = run(Command::new("ctr").args(["-n", &namespace.0, "images", "ls", "-q"]))
        .success()
        .stdout;
    assert!(
        images.contains("127.0.0.1:5000/kilntest/compose-secrets:1"),
        "{images}"
    );
}
