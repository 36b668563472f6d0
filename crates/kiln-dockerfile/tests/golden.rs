//! Golden tests: `tests/testdata/<case>/Dockerfile` (+ optional `options.json`) against
//! `ast.txt` (parser output), `llb.txt` (LLB summary) and `image.json` (image config);
//! `tests/testdata/invalid/<case>/Dockerfile` against `error.txt` (the excerpt with the offending
//! lines and word marked, then the message).
//!
//! Base images come from an in-process fake resolver. Set `KILN_UPDATE_GOLDEN=1` to rewrite the
//! expected files after an intended change (and review the diff).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_dockerfile::{compile, excerpt, parse, CompileOptions, ImageMetaResolver, ResolveError};
use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::Digest;
use kiln_llb::{pb, Graph};

/// Resolves every reference to a busybox-like config; the manifest digest is derived from the
/// reference so it is stable. References containing `missing` fail; `empty` has no layers;
/// `onbuild` carries two `OnBuild` triggers.
#[derive(Default)]
struct FakeResolver {
    calls: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl ImageMetaResolver for FakeResolver {
    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<(Digest, Vec<u8>), ResolveError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{reference} {platform}"));
        let name = reference.to_string();
        if name.contains("missing") {
            return Err(format!("{name}: not found").into());
        }
        let config = if name.contains("empty") {
            serde_json::json!({
                "architecture": platform.architecture,
                "os": platform.os,
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": []},
            })
        } else {
            let mut runtime = serde_json::json!({
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "BASE=1"],
                "Cmd": ["sh"],
                "Labels": {"base.label": "base"},
            });
            if name.contains("onbuild") {
                runtime["OnBuild"] =
                    serde_json::json!(["RUN echo image trigger $BASE", "ENV FROM_TRIGGER=1"]);
            }
            serde_json::json!({
                "created": "2024-01-01T00:00:00Z",
                "architecture": platform.architecture,
                "os": platform.os,
                "config": runtime,
                "rootfs": {"type": "layers", "diff_ids": [Digest::of(b"layer").to_string()]},
                "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "base layer"}],
            })
        };
        Ok((
            Digest::of(name.as_bytes()),
            serde_json::to_vec(&config).unwrap(),
        ))
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct TestOptions {
    target: Option<String>,
    build_args: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    excludes: Vec<String>,
    platform: Option<String>,
}

fn options_for(dir: &Path, source: &str) -> CompileOptions {
    let extra: TestOptions = std::fs::read_to_string(dir.join("options.json"))
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or_default();
    CompileOptions {
        source: source.as_bytes().to_vec(),
        target: extra.target,
        build_args: extra.build_args,
        labels: extra.labels,
        excludes: extra.excludes,
        platform: Platform::parse(extra.platform.as_deref().unwrap_or("linux/amd64")).unwrap(),
        build_platform: Platform::parse("linux/amd64").unwrap(),
        session_id: "test-session".to_string(),
        ..Default::default()
    }
}

fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Dockerfile").exists())
        .collect();
    cases.sort();
    cases
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata")
}

