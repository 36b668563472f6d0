//! SLSA provenance attestations (`attest:provenance` frontend attr, `kiln build --provenance`
//! or `--attest type=provenance`), as BuildKit writes them: an in-toto statement
//! (`https://in-toto.io/Statement/v0.1`) whose predicate is SLSA provenance v0.2
//! (`solver/llbsolver/provenance` upstream), one per target platform, its subject the
//! platform's image manifest. The image exporters put each statement into an attestation
//! manifest next to the image manifest in an index ([`crate::exporter::commit_result`]).
//!
//! What kiln fills: `builder.id` (the `builder-id` attr, else empty), `buildType`,
//! `invocation.configSource.entryPoint` (the Dockerfile name), `invocation.parameters`
//! (frontend, args filtered as BuildKit does, local source names), `invocation.environment`
//! (the build platform), `materials` (every `docker-image://` source of the solved definition
//! with its pinned digest, as a `pkg:docker` package URL) and `metadata` (invocation id, start
//! and finish times, completeness, `reproducible`). `mode=min` (the default) drops build-arg
//! and label values (and marks the parameters incomplete); secret values never appear in
//! attrs, so they can never be included. Not written: `buildConfig` (the LLB of `mode=max`)
//! and BuildKit's `#metadata` extension (source maps, layers, vcs).
//!
//! `attest:sbom` is refused: BuildKit runs a scanner image (docker/buildkit-syft-scanner) as
//! a frontend for it, which kiln does not do.

use std::collections::BTreeMap;

use anyhow::bail;
use kiln_image::oci::Platform;
use kiln_image::reference::Reference;
use kiln_image::Digest;
use kiln_proto::pb;
use serde_json::{json, Value};

/// The in-toto statement type BuildKit writes.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";
/// The SLSA provenance v0.2 predicate type.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v0.2";
/// The build type of BuildKit builds (kiln speaks the same build API).
pub const BUILD_TYPE: &str = "https://mobyproject.org/buildkit@v1";
/// The media type of an in-toto statement layer.
pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
/// The layer annotation naming the statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// The index-descriptor annotation naming what an attestation manifest is.
pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
/// The index-descriptor annotation naming the manifest an attestation is about.
pub const REFERENCE_DIGEST_ANNOTATION: &str = "vnd.docker.reference.digest";
/// The value of [`REFERENCE_TYPE_ANNOTATION`] for attestation manifests.
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";

/// How much the provenance tells (`mode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No build-arg or label values.
    Min,
    /// Everything kiln records.
    Max,
}

/// A provenance attestation asked for with `attest:provenance`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenanceRequest {
    /// `mode=min|max` (default `min`, as BuildKit).
    pub mode: Mode,
    /// `builder-id=<uri>` (default empty, as BuildKit without one).
    pub builder_id: String,
}

/// Reads the `attest:*` frontend attrs: `Some` when a provenance attestation is asked for.
/// Attestation kinds and attributes kiln cannot honour are refused rather than dropped.
pub fn requested(attrs: &BTreeMap<String, String>) -> anyhow::Result<Option<ProvenanceRequest>> {
    let mut request = None;
    for (key, value) in attrs {
        let Some(kind) = key.strip_prefix("attest:") else {
            continue;
        };
        let fields = value
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| f.split_once('=').unwrap_or((f, "")));
        match kind {
            "provenance" => {
                let mut parsed = ProvenanceRequest {
                    mode: Mode::Min,
                    builder_id: String::new(),
                };
                let mut disabled = false;
                for (name, value) in fields {
                    match name {
                        "mode" => {
                            parsed.mode = match value {
                                "min" => Mode::Min,
                                "max" => Mode::Max,
                                other => bail!(
                                    "invalid provenance mode {other:?}: expected min or max"
                                ),
                            }
                        }
                        "builder-id" => parsed.builder_id = value.to_string(),
                        "disabled" => disabled = matches!(value, "true" | "1" | ""),
                        "version" if value == "v0.2" => {}
                        "version" => bail!(
                            "provenance version {value:?} is not supported: kiln writes SLSA provenance v0.2"
                        ),
                        other => bail!("provenance attribute {other:?} is not supported"),
                    }
                }
                if !disabled {
                    request = Some(parsed);
                }
            }
            "sbom" => {
                if fields
                    .into_iter()
                    .any(|(k, v)| k == "disabled" && v == "true")
                {
                    continue;
                }
                bail!(
                    "sbom attestations are not supported: BuildKit generates them by running a \
                     scanner image (docker/buildkit-syft-scanner), which kiln does not run"
                )
            }
            other => bail!("{other} attestations are not supported: only provenance is"),
        }
    }
    Ok(request)
}

