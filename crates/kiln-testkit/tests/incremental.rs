//! Incremental context and persistent cache, end to end (issue 4): a 20 000-file context built
//! twice moves no file content the second time; touching files (mtime only), or changing a file
//! no step reads, keeps every step cached; changing one copied file re-runs exactly the steps
//! after its `COPY`, and the miss explanation names the file; a restarted kilnd still has the
//! cache. A cache mount keeps its files across builds and restarts; `--no-cache-filter` re-runs
//! the named stage only.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

const FILES: usize = 20_000;

/// The `#N [k/m] …` steps of plain progress: (title, cached, miss explanation).
fn steps(plain: &str) -> Vec<(String, bool, Option<String>)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in plain.lines() {
        let Some((id, rest)) = line.split_once(' ') else {
            continue;
        };
        if id.starts_with('#')
            && rest.starts_with('[')
            && !rest.starts_with("[internal]")
            && !out.iter().any(|(seen, _)| seen == id)
        {
            out.push((id.to_string(), rest.to_string()));
        }
    }
    out.into_iter()
        .map(|(id, title)| {
            let cached = plain.lines().any(|l| l == format!("{id} CACHED"));
            let miss = plain.lines().find_map(|l| {
                let rest = l.strip_prefix(&format!("{id} "))?;
                let (_, reason) = rest.split_once("kiln: cache miss: ")?;
                Some(reason.to_string())
            });
            (title, cached, miss)
        })
        .collect()
}

/// The bytes the daemon reported for `transferring context: NB` of the build context (the
/// last such line: the Dockerfile and .dockerignore transfers come first; a size is
/// printed only when it is not zero).
fn context_bytes(plain: &str) -> u64 {
    let line = plain
        .lines()
        .rfind(|l| l.contains("transferring context: ") && l.ends_with(" done"))
        .unwrap_or_else(|| panic!("no context transfer line in:\n{plain}"));
    // `transferring context: [SIZE] [ELAPSEDs] done`: no size when nothing moved.
    let first = line
        .split("transferring context: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("done");
    if first == "done" || first.ends_with('s') {
        0
    } else {
        parse_size(first)
    }
}

/// `0B`, `6B`, `1.5kB`, `2.10MB` (the progress renderer's units).
fn parse_size(text: &str) -> u64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("size {text:?}"));
    let scale = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("unit {other:?} in {text:?}"),
    };
    (number * scale) as u64
}

fn write_context(context: &Path) {
    std::fs::create_dir_all(context.join("app")).unwrap();
    for dir in 0..100 {
        let dir_path = context.join(format!("tree/d{dir:03}"));
        std::fs::create_dir_all(&dir_path).unwrap();
        for file in 0..FILES / 100 {
            std::fs::write(
                dir_path.join(format!("f{file:03}")),
                format!("{dir}-{file}\n"),
            )
            .unwrap();
        }
    }
    std::fs::write(context.join("app/main.txt"), "one\n").unwrap();
    std::fs::write(context.join("app/other.txt"), "other\n").unwrap();
    std::fs::write(context.join("unrelated.txt"), "not copied\n").unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\n\
             COPY tree/ /tree/\n\
             RUN find /tree -type f | wc -l > /count\n\
             COPY app/ /app/\n\
             RUN cat /app/main.txt /count > /out\n"
        ),
    )
    .unwrap();
}

fn touch(path: &Path) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    file.set_modified(later).unwrap();
}

#[test]
fn incremental_context_and_cache_that_survives_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    write_context(&context);
    let root = work.path().join("root");
    let config = work.path().join("buildkitd.toml");
    std::fs::write(&config, "[registry.\"127.0.0.1:5000\"]\nhttp = true\n").unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let mut daemon = Kilnd::start_in(&root, &config, &socket, &[]);
    let dest = work.path().join("image.tar");
    let build = |daemon: &Kilnd| {
        let built = run(Command::new(cargo_bin("kiln"))
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=docker,dest={}", dest.display()))
            .arg(&context));
        assert_eq!(
            built.code,
            0,
            "{}\nkilnd:\n{}",
            built.stderr,
            daemon.log_text()
        );
        built.stderr
    };

    let first = build(&daemon);
    let expected_bytes: u64 = (0..100)
        .flat_map(|d| (0..FILES / 100).map(move |f| format!("{d}-{f}\n").len() as u64))
        .sum();
    assert!(
        context_bytes(&first) >= expected_bytes,
        "the first build sends every file:\n{first}"
    );
    let titles: Vec<String> = steps(&first).into_iter().map(|(t, _, _)| t).collect();
    assert_eq!(titles.len(), 5, "{first}");

    // Unchanged: nothing runs, no file content moves.
    let second = build(&daemon);
    assert_eq!(context_bytes(&second), 0, "{second}");
    assert!(
        steps(&second).iter().all(|(_, cached, _)| *cached),
        "{second}"
    );

    // mtime only, on a copied file and an unrelated one: still all cached.
    touch(&context.join("tree/d007/f042"));
    touch(&context.join("unrelated.txt"));
    let touched = build(&daemon);
    assert!(
        steps(&touched).iter().all(|(_, cached, _)| *cached),
        "{touched}"
    );
    assert!(
        context_bytes(&touched) <= 64,
        "only the touched files may be re-read:\n{touched}"
    );

    // A file no step reads changes: every step is still cached, and only that file moves.
    std::fs::write(context.join("unrelated.txt"), "changed, still not copied\n").unwrap();
    let unrelated = build(&daemon);
    assert!(
        steps(&unrelated).iter().all(|(_, cached, _)| *cached),
        "{unrelated}"
    );
    assert!(
        context_bytes(&unrelated) <= 64,
        "only the changed file may cross:\n{unrelated}"
    );

    // One copied file changes: the steps from its COPY on run, and the reason names it.
    std::fs::write(context.join("app/main.txt"), "two\n").unwrap();
    let changed = build(&daemon);
    let result = steps(&changed);
    let cached: Vec<bool> = result.iter().map(|(_, c, _)| *c).collect();
    assert_eq!(cached, vec![true, true, true, false, false], "{changed}");
    assert_eq!(
        result[3].2.as_deref(),
        Some("file changed: app/main.txt"),
        "{changed}"
    );
    assert!(
        context_bytes(&changed) <= 64,
        "only the changed file crosses:\n{changed}"
    );

    // A restarted daemon keeps the cache.
    daemon.stop();
    let daemon = Kilnd::start_in(&root, &config, &socket, &[]);
    let restarted = build(&daemon);
    assert!(
        steps(&restarted).iter().all(|(_, cached, _)| *cached),
        "{restarted}"
    );
    assert_eq!(context_bytes(&restarted), 0, "{restarted}");
}