/// Compares `actual` with the file, or rewrites it in update mode. Returns a mismatch message.
fn check(path: &Path, actual: &str) -> Option<String> {
    if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap();
        return None;
    }
    match std::fs::read_to_string(path) {
        Ok(expected) if expected == actual => None,
        Ok(expected) => Some(format!(
            "{} differs\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        )),
        Err(_) => Some(format!(
            "{} is missing (run with KILN_UPDATE_GOLDEN=1)\n--- actual\n{actual}",
            path.display()
        )),
    }
}

/// A readable, digest-free summary of the definition: ops in topological order named `#n`.
fn llb_summary(definition: &pb::Definition) -> String {
    let graph = Graph::from_definition(definition).unwrap();
    let order = graph.topological_order();
    let index = |digest: &str| order.iter().position(|d| d == digest).unwrap();
    let mut out = String::new();
    for (i, digest) in order.iter().enumerate() {
        let op = graph.op(digest).unwrap();
        let platform = op
            .platform
            .as_ref()
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .unwrap_or_default();
        let inputs: Vec<String> = graph
            .inputs(digest)
            .iter()
            .map(|r| format!("#{}.{}", index(&r.digest), r.index))
            .collect();
        writeln!(
            out,
            "#{i} inputs=[{}] platform={platform}",
            inputs.join(", ")
        )
        .unwrap();
        match &op.op {
            Some(pb::op::Op::Source(s)) => {
                writeln!(out, "  source {}", s.identifier).unwrap();
                for (k, v) in &s.attrs {
                    writeln!(out, "  attr {k}={v}").unwrap();
                }
            }
            Some(pb::op::Op::Exec(e)) => {
                let meta = e.meta.clone().unwrap_or_default();
                writeln!(out, "  exec args={:?}", meta.args).unwrap();
                writeln!(out, "  env={:?}", meta.env).unwrap();
                writeln!(out, "  cwd={:?} user={:?}", meta.cwd, meta.user).unwrap();
                if let Some(proxy) = &meta.proxy_env {
                    writeln!(out, "  proxy={proxy:?}").unwrap();
                }
                for m in &e.mounts {
                    write!(
                        out,
                        "  mount input={} dest={} output={} type={}",
                        m.input, m.dest, m.output, m.mount_type
                    )
                    .unwrap();
                    if m.readonly || !m.selector.is_empty() {
                        write!(out, " readonly={} selector={}", m.readonly, m.selector).unwrap();
                    }
                    if let Some(secret) = &m.secret_opt {
                        write!(out, " {secret:?}").unwrap();
                    }
                    if let Some(ssh) = &m.ssh_opt {
                        write!(out, " {ssh:?}").unwrap();
                    }
                    writeln!(out).unwrap();
                }
                if !e.secretenv.is_empty() {
                    writeln!(out, "  secretenv={:?}", e.secretenv).unwrap();
                }
                writeln!(out, "  network={} security={}", e.network, e.security).unwrap();
            }
            Some(pb::op::Op::File(f)) => {
                for a in &f.actions {
                    writeln!(
                        out,
                        "  action input={} secondary={} output={}",
                        a.input, a.secondary_input, a.output
                    )
                    .unwrap();
                    writeln!(out, "    {:?}", a.action.as_ref().unwrap()).unwrap();
                }
            }
            other => writeln!(out, "  {other:?}").unwrap(),
        }
        if let Some(metadata) = graph.metadata(digest) {
            for (k, v) in &metadata.description {
                writeln!(out, "  {k}: {v}").unwrap();
            }
        }
        if let Some(location) = graph.source_location(digest) {
            let ranges: Vec<String> = location
                .ranges
                .iter()
                .map(|r| format!("{}-{}", r.start, r.end))
                .collect();
            writeln!(out, "  location {} {}", location.filename, ranges.join(",")).unwrap();
        }
    }
    match graph.result() {
        Some(result) => writeln!(out, "result #{}.{}", index(&result.digest), result.index),
        None => writeln!(out, "result scratch"),
    }
    .unwrap();
    out
}

#[tokio::test]
async fn golden_cases() {
    let mut failures = Vec::new();
    let cases = cases(&testdata());
    assert!(
        cases.len() >= 5,
        "expected golden cases, found {}",
        cases.len()
    );
    for dir in cases {
        let source = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
        let dockerfile =
            parse(&source).unwrap_or_else(|e| panic!("{}: parse failed: {e}", dir.display()));
        failures.extend(check(&dir.join("ast.txt"), &format!("{dockerfile:#?}\n")));
        let resolver = FakeResolver::default();
        let compiled = compile(&dockerfile, &options_for(&dir, &source), &resolver)
            .await
            .unwrap_or_else(|e| panic!("{}: compile failed: {e}", dir.display()));
        // Every definition carries the Dockerfile for error reporting.
        let info = &compiled.definition.source.as_ref().unwrap().infos[0];
        assert_eq!(info.data, source.as_bytes());
        assert_eq!(info.language, "Dockerfile");
        failures.extend(check(
            &dir.join("llb.txt"),
            &llb_summary(&compiled.definition),
        ));
        let mut image = serde_json::to_string_pretty(&compiled.image_config).unwrap();
        image.push('\n');
        failures.extend(check(&dir.join("image.json"), &image));
        let calls = resolver.calls.lock().unwrap().join("\n") + "\n";
        failures.extend(check(&dir.join("resolved.txt"), &calls));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn invalid_cases() {
    let mut failures = Vec::new();
    let cases = cases(&testdata().join("invalid"));
    assert!(
        cases.len() >= 5,
        "expected invalid cases, found {}",
        cases.len()
    );
    for dir in cases {
        let source = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
        // The message, then the excerpt the daemon shows with it.
        let (message, location) = match parse(&source) {
            Err(e) => (error_chain(&e), Some(e.location())),
            Ok(dockerfile) => {
                match compile(
                    &dockerfile,
                    &options_for(&dir, &source),
                    &FakeResolver::default(),
                )
                .await
                {
                    Err(e) => (error_chain(&e), e.location(&dockerfile, &source)),
                    Ok(_) => (format!("{}: compiled without error", dir.display()), None),
                }
            }
        };
        let rendered = match location {
            Some(location) => excerpt("Dockerfile", source.as_bytes(), &location),
            None => String::new(),
        };
        failures.extend(check(
            &dir.join("error.txt"),
            &format!("{rendered}{message}\n"),
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The definition survives the wire and is deterministic across runs.
#[tokio::test]
async fn definition_is_deterministic() {
    let source = "FROM 127.0.0.1:5000/busybox:latest\nENV A=1 B=2\nRUN echo $A\nCOPY . /src/\n";
    let dockerfile = parse(source).unwrap();
    let options = CompileOptions {
        source: source.as_bytes().to_vec(),
        platform: Platform::parse("linux/amd64").unwrap(),
        ..Default::default()
    };
    let a = compile(&dockerfile, &options, &FakeResolver::default())
        .await
        .unwrap();
    let b = compile(&dockerfile, &options, &FakeResolver::default())
        .await
        .unwrap();
    let bytes = |d: &pb::Definition| prost::Message::encode_to_vec(d);
    assert_eq!(bytes(&a.definition), bytes(&b.definition));
    assert_eq!(
        a.definition.def.len(),
        5,
        "image, local, exec, file, terminal"
    );
}

/// `no-cache=<stage>` marks every step of the named stages (and only those) as ignoring the
/// cache; the shared context source never does.
#[tokio::test]
async fn no_cache_stages_mark_only_their_steps() {
    let source = "FROM 127.0.0.1:5000/busybox:latest AS Build\nRUN echo build\nCOPY . /src/\n\
                  FROM 127.0.0.1:5000/empty:latest\nRUN echo final\nCOPY --from=build /src /out\n";
    let dockerfile = parse(source).unwrap();
    let options = CompileOptions {
        source: source.as_bytes().to_vec(),
        platform: Platform::parse("linux/amd64").unwrap(),
        no_cache_stages: vec!["build".to_string()],
        ..Default::default()
    };
    let compiled = compile(&dockerfile, &options, &FakeResolver::default())
        .await
        .unwrap();
    let mut ignoring: Vec<String> = compiled
        .definition
        .metadata
        .values()
        .filter(|m| m.ignore_cache)
        .map(|m| {
            let name = m.description.get("llb.customname").cloned();
            // The FROM step's name ends with the resolved digest.
            name.unwrap_or_default()
                .split('@')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    ignoring.sort();
    assert_eq!(
        ignoring,
        vec![
            "[build 1/3] FROM 127.0.0.1:5000/busybox:latest".to_string(),
            "[build 2/3] RUN echo build".to_string(),
            "[build 3/3] COPY . /src/".to_string(),
        ]
    );
}