/// What the provenance of one build says, whatever its platform.
pub struct BuildFacts<'a> {
    /// The frontend (`dockerfile.v0`).
    pub frontend: &'a str,
    /// The frontend attrs of the request.
    pub attrs: &'a BTreeMap<String, String>,
    /// The build's ref (`metadata.buildInvocationID`).
    pub build_ref: &'a str,
    /// When the solve started.
    pub started: chrono::DateTime<chrono::Utc>,
    /// When the solve finished (before exporting).
    pub finished: chrono::DateTime<chrono::Utc>,
    /// The platform the build ran on.
    pub build_platform: Platform,
}

/// The frontend attrs BuildKit leaves out of `invocation.parameters.args`: host-specific
/// ones, attestation requests and local contexts (named in `locals` instead); kiln's own
/// `kiln.*` attrs too.
fn included_arg(key: &str, value: &str) -> bool {
    let local_context = (key == "context" || key.starts_with("context:"))
        && (value.is_empty() || value.starts_with("local:"));
    !matches!(
        key,
        "cgroup-parent" | "image-resolve-mode" | "platform" | "cache-imports"
    ) && !key.starts_with("attest:")
        && !key.starts_with("kiln.")
        && !local_context
}

/// `pkg:docker/<namespace>/<name>@<tag or digest>?platform=<os>%2F<arch>`, the package URL
/// BuildKit names images with (`util/purl.RefToPURL`).
pub fn package_url(reference: &Reference, platform: Option<&Platform>) -> String {
    let familiar = if reference.domain() == "docker.io" {
        match reference.path().strip_prefix("library/") {
            Some(rest) if !rest.contains('/') => rest.to_string(),
            _ => reference.path().to_string(),
        }
    } else {
        reference.name()
    };
    let version = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => tag.to_string(),
        (None, Some(digest)) => digest.to_string(),
        (None, None) => "latest".to_string(),
    };
    let mut out = format!("pkg:docker/{familiar}@{version}");
    if let Some(platform) = platform {
        out.push_str("?platform=");
        out.push_str(&platform.id().replace('/', "%2F"));
    }
    out
}

/// The `materials` of a solved definition: each `docker-image://` source pinned to a digest,
/// with the platform its op names, in the definition's order and without duplicates.
fn materials(definition: &pb::Definition) -> anyhow::Result<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    for bytes in &definition.def {
        let op: pb::Op = prost::Message::decode(bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("failed to decode an op of the definition: {e}"))?;
        let Some(pb::op::Op::Source(source)) = &op.op else {
            continue;
        };
        let Some(name) = source.identifier.strip_prefix("docker-image://") else {
            continue;
        };
        let Ok(reference) = Reference::parse_normalized(name) else {
            continue;
        };
        // Every base image is pinned by the frontend; an unpinned one has no material digest.
        let Some(digest) = reference.digest() else {
            continue;
        };
        let platform = op.platform.as_ref().map(|p| {
            Platform::new(
                &p.os,
                &p.architecture,
                (!p.variant.is_empty()).then_some(p.variant.as_str()),
            )
            .canonical()
        });
        let material = json!({
            "uri": package_url(&reference, platform.as_ref()),
            "digest": { "sha256": digest.hex() },
        });
        if !out.contains(&material) {
            out.push(material);
        }
    }
    Ok(out)
}

