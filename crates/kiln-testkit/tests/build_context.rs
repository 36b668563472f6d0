//! `kiln build --build-context` (reference §1.7) end to end: a `FROM` name replaced by
//! `docker-image://`, a `COPY --from` name served from a client directory; sources kiln does
//! not serve are refused with a message naming them.

use std::process::Command;

use kiln_testkit::{cargo_bin, run, Kilnd, BUSYBOX};

#[test]
fn named_contexts_replace_images_and_serve_directories() {
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("ctx");
    let extra = work.path().join("extra");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::create_dir_all(extra.join("sub")).unwrap();
    std::fs::write(extra.join("sub/data.txt"), "from extra\n").unwrap();
    // `base` and `extra` would otherwise be Docker Hub images, which this machine cannot reach.
    std::fs::write(
        context.join("Dockerfile"),
        "FROM base\n\
         COPY --from=extra sub/data.txt /data.txt\n\
         RUN test \"$(cat /data.txt)\" = 'from extra' && echo ok > /checked\n",
    )
    .unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let dest = work.path().join("image.tar");
    let kiln = |extra_args: &[String]| {
        run(Command::new(cargo_bin("kiln"))
            .args(["build", "--progress=plain", "--buildkit-host", &socket])
            .arg("-o")
            .arg(format!("type=docker,dest={}", dest.display()))
            .args(extra_args)
            .arg(&context))
    };

    let built = kiln(&[
        "--build-context".into(),
        format!("base=docker-image://{BUSYBOX}"),
        "--build-context".into(),
        format!("extra={}", extra.display()),
    ]);
    assert_eq!(
        built.code,
        0,
        "{}\nkilnd:\n{}",
        built.stderr,
        daemon.log_text()
    );
    assert!(
        built.stderr.contains("[context extra] load from client"),
        "{}",
        built.stderr
    );
    assert!(std::fs::metadata(&dest).unwrap().len() > 0);

    // Changing the directory's file re-runs the steps that read it.
    std::fs::write(extra.join("sub/data.txt"), "changed\n").unwrap();
    let changed = kiln(&[
        "--build-context".into(),
        format!("base=docker-image://{BUSYBOX}"),
        "--build-context".into(),
        format!("extra={}", extra.display()),
    ]);
    assert_ne!(changed.code, 0, "the RUN check must now fail");
    assert!(
        changed.stderr.contains("did not complete successfully"),
        "{}",
        changed.stderr
    );

    let refused = [
        (
            vec!["--build-context".to_string(), "nokey".to_string()],
            "invalid context value: nokey, expected key=value",
        ),
        (
            vec!["--build-context".into(), "base=target:other".into()],
            "unsupported context source target",
        ),
        (
            vec![
                "--build-context".into(),
                format!("extra={}", work.path().join("missing").display()),
            ],
            "is not a directory",
        ),
        (
            vec![
                "--build-context".into(),
                "base=oci-layout:///nowhere".into(),
            ],
            "oci-layout contexts are not supported yet",
        ),
    ];
    for (args, message) in refused {
        let out = kiln(&args);
        assert_ne!(out.code, 0, "{args:?}");
        assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
    }
}
