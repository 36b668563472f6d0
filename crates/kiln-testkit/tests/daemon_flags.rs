//! kilnd under a service manager: readiness notification (`NOTIFY_SOCKET`),
//! socket activation (`fd://`), `--group`, `--debugaddr` and `--log-format`.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_testkit::{cargo_bin, free_port, run};

fn terminate(child: &mut Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = child.wait();
}

fn http_get(port: u16, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn notify_socket_gets_ready_after_the_listeners_and_stopping() {
    let work = tempfile::tempdir().unwrap();
    let notify_path = work.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let socket = work.path().join("run/kilnd.sock");
    let log = std::fs::File::create(work.path().join("kilnd.log")).unwrap();
    let debug_port = free_port();
    let mut child = Command::new(cargo_bin("kilnd"))
        .arg("--root")
        .arg(work.path().join("root"))
        .arg("--config")
        .arg(work.path().join("absent.toml"))
        .arg(format!("--addr=unix://{}", socket.display()))
        .args(["--group", "12345", "--log-format", "json"])
        .arg(format!("--debugaddr=127.0.0.1:{debug_port}"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    // An explicit --config that does not exist is an error: kilnd exits.
    let status = child.wait().unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(work.path().join("kilnd.log")).unwrap();
    assert!(text.contains("failed to read config"), "{text}");

    std::fs::write(work.path().join("absent.toml"), "").unwrap();
    let log = std::fs::File::create(work.path().join("kilnd.log")).unwrap();
    let mut child = Command::new(cargo_bin("kilnd"))
        .arg("--root")
        .arg(work.path().join("root"))
        .arg("--config")
        .arg(work.path().join("absent.toml"))
        .arg(format!("--addr=unix://{}", socket.display()))
        .args(["--group", "12345", "--log-format", "json"])
        .arg(format!("--debugaddr=127.0.0.1:{debug_port}"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut buffer = [0u8; 64];
    let n = notify.recv(&mut buffer).expect("READY=1 within 60s");
    assert_eq!(&buffer[..n], b"READY=1");
    // Ready means listening: the socket accepts at once, with buildkitd's
    // mode and the --group owner.
    std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 12345);
    // The debug listener answers.
    let health = http_get(debug_port, "/debug/health");
    assert!(
        health.starts_with("HTTP/1.1 200 OK") && health.ends_with("ok\n"),
        "{health}"
    );
    let vars = http_get(debug_port, "/debug/vars");
    assert!(vars.contains("\"worker\":"), "{vars}");

    terminate(&mut child);
    let n = notify.recv(&mut buffer).expect("STOPPING=1");
    assert_eq!(&buffer[..n], b"STOPPING=1");
    // --log-format json: every log line is a JSON object.
    let text = std::fs::read_to_string(work.path().join("kilnd.log")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(value.get("level").is_some(), "{line}");
    }
}

/// Spawns kilnd as a socket unit would, with `listener` as fd 3.
fn spawn_activated(listener: &impl std::os::fd::AsRawFd, root: &Path, log: &Path) -> Child {
    let argv: Vec<String> = vec![
        cargo_bin("kilnd").display().to_string(),
        "--root".into(),
        root.display().to_string(),
        "--config".into(),
        "/dev/null".into(),
        "--addr".into(),
        "fd://".into(),
    ];
    kiln_testkit::spawn_socket_activated(listener, &argv, log)
}

#[test]
fn fd_socket_activation_serves_the_passed_listener() {
    let work = tempfile::tempdir().unwrap();
    let socket = work.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let log = work.path().join("kilnd.log");
    let mut child = spawn_activated(&listener, &work.path().join("root"), &log);
    drop(listener);
    // The daemon answers ListWorkers on the socket it was given.
    let address = format!("unix://{}", socket.display());
    let mut answered = None;
    for _ in 0..300 {
        let out = run(Command::new(cargo_bin("kiln")).args([
            "builder",
            "du",
            "--buildkit-host",
            &address,
        ]));
        if out.code == 0 {
            answered = Some(out);
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "kilnd exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let answered = answered.unwrap_or_else(|| {
        panic!(
            "no answer on fd://: {}",
            std::fs::read_to_string(&log).unwrap()
        )
    });
    assert!(answered.stdout.contains("Total"), "{}", answered.stdout);
    terminate(&mut child);
    // The socket file belongs to the service manager: left in place.
    assert!(socket.exists());

    // Without LISTEN_PID naming it, fd:// is refused clearly.
    let out = run(Command::new(cargo_bin("kilnd")).args([
        "--root",
        work.path().join("root2").to_str().unwrap(),
        "--config",
        "/dev/null",
        "--addr",
        "fd://",
    ]));
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("fd://: no socket was passed to this process"),
        "{}",
        out.stderr
    );
}
