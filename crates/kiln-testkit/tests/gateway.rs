//! The call sequence `buildctl build --frontend dockerfile.v0` uses (reference
//! §5.2): `Control.Solve` with neither frontend nor definition, then
//! `LLBBridge.Ping`, `Solve` and `Return` keyed by
//! `buildkit-controlapi-buildid`; kilnd exports what `Return` handed back.

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::frontend as gw;
use kiln_proto::moby::buildkit::v1::frontend::llb_bridge_client::LlbBridgeClient;
use kiln_testkit::{Kilnd, BUSYBOX};

fn with_build_id<T>(message: T, build_ref: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("buildkit-controlapi-buildid", build_ref.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buildctl_gateway_sequence_builds_and_exports() {
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {BUSYBOX}\nRUN echo gw > /gw\n"),
    )
    .unwrap();
    let out = work.path().join("image.tar");

    let channel = kiln_client::connect_channel(&socket, Duration::from_secs(5))
        .await
        .unwrap();
    let control = api::control_client::ControlClient::new(channel.clone());
    let session = kiln_session::client::SessionBuilder::new("gateway-test")
        .local_dir("context", &context)
        .local_dir("dockerfile", &context)
        .file_send_path(out.clone())
        .run(control.clone())
        .await
        .unwrap();
    let build_ref = format!("gw{}", std::process::id());

    let mut exporter_attrs = BTreeMap::new();
    exporter_attrs.insert(
        "name".to_string(),
        "127.0.0.1:5000/kiln-gateway:latest".to_string(),
    );
    let solve = {
        let mut control = control.clone();
        let request = api::SolveRequest {
            r#ref: build_ref.clone(),
            session: session.id().to_string(),
            exporters: vec![api::Exporter {
                r#type: "docker".to_string(),
                attrs: exporter_attrs,
            }],
            ..Default::default()
        };
        tokio::spawn(async move { control.solve(request).await })
    };

    let mut bridge = LlbBridgeClient::new(channel);
    let pong = bridge
        .ping(with_build_id(gw::PingRequest {}, &build_ref))
        .await
        .unwrap()
        .into_inner();
    assert!(pong
        .frontend_api_caps
        .iter()
        .any(|c| c.id == "return" && c.enabled));
    assert_eq!(pong.workers.len(), 1);

    let mut options = BTreeMap::new();
    options.insert("filename".to_string(), "Dockerfile".to_string());
    let solved = bridge
        .solve(with_build_id(
            gw::SolveRequest {
                frontend: "dockerfile.v0".to_string(),
                frontend_opt: options,
                allow_result_return: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap_or_else(|e| panic!("LLBBridge.Solve failed: {e}\nkilnd:\n{}", daemon.log_text()))
        .into_inner();
    let result = solved.result.expect("an inline result");
    assert!(result.metadata.contains_key("containerimage.config"));
    bridge
        .r#return(with_build_id(
            gw::ReturnRequest {
                result: Some(result),
                error: None,
            },
            &build_ref,
        ))
        .await
        .unwrap();

    let response = solve.await.unwrap().unwrap().into_inner();
    let digest = response
        .exporter_response
        .get("containerimage.digest")
        .expect("a manifest digest");
    assert!(digest.starts_with("sha256:"), "{digest}");
    session.close().await.unwrap();
    let listing = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&out)
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listing.stdout);
    assert!(names.lines().any(|l| l == "manifest.json"), "{names}");

    // A call naming no registered build is refused.
    let err = bridge
        .ping(with_build_id(gw::PingRequest {}, "no-such-build"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// A multi-platform build through the gateway comes back in BuildKit's shape — refs keyed by
/// platform id, `refs.platforms` listing them, a config per platform — and, returned as is,
/// exports as an index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_multi_platform_result_has_buildkits_shape_and_exports_an_index() {
    let work = tempfile::tempdir().unwrap();
    let socket = format!("unix://{}/kilnd.sock", work.path().display());
    let daemon = Kilnd::start(&socket, &[]);
    let context = work.path().join("ctx");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        "FROM scratch\nCOPY a.txt /a.txt\n",
    )
    .unwrap();
    std::fs::write(context.join("a.txt"), "a\n").unwrap();
    let out = work.path().join("multi.tar");

    let channel = kiln_client::connect_channel(&socket, Duration::from_secs(5))
        .await
        .unwrap();
    let control = api::control_client::ControlClient::new(channel.clone());
    let session = kiln_session::client::SessionBuilder::new("gateway-multi")
        .local_dir("context", &context)
        .local_dir("dockerfile", &context)
        .file_send_path(out.clone())
        .run(control.clone())
        .await
        .unwrap();
    let build_ref = format!("gwmulti{}", std::process::id());
    let solve = {
        let mut control = control.clone();
        let request = api::SolveRequest {
            r#ref: build_ref.clone(),
            session: session.id().to_string(),
            exporters: vec![api::Exporter {
                r#type: "oci".to_string(),
                attrs: BTreeMap::new(),
            }],
            ..Default::default()
        };
        tokio::spawn(async move { control.solve(request).await })
    };

    let mut bridge = LlbBridgeClient::new(channel);
    let mut options = BTreeMap::new();
    options.insert(
        "platform".to_string(),
        "linux/amd64,linux/arm64".to_string(),
    );
    let solved = bridge
        .solve(with_build_id(
            gw::SolveRequest {
                frontend: "dockerfile.v0".to_string(),
                frontend_opt: options,
                allow_result_return: true,
                ..Default::default()
            },
            &build_ref,
        ))
        .await
        .unwrap_or_else(|e| panic!("LLBBridge.Solve failed: {e}\nkilnd:\n{}", daemon.log_text()))
        .into_inner();
    let result = solved.result.expect("an inline result");
    let Some(gw::result::Result::Refs(refs)) = &result.result else {
        panic!("expected a refs map, got {:?}", result.result);
    };
    let keys: Vec<&String> = refs.refs.keys().collect();
    assert_eq!(keys, ["linux/amd64", "linux/arm64"]);
    let listed: serde_json::Value =
        serde_json::from_slice(&result.metadata["refs.platforms"]).unwrap();
    assert_eq!(listed["Platforms"][1]["ID"], "linux/arm64");
    assert_eq!(listed["Platforms"][1]["Platform"]["architecture"], "arm64");
    let arm_config: serde_json::Value =
        serde_json::from_slice(&result.metadata["containerimage.config/linux/arm64"]).unwrap();
    assert_eq!(arm_config["architecture"], "arm64");
    bridge
        .r#return(with_build_id(
            gw::ReturnRequest {
                result: Some(result),
                error: None,
            },
            &build_ref,
        ))
        .await
        .unwrap();
    let response = solve
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\nkilnd:\n{}", daemon.log_text()))
        .into_inner();
    assert!(!response
        .exporter_response
        .contains_key("containerimage.config.digest"));
    session.close().await.unwrap();

    let inspected = std::process::Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", out.display()))
        .output()
        .unwrap();
    assert!(
        inspected.status.success(),
        "{}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    let index: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(
        index["manifests"][1]["platform"]["architecture"], "arm64",
        "{index}"
    );
    assert_eq!(
        &response.exporter_response["containerimage.digest"],
        &format!("sha256:{}", sha256_hex(&inspected.stdout))
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
