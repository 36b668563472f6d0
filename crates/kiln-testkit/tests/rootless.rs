//! Rootless kilnd (issue 7): an unprivileged user created for the test runs
//! `rootlesskit … kilnd` with no `--addr`/`--root`, so kilnd's rootless
//! defaults put the socket at `$XDG_RUNTIME_DIR/buildkit/buildkitd.sock`;
//! `kiln build` as that user, with no `--buildkit-host`, finds it, `RUN`
//! sees uid 0, and the exported layers carry whiteouts, opaque directories
//! and owners as inside the user namespace. Runs once with the snapshotter
//! kilnd picks itself (overlayfs in the user namespace, or `native` where
//! overlay cannot be mounted) and once with `native` forced.
//!
//! The second test does the same with the containerd worker: `kiln setup
//! install-containerd-rootless --start` runs containerd under RootlessKit as
//! the user, `install-buildkit-containerd` runs kilnd inside its namespaces,
//! and the image lands in that containerd.
//!
//! Needs root (to create the user), `rootlesskit` and `newuidmap`/`newgidmap`
//! (Debian's `rootlesskit` and `uidmap`), `containerd` for the second test,
//! and the registry at 127.0.0.1:5000.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{cargo_bin, run, Output, BUSYBOX};

fn in_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// The test user, its files and its processes; everything removed on drop,
/// also when the test fails.
struct TestUser {
    name: String,
    /// World-traversable temp dir: binaries, runtime dir, build context.
    dir: PathBuf,
    /// `rootlesskit … kilnd` (through runuser), when running.
    daemon: Option<Child>,
}