/// Builds `context` on `socket` with plain progress and `extra` flags, exporting the
/// filesystem as a tar to `dest`; returns the progress output.
fn build_to_tar(
    socket: &str,
    context: &Path,
    dest: &Path,
    extra: &[&str],
    daemon: &Kilnd,
) -> String {
    let built = run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", socket])
        .args(extra)
        .arg("-o")
        .arg(format!("type=tar,dest={}", dest.display()))
        .arg(context));
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    built.stderr
}

/// The content of `path` in the filesystem tar `tar`, if it holds it.
fn file_in_tar(tar: &Path, path: &str) -> Option<String> {
    let mut archive = tar::Archive::new(std::fs::File::open(tar).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if name.trim_start_matches("./").trim_start_matches('/') == path.trim_start_matches('/') {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            return Some(text);
        }
    }
    None
}

#[test]
fn a_cache_mount_persists_between_builds_and_restarts() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    let config = work.path().join("buildkitd.toml");
    std::fs::write(&config, "[registry.\"127.0.0.1:5000\"]\nhttp = true\n").unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let mut daemon = Kilnd::start_in(&root, &config, &socket, &[]);
    let dest = work.path().join("fs.tar");
    // Each build appends its name to the cache mount's log and copies the log into the image;
    // the steps differ, so none is a cache hit.
    let build = |daemon: &Kilnd, name: &str| {
        let context = work.path().join(name);
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {BUSYBOX}\n\
                 RUN --mount=type=cache,id=kiln-test-persist,target=/var/cache/t \
                     echo {name} >> /var/cache/t/log && cp /var/cache/t/log /log\n"
            ),
        )
        .unwrap();
        build_to_tar(&socket, &context, &dest, &[], daemon);
        file_in_tar(&dest, "log").expect("/log in the image")
    };
    assert_eq!(build(&daemon, "first"), "first\n");
    assert_eq!(build(&daemon, "second"), "first\nsecond\n");
    assert_eq!(
        file_in_tar(&dest, "var/cache/t/log"),
        None,
        "cache mount in a layer"
    );
    daemon.stop();
    let daemon = Kilnd::start_in(&root, &config, &socket, &[]);
    assert_eq!(build(&daemon, "third"), "first\nsecond\nthird\n");
}

#[test]
fn no_cache_filter_reruns_the_named_stage_only() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX} AS gen\n\
             RUN cat /proc/sys/kernel/random/uuid > /id\n\
             FROM {BUSYBOX}\n\
             RUN echo final > /final\n\
             COPY --from=gen /id /id\n"
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let dest = work.path().join("fs.tar");
    build_to_tar(&socket, &context, &dest, &[], &daemon);
    let again = build_to_tar(&socket, &context, &dest, &[], &daemon);
    assert!(
        steps(&again).iter().all(|(_, cached, _)| *cached),
        "{again}"
    );

    let filtered = build_to_tar(
        &socket,
        &context,
        &dest,
        &["--no-cache-filter", "gen"],
        &daemon,
    );
    let result = steps(&filtered);
    let gen_run = result
        .iter()
        .find(|(title, _, _)| title.starts_with("[gen 2/2] RUN"))
        .unwrap_or_else(|| panic!("no gen RUN step in:\n{filtered}"));
    assert!(!gen_run.1, "the named stage's RUN was cached:\n{filtered}");
    assert_eq!(gen_run.2.as_deref(), Some("cache disabled"), "{filtered}");
    let final_run = result
        .iter()
        .find(|(title, _, _)| title.contains("RUN echo final"))
        .unwrap_or_else(|| panic!("no final RUN step in:\n{filtered}"));
    assert!(final_run.1, "a step of another stage re-ran:\n{filtered}");
}
