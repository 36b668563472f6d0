//! `kiln setup`: the rootful containerd-worker install written under a
//! prefix, its `buildkitd.toml` loaded by kilnd and its `ExecStart` line
//! run (socket-activated, with `--root` overridden); re-running updates,
//! uninstall removes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_testkit::{cargo_bin, containerd_available, run, Output};

fn setup(prefix: &Path, namespace: &str, args: &[&str]) -> Output {
    run(Command::new(cargo_bin("kiln"))
        .arg("setup")
        .args(args)
        .args(["--rootful", "--root-prefix"])
        .arg(prefix)
        .env("CONTAINERD_NAMESPACE", namespace)
        .env_remove("CONTAINERD_SNAPSHOTTER"))
}

#[test]
fn rootful_containerd_install_runs_only_the_containerd_worker() {
    if !containerd_available() {
        panic!("containerd is not running (scripts/services start)");
    }
    let work = tempfile::tempdir().unwrap();
    let prefix = work.path().join("prefix");
    let namespace = format!("kiln-setup-{}", std::process::id());

    let first = setup(&prefix, &namespace, &["install-buildkit-containerd"]).success();
    let unit_dir = prefix.join("etc/systemd/system");
    let service = unit_dir.join(format!("kilnd-{namespace}.service"));
    let socket_unit = unit_dir.join(format!("kilnd-{namespace}.socket"));
    let toml = prefix.join(format!("etc/buildkit/buildkitd-{namespace}.toml"));
    for file in [&service, &socket_unit, &toml] {
        assert!(
            first
                .stderr
                .contains(&format!("Creating {}", file.display())),
            "{}",
            first.stderr
        );
    }
    let toml_text = std::fs::read_to_string(&toml).unwrap();
    assert!(
        toml_text.contains(
            "[worker.oci]
enabled = false

[worker.containerd]
enabled = true
"
        ) && toml_text.contains(&format!("namespace = \"{namespace}\"\n")),
        "{toml_text}"
    );
    let socket_text = std::fs::read_to_string(&socket_unit).unwrap();
    assert!(
        socket_text
            .lines()
            .any(|l| l == format!("ListenStream=/run/buildkit-{namespace}/buildkitd.sock")),
        "{socket_text}"
    );

    // The service's ExecStart, run as systemd would (socket passed as fd 3),
    // with the config read from the prefix and a temporary root.
    let service_text = std::fs::read_to_string(&service).unwrap();
    assert!(service_text.lines().any(|l| l == "Type=notify"));
    let exec = service_text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let mut argv: Vec<String> = exec.split(' ').map(str::to_string).collect();
    assert_eq!(
        argv[0],
        cargo_bin("kilnd")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    );
    assert_eq!(argv[1..3], ["--addr".to_string(), "fd://".to_string()]);
    let config_at = argv.iter().position(|a| a == "--config").unwrap() + 1;
    assert_eq!(
        argv[config_at],
        format!("/etc/buildkit/buildkitd-{namespace}.toml")
    );
    argv[config_at] = toml.display().to_string();
    let root_at = argv.iter().position(|a| a == "--root").unwrap() + 1;
    assert_eq!(argv[root_at], format!("/var/lib/buildkit-{namespace}"));
    argv[root_at] = work.path().join("root").display().to_string();

    let socket = work.path().join("kilnd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let log = work.path().join("kilnd.log");
    let mut daemon = kiln_testkit::spawn_socket_activated(&listener, &argv, &log);
    drop(listener);
    let address = format!("unix://{}", socket.display());
    let mut info = None;
    for _ in 0..300 {
        let out = run(Command::new(cargo_bin("kiln")).args([
            "builder",
            "info",
            "--buildkit-host",
            &address,
        ]));
        if out.stdout.contains("Workers:") {
            info = Some(out);
            break;
        }
        if let Ok(Some(status)) = daemon.try_wait() {
            panic!(
                "kilnd exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = daemon.wait();
    let _ = run(Command::new("ctr").args(["namespaces", "rm", &namespace]));
    let info =
        info.unwrap_or_else(|| panic!("no answer: {}", std::fs::read_to_string(&log).unwrap()));
    assert!(info.stdout.contains("  [0] "), "{}", info.stdout);
    assert!(
        !info.stdout.contains("  [1] "),
        "only one worker: {}",
        info.stdout
    );
    assert!(
        info.stdout
            .contains("org.mobyproject.buildkit.worker.executor=containerd"),
        "{}",
        info.stdout
    );
    assert!(
        info.stdout.contains(&format!(
            "org.mobyproject.buildkit.worker.containerd.namespace={namespace}"
        )),
        "{}",
        info.stdout
    );

    // Re-running: unchanged files are left alone, changed ones rewritten.
    std::fs::write(&toml, "# edited\n").unwrap();
    let again = setup(&prefix, &namespace, &["install-buildkit-containerd"]).success();
    assert!(
        again
            .stderr
            .contains(&format!("Unchanged: {}", service.display())),
        "{}",
        again.stderr
    );
    assert!(
        again
            .stderr
            .contains(&format!("Updating {}", toml.display())),
        "{}",
        again.stderr
    );
    assert_eq!(std::fs::read_to_string(&toml).unwrap(), toml_text);

    let removed = setup(&prefix, &namespace, &["uninstall-buildkit-containerd"]).success();
    for file in [&service, &socket_unit, &toml] {
        assert!(!file.exists(), "{} left behind", file.display());
    }
    assert!(
        removed.stderr.contains(&format!(
            "To remove data, run: rm -rf /var/lib/buildkit-{namespace}"
        )),
        "{}",
        removed.stderr
    );
}

#[test]
fn rootless_install_refuses_root_and_rootful_oci_writes_two_units() {
    let refused = run(Command::new(cargo_bin("kiln")).args(["setup", "install-buildkit"]));
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("Refusing to install rootless kilnd as the root user"),
        "{}",
        refused.stderr
    );
    let work = tempfile::tempdir().unwrap();
    let out = setup(work.path(), "default", &["install-buildkit"]).success();
    let service = work.path().join("etc/systemd/system/kilnd.service");
    let text = std::fs::read_to_string(&service).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("ExecStart=")
            && l.ends_with(" --addr fd:// --root /var/lib/buildkit --oci-worker=true --containerd-worker=false")),
        "{text}"
    );
    assert!(work
        .path()
        .join("etc/systemd/system/kilnd.socket")
        .is_file());
    assert!(!work.path().join("etc/buildkit").exists(), "{}", out.stderr);
}