impl TestUser {
    /// A new user `<prefix>-<random>` (tests running at once use distinct prefixes).
    fn create(prefix: &str) -> Self {
        let name = format!("{prefix}-{:08x}", rand_u32());
        let dir = std::env::temp_dir().join(&name);
        let user = Self {
            name: name.clone(),
            dir: dir.clone(),
            daemon: None,
        };
        run(Command::new("useradd").args(["-m", "-s", "/bin/sh", &name])).success();
        // useradd gives subordinate ids on most systems (SUB_UID_COUNT); add a
        // range where it did not.
        let has_range = |file: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with(&format!("{name}:")))
        };
        if !has_range("/etc/subuid") || !has_range("/etc/subgid") {
            let base = 300_000 + (rand_u32() % 1000) * 65_536;
            let range = format!("{base}-{}", base + 65_535);
            run(Command::new("usermod").args([
                "--add-subuids",
                &range,
                "--add-subgids",
                &range,
                &name,
            ]))
            .success();
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // /work (and target/) may not be traversable by others: copy the binaries.
        for bin in ["kiln", "kilnd"] {
            let to = dir.join(bin);
            std::fs::copy(cargo_bin(bin), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for owned in ["run", "ctx"] {
            let path = dir.join(owned);
            std::fs::create_dir(&path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
            run(Command::new("chown").arg(&name).arg(&path)).success();
        }
        user
    }

    fn home(&self) -> String {
        format!("/home/{}", self.name)
    }

    fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// `argv` as the user, with a login-like environment and nothing else.
    fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", &self.name, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home()))
            .arg(format!("USER={}", self.name))
            .arg(format!("LOGNAME={}", self.name))
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime_dir().display()))
            .args(argv)
            .current_dir(&self.dir);
        command
    }

    /// Starts `rootlesskit … kilnd <extra>` and waits for the default socket.
    fn start_kilnd(&mut self, extra: &[&str], log: &Path) -> PathBuf {
        let kilnd = self.dir.join("kilnd").display().to_string();
        let state = format!("--state-dir={}/rootlesskit", self.runtime_dir().display());
        let mut argv = vec![
            "rootlesskit",
            "--net=host",
            "--copy-up=/etc",
            "--copy-up=/run",
            "--disable-host-loopback",
            &state,
            &kilnd,
        ];
        argv.extend_from_slice(extra);
        let child = self
            .command(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let socket = self.runtime_dir().join("buildkit/buildkitd.sock");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "rootless kilnd exited ({status}):\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "rootless kilnd did not listen on {} in 60s:\n{}",
                socket.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        socket
    }

    /// Stops the daemon: SIGTERM through runuser and RootlessKit, then
    /// SIGKILL to every process left of this user (by pid).
    fn stop_kilnd(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            self.kill_leftovers();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill_leftovers(&self) {
        let pids = run(Command::new("pgrep").args(["-u", &self.name])).stdout;
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: plain kill(2) of a process of the test's own user.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// `kiln build` as the user, discovery only (no --buildkit-host).
    fn build(&self, output: &str) -> Output {
        let kiln = self.dir.join("kiln").display().to_string();
        let context = self.dir.join("ctx").display().to_string();
        run(&mut self.command(&[&kiln, "build", "--progress=plain", "-o", output, &context]))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        self.stop_kilnd();
        self.kill_leftovers();
        // The state of rootless kilnd lives in the home directory, removed with the user.
        let out = run(Command::new("userdel").args(["-r", "-f", &self.name]));
        if out.code != 0 {
            eprintln!("userdel {}: {}", self.name, out.stderr);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` without ANSI colour sequences (kilnd's text log is coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    let file = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut &file, &mut bytes).unwrap();
    u32::from_ne_bytes(bytes)
}

/// `tar -tvz` listing (numeric owners) of every layer of the single
/// manifest in an OCI layout tar, bottom to top.
fn layer_listings(oci_tar: &Path, scratch: &Path) -> Vec<String> {
    std::fs::create_dir_all(scratch).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(oci_tar)
        .arg("-C")
        .arg(scratch))
    .success();
    let blob = |digest: &str| {
        scratch
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scratch.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            run(Command::new("tar")
                .args(["--numeric-owner", "-tvzf"])
                .arg(blob(layer["digest"].as_str().unwrap())))
            .success()
            .stdout
        })
        .collect()
}

/// The label `org.mobyproject.buildkit.worker.snapshotter` as `kiln builder info` shows it.
fn snapshotter_label(user: &TestUser) -> String {
    let kiln = user.dir.join("kiln").display().to_string();
    let info = run(&mut user.command(&[&kiln, "builder", "info"]));
    info.stdout
        .lines()
        .chain(info.stderr.lines())
        .find_map(|l| {
            l.trim()
                .strip_prefix("org.mobyproject.buildkit.worker.snapshotter=")
        })
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no snapshotter label in:\n{}{}", info.stdout, info.stderr))
}

fn check_build(user: &TestUser, round: &str) {
    let dest = user.dir.join("ctx").join(format!("out-{round}"));
    user.build(&format!("type=local,dest={}", dest.display()))
        .success();
    assert_eq!(
        std::fs::read_to_string(dest.join("uid")).unwrap(),
        "0\n",
        "RUN runs as uid 0 inside the user namespace"
    );
    assert!(!dest.join("bin/ls").exists(), "removed in the build");
    assert!(!dest.join("d/old").exists(), "removed with its directory");
    assert!(dest.join("d/n").exists());

    let tar = user.dir.join("ctx").join(format!("image-{round}.tar"));
    user.build(&format!("type=oci,dest={}", tar.display()))
        .success();
    let layers = layer_listings(&tar, &user.dir.join(format!("layout-{round}")));
    assert_eq!(layers.len(), 3, "base + two RUN layers: {layers:?}");
    let uid_layer = &layers[1];
    assert!(
        uid_layer
            .lines()
            .any(|l| l.contains(" 0/0 ") && l.ends_with(" uid")),
        "/uid owned by 0:0 in the image:\n{uid_layer}"
    );
    let changes = &layers[2];
    for expected in ["bin/.wh.ls", ".wh.root"] {
        assert!(
            changes.lines().any(|l| l.ends_with(expected)),
            "{expected} in the layer:\n{changes}"
        );
    }
    // The replaced directory hides its old content: opaque (overlayfs), or a whiteout per old
    // entry (native, when the new directory got the old inode number back).
    assert!(
        changes
            .lines()
            .any(|l| l.ends_with("d/.wh..wh..opq") || l.ends_with("d/.wh.old")),
        "d/ hides its old content:\n{changes}"
    );
    assert!(
        changes
            .lines()
            .any(|l| l.contains(" 1/2 ") && l.ends_with("d/n")),
        "chown inside the user namespace is kept in the layer:\n{changes}"
    );
}

#[test]
fn rootless_kilnd_builds_as_an_unprivileged_user() {
    for tool in ["rootlesskit", "newuidmap", "newgidmap"] {
        if !in_path(tool) {
            eprintln!("skipped: {tool} is not installed (Debian packages rootlesskit and uidmap)");
            return;
        }
    }
    let kernel = run(Command::new("uname").arg("-r")).stdout;
    eprintln!("kernel {}", kernel.trim());

    let mut user = TestUser::create("kilntest");
    std::fs::write(
        user.dir.join("ctx/Dockerfile"),
        format!(
            "FROM {BUSYBOX}\n\
             RUN id -u > /uid && mkdir /d && touch /d/old\n\
             RUN rm -rf /root /bin/ls && rm -rf /d && mkdir /d && echo n > /d/n && chown 1:2 /d/n\n"
        ),
    )
    .unwrap();
    run(Command::new("chown")
        .arg(&user.name)
        .arg(user.dir.join("ctx/Dockerfile")))
    .success();

    // 1. No flags: the rootless defaults and the snapshotter kilnd picks.
    let log = user.dir.join("kilnd-auto.log");
    let socket = user.start_kilnd(&[], &log);
    assert_eq!(socket, user.runtime_dir().join("buildkit/buildkitd.sock"));
    let mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o1700, "socket dir 0700 + sticky");
    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    let root = format!("{}/.local/share/buildkit", user.home());
    assert!(text.contains(&root), "root defaults to {root}:\n{text}");
    let chosen = snapshotter_label(&user);
    eprintln!("snapshotter chosen: {chosen}");
    assert!(
        text.contains(&format!("snapshotter=\"{chosen}\"")),
        "the log reports the snapshotter of the label ({chosen}):\n{text}"
    );
    assert!(chosen == "overlayfs" || chosen == "native", "{chosen}");
    check_build(&user, "auto");
    user.stop_kilnd();

    // 2. The native snapshotter (what kilnd falls back to without overlay).
    let log = user.dir.join("kilnd-native.log");
    let native_root = format!("--root={}/.local/share/buildkit-native", user.home());
    user.start_kilnd(&["--oci-worker-snapshotter=native", &native_root], &log);
    assert_eq!(snapshotter_label(&user), "native");
    check_build(&user, "native");
    user.stop_kilnd();

    // 3. `kiln setup install-buildkit --start` as the user: without a user systemd it writes
    //    the unit and starts the daemon command itself; the build finds that daemon.
    let kiln = user.dir.join("kiln").display().to_string();
    let setup = run(&mut user.command(&[&kiln, "setup", "install-buildkit", "--start"]));
    eprintln!("kiln setup install-buildkit --start:\n{}", setup.stderr);
    let setup = setup.success();
    let socket = user.runtime_dir().join("buildkit/buildkitd.sock");
    assert!(
        setup.stderr.contains("Started kilnd") || setup.stderr.contains("Installed"),
        "{}",
        setup.stderr
    );
    assert!(
        setup.stderr.contains(&socket.display().to_string()),
        "listens on the default socket:\n{}",
        setup.stderr
    );
    let unit = format!("{}/.config/systemd/user/buildkit.service", user.home());
    let unit = std::fs::read_to_string(&unit).unwrap();
    assert!(unit.contains("rootlesskit --net=host"), "{unit}");
    check_build(&user, "setup");
    // The detached daemon is no child of ours: stopped with the user's other processes on drop.
}

/// The pids of the user's processes whose command line contains `needle`.
fn user_processes(user: &TestUser, needle: &str) -> Vec<String> {
    run(Command::new("pgrep").args(["-a", "-u", &user.name]))
        .stdout
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn rootless_containerd_worker_builds_into_the_users_containerd() {
    for tool in ["rootlesskit", "newuidmap", "newgidmap", "containerd"] {
        if !in_path(tool) {
            eprintln!("skipped: {tool} is not installed (Debian packages rootlesskit, uidmap, containerd)");
            return;
        }
    }
    let user = TestUser::create("kilntest-ctrd");
    let kiln = user.dir.join("kiln").display().to_string();
    std::fs::write(
        user.dir.join("ctx/Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN id -u > /uid\n"),
    )
    .unwrap();
    run(Command::new("chown")
        .arg(&user.name)
        .arg(user.dir.join("ctx/Dockerfile")))
    .success();

    // 1. Rootless containerd, started without systemd.
    let setup = run(&mut user.command(&[&kiln, "setup", "install-containerd-rootless", "--start"]));
    eprintln!("install-containerd-rootless:\n{}", setup.stderr);
    let setup = setup.success();
    let containerd_socket = user.runtime_dir().join("containerd/containerd.sock");
    assert!(
        setup.stderr.contains("Started containerd"),
        "{}",
        setup.stderr
    );
    assert!(containerd_socket.exists());
    let config = format!("{}/.config/containerd/config.toml", user.home());
    let config = std::fs::read_to_string(config).unwrap();
    assert!(config.contains("io.containerd.grpc.v1.cri"), "{config}");
    let unit = format!("{}/.config/systemd/user/containerd.service", user.home());
    let unit = std::fs::read_to_string(unit).unwrap();
    assert!(unit.contains("containerd-rootless-child"), "{unit}");
    // containerd runs as the user, as root of a user namespace.
    let pid =
        std::fs::read_to_string(user.runtime_dir().join("containerd-rootless/child_pid")).unwrap();
    let uid_map = std::fs::read_to_string(format!("/proc/{}/uid_map", pid.trim())).unwrap();
    let uid = run(Command::new("id").args(["-u", &user.name])).stdout;
    assert!(
        uid_map
            .lines()
            .next()
            .is_some_and(|l| l.split_whitespace().collect::<Vec<_>>() == ["0", uid.trim(), "1"]),
        "uid 0 of containerd's namespace is the user:\n{uid_map}"
    );

    // 2. kilnd with the containerd worker in containerd's namespaces, namespace `test`.
    let setup = run(&mut user.command(&[
        "CONTAINERD_NAMESPACE=test",
        &kiln,
        "setup",
        "install-buildkit-containerd",
        "--start",
    ]));
    eprintln!("install-buildkit-containerd:\n{}", setup.stderr);
    let setup = setup.success();
    let kilnd_socket = user.runtime_dir().join("buildkit-test/buildkitd.sock");
    assert!(
        setup.stderr.contains(&kilnd_socket.display().to_string()),
        "{}",
        setup.stderr
    );
    let snapshotter = if setup.stderr.contains("containerd's overlayfs snapshotter") {
        "overlayfs"
    } else {
        assert!(
            setup.stderr.contains("containerd's native snapshotter"),
            "{}",
            setup.stderr
        );
        "native"
    };
    eprintln!("snapshotter: {snapshotter}");

    // 3. A build as the user, discovery only; the image lands in the user's containerd.
    let image = format!("127.0.0.1:5000/kiln-rootless-ctrd:{:08x}", rand_u32());
    let context = user.dir.join("ctx").display().to_string();
    let built = run(&mut user.command(&[
        "CONTAINERD_NAMESPACE=test",
        &kiln,
        "build",
        "--progress=plain",
        "-t",
        &image,
        &context,
    ]));
    eprintln!("kiln build:\n{}", built.stderr);
    built.success();
    let socket = containerd_socket.display().to_string();
    let images =
        run(&mut user.command(&["ctr", "-a", &socket, "-n", "test", "images", "ls", "-q"]))
            .success()
            .stdout;
    assert!(
        images.lines().any(|l| l == image),
        "{image} in namespace test:\n{images}"
    );
    let elsewhere =
        run(&mut user.command(&["ctr", "-a", &socket, "-n", "default", "images", "ls", "-q"]))
            .success()
            .stdout;
    assert!(!elsewhere.contains(&image), "not in namespace default");

    // /uid of the image, read through the user's containerd (mounted in its namespaces).
    let dest = user.dir.join("ctx/out");
    let exported = run(&mut user.command(&[
        "CONTAINERD_NAMESPACE=test",
        &kiln,
        "build",
        "--progress=plain",
        "-o",
        &format!("type=local,dest={}", dest.display()),
        &context,
    ]));
    exported.success();
    assert_eq!(
        std::fs::read_to_string(dest.join("uid")).unwrap(),
        "0\n",
        "RUN sees uid 0 inside the user namespace"
    );

    // 4. Uninstall stops both daemons.
    for (what, env) in [
        ("uninstall-buildkit-containerd", "CONTAINERD_NAMESPACE=test"),
        ("uninstall-containerd-rootless", "CONTAINERD_NAMESPACE=test"),
    ] {
        let out = run(&mut user.command(&[env, &kiln, "setup", what])).success();
        eprintln!("{what}:\n{}", out.stderr);
        assert!(out.stderr.contains("Stopped"), "{what}: {}", out.stderr);
    }
    for needle in ["rootlesskit", "containerd", "kilnd"] {
        let left = user_processes(&user, needle);
        assert!(left.is_empty(), "{needle} still running: {left:?}");
    }
    assert!(
        !containerd_socket.exists()
            || std::os::unix::net::UnixStream::connect(&containerd_socket).is_err()
    );
}