/// The local source names of a definition (`local://<name>`), plus the frontend's own
/// `dockerfile` local.
fn locals(frontend: &str, definition: &pb::Definition) -> Vec<Value> {
    let mut names: Vec<String> = Vec::new();
    for bytes in &definition.def {
        let Ok(op) = <pb::Op as prost::Message>::decode(bytes.as_slice()) else {
            continue;
        };
        if let Some(pb::op::Op::Source(source)) = &op.op {
            if let Some(name) = source.identifier.strip_prefix("local://") {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
        }
    }
    if frontend == "dockerfile.v0" && !names.iter().any(|n| n == "dockerfile") {
        names.push("dockerfile".to_string());
    }
    names.sort();
    names
        .into_iter()
        .map(|name| json!({ "name": name }))
        .collect()
}

/// The SLSA v0.2 predicate of one platform's build.
pub fn predicate(
    request: &ProvenanceRequest,
    facts: &BuildFacts<'_>,
    definition: &pb::Definition,
) -> anyhow::Result<Value> {
    let mut args = serde_json::Map::new();
    let mut complete_parameters = true;
    for (key, value) in facts.attrs.iter().filter(|(k, v)| included_arg(k, v)) {
        if request.mode == Mode::Min && (key.starts_with("build-arg:") || key.starts_with("label:"))
        {
            complete_parameters = false;
            continue;
        }
        args.insert(key.clone(), Value::String(value.clone()));
    }
    let entry_point = facts
        .attrs
        .get("filename")
        .filter(|f| !f.is_empty())
        .cloned()
        .unwrap_or_else(|| "Dockerfile".to_string());
    let time =
        |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    Ok(json!({
        "builder": { "id": request.builder_id },
        "buildType": BUILD_TYPE,
        "materials": materials(definition)?,
        "invocation": {
            "configSource": { "entryPoint": entry_point },
            "parameters": {
                "frontend": facts.frontend,
                "args": args,
                "locals": locals(facts.frontend, definition),
            },
            "environment": { "platform": facts.build_platform.id() },
        },
        "metadata": {
            "buildInvocationID": facts.build_ref,
            "buildStartedOn": time(&facts.started),
            "buildFinishedOn": time(&facts.finished),
            "reproducible": false,
            "completeness": {
                "parameters": complete_parameters,
                "environment": true,
                // Sources the steps fetched themselves (RUN curl …) are not known.
                "materials": false,
            },
        },
    }))
}

/// The in-toto statement of `predicate` about the manifest `subject` of `platform`, named
/// after each image name (`_` without one, as BuildKit).
pub fn statement(
    predicate: &Value,
    subject: &Digest,
    names: &[Reference],
    platform: &Platform,
) -> anyhow::Result<Vec<u8>> {
    let mut subjects: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({
                "name": package_url(name, Some(platform)),
                "digest": { "sha256": subject.hex() },
            })
        })
        .collect();
    if subjects.is_empty() {
        subjects.push(json!({ "name": "_", "digest": { "sha256": subject.hex() } }));
    }
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "predicateType": PREDICATE_TYPE,
        "subject": subjects,
        "predicate": predicate,
    });
    Ok(serde_json::to_vec(&statement)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn requests_are_parsed_or_refused() {
        assert_eq!(requested(&attrs(&[("target", "x")])).unwrap(), None);
        let max = requested(&attrs(&[(
            "attest:provenance",
            "mode=max,builder-id=urn:b",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(max.mode, Mode::Max);
        assert_eq!(max.builder_id, "urn:b");
        let min = requested(&attrs(&[("attest:provenance", "disabled=false")]))
            .unwrap()
            .unwrap();
        assert_eq!(min.mode, Mode::Min);
        assert_eq!(
            requested(&attrs(&[("attest:provenance", "disabled=true")])).unwrap(),
            None
        );
        for (key, value, message) in [
            ("attest:provenance", "mode=all", "invalid provenance mode"),
            ("attest:provenance", "version=v1", "SLSA provenance v0.2"),
            ("attest:provenance", "inline-only=true", "\"inline-only\""),
            ("attest:sbom", "", "buildkit-syft-scanner"),
            ("attest:spdx", "", "spdx attestations are not supported"),
        ] {
            let error = requested(&attrs(&[(key, value)])).unwrap_err().to_string();
            assert!(error.contains(message), "{key}={value}: {error}");
        }
    }

    #[test]
    fn package_urls_as_buildkit() {
        let amd64 = Platform::parse("linux/amd64").unwrap();
        let busybox = Reference::parse_normalized("127.0.0.1:5000/busybox:latest").unwrap();
        assert_eq!(
            package_url(&busybox, Some(&amd64)),
            "pkg:docker/127.0.0.1:5000/busybox@latest?platform=linux%2Famd64"
        );
        let alpine = Reference::parse_normalized("alpine:3.19").unwrap();
        assert_eq!(package_url(&alpine, None), "pkg:docker/alpine@3.19");
        let user = Reference::parse_normalized("user/app:1").unwrap();
        assert_eq!(package_url(&user, None), "pkg:docker/user/app@1");
    }

    fn source(identifier: &str, platform: Option<(&str, &str)>) -> Vec<u8> {
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: identifier.to_string(),
                attrs: Default::default(),
            })),
            platform: platform.map(|(os, arch)| pb::Platform {
                os: os.into(),
                architecture: arch.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        prost::Message::encode_to_vec(&op)
    }

    #[test]
    fn predicate_min_hides_build_args_max_shows_them() {
        let digest = Digest::of(b"base");
        let definition = pb::Definition {
            def: vec![
                source(
                    &format!("docker-image://127.0.0.1:5000/busybox:latest@{digest}"),
                    Some(("linux", "amd64")),
                ),
                source("local://context", None),
                source("docker-image://unpinned:1", None),
            ],
            ..Default::default()
        };
        let frontend_attrs = attrs(&[
            ("build-arg:GREETING", "hi"),
            ("label:a", "b"),
            ("target", "final"),
            ("platform", "linux/amd64"),
            ("attest:provenance", "mode=max"),
            ("context:assets", "local:assets"),
            ("context:base", "docker-image://alpine"),
        ]);
        let facts = BuildFacts {
            frontend: "dockerfile.v0",
            attrs: &frontend_attrs,
            build_ref: "ref1",
            started: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            finished: chrono::DateTime::from_timestamp(1_700_000_001, 0).unwrap(),
            build_platform: Platform::parse("linux/amd64").unwrap(),
        };
        let mut request = ProvenanceRequest {
            mode: Mode::Max,
            builder_id: String::new(),
        };
        let max = predicate(&request, &facts, &definition).unwrap();
        assert_eq!(max["buildType"], BUILD_TYPE);
        assert_eq!(
            max["invocation"]["parameters"]["args"],
            json!({
                "build-arg:GREETING": "hi",
                "context:base": "docker-image://alpine",
                "label:a": "b",
                "target": "final",
            })
        );
        assert_eq!(
            max["invocation"]["parameters"]["locals"],
            json!([{ "name": "context" }, { "name": "dockerfile" }])
        );
        assert_eq!(
            max["materials"],
            json!([{
                "uri": "pkg:docker/127.0.0.1:5000/busybox@latest?platform=linux%2Famd64",
                "digest": { "sha256": digest.hex() },
            }])
        );
        assert_eq!(max["metadata"]["completeness"]["parameters"], true);
        assert_eq!(
            max["metadata"]["buildStartedOn"],
            "2023-11-14T22:13:20.000000000Z"
        );
        request.mode = Mode::Min;
        let min = predicate(&request, &facts, &definition).unwrap();
        assert_eq!(
            min["invocation"]["parameters"]["args"],
            json!({ "context:base": "docker-image://alpine", "target": "final" })
        );
        assert_eq!(min["metadata"]["completeness"]["parameters"], false);

        let subject = Digest::of(b"manifest");
        let bytes = statement(&min, &subject, &[], &facts.build_platform).unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["_type"], STATEMENT_TYPE);
        assert_eq!(value["predicateType"], PREDICATE_TYPE);
        assert_eq!(
            value["subject"],
            json!([{ "name": "_", "digest": { "sha256": subject.hex() } }])
        );
    }
}
