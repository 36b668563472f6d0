//! A step's log output is limited as buildkitd limits it: 2 MiB per stream
//! (`BUILDKIT_STEP_LOG_MAX_SIZE`) and 200 KiB per second (`BUILDKIT_STEP_LOG_MAX_SPEED`). The
//! client sees the output within the limit, BuildKit's `[output clipped, log limit … reached]`
//! line, and (when the rate clipped) the last 256 KiB of the step; the build still succeeds.

use std::path::Path;
use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, Output, BUSYBOX};

/// Builds a context whose one `RUN` prints `lines` lines of 99 `a`s, then
/// `END-OF-STEP-<lines>` (a line the step's name does not contain).
fn build_loud_step(work: &Path, lines: u32, env: &[(&str, &str)]) -> Output {
    let context = work.join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {BUSYBOX}\nRUN i=0; line=$(head -c 99 /dev/zero | tr '\\0' a); \
             while [ $i -lt {lines} ]; do echo $line; i=$((i+1)); done; echo END-OF-STEP-$i\n"
        ),
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.display());
    let daemon = Kilnd::start_with_env(&socket, &[], env);
    let built = run(Command::new(cargo_bin("kiln"))
        .args(["build", "--progress=plain", "--buildkit-host", &socket])
        .arg("-o")
        .arg(format!("type=tar,dest={}", work.join("fs.tar").display()))
        .arg(&context));
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        &built.stderr[built.stderr.len().saturating_sub(2000)..],
        daemon.log_text()
    );
    built
}

#[test]
fn a_loud_step_is_clipped_at_the_log_limit() {
    let work = tempfile::tempdir().unwrap();
    // 3 MB of `a`, with the rate limit lifted so the size cap is what clips.
    let built = build_loud_step(
        work.path(),
        30_000,
        &[("BUILDKIT_STEP_LOG_MAX_SPEED", "-1")],
    );
    assert!(
        built
            .stderr
            .contains("[output clipped, log limit 2MiB reached]"),
        "no clip line"
    );
    assert!(
        !built.stderr.contains("END-OF-STEP-30000"),
        "output past the cap shown"
    );
    let shown = built.stderr.matches('a').count();
    assert!(
        (2 << 20) - 200_000 < shown && shown < (2 << 20) + 100_000,
        "{shown} bytes of output shown"
    );
}

#[test]
fn a_fast_step_is_clipped_at_the_log_rate_and_keeps_its_tail() {
    let work = tempfile::tempdir().unwrap();
    // 1.5 MB printed as fast as busybox can: far above 200 KiB/s unless the step took more
    // than 7 s.
    let built = build_loud_step(work.path(), 15_000, &[]);
    let stderr = &built.stderr;
    let clip = stderr
        .find("[output clipped, log limit 200KiB/s reached]")
        .unwrap_or_else(|| panic!("no rate clip line:\n{}", &stderr[..stderr.len().min(3000)]));
    // The end of the step is still shown, after the clip line.
    let end = stderr
        .find("END-OF-STEP-15000")
        .expect("tail of the step not shown");
    assert!(end > clip, "tail shown before the clip line");
    let shown = stderr.matches('a').count();
    assert!(
        (256 << 10) - 10_000 < shown && shown < 1_000_000,
        "{shown} bytes of output shown"
    );
}
