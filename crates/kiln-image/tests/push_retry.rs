//! Push retries and resumable chunked uploads against an in-process fake registry that fails on
//! purpose: a 503 on the first upload POST, a PATCH whose connection drops after the registry kept
//! half of it, a 429 on the first manifest PUT, a session lost after a dropped chunk, and refusals
//! that must not be retried.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::content::ContentStore;
use kiln_image::oci::{media_types, Descriptor, ImageManifest};
use kiln_image::reference::Reference;
use kiln_image::registry::{BlobPush, Error, HostConfig, PushOptions, RegistryHosts, Resolver};
use kiln_image::Digest;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: u64 = 64 * 1024;

/// What the fake does wrong, and what it saw.
#[derive(Default)]
struct State {
    // Faults.
    /// Answer the first N upload POSTs with 503.
    fail_posts: usize,
    /// Answer every upload POST with this status.
    refuse_posts: Option<u16>,
    /// The n-th PATCH (1-based) keeps half its body and drops the connection.
    drop_patch: Option<usize>,
    /// After a dropped PATCH, the session is gone (404 on GET), as distribution does.
    lose_session: bool,
    /// Answer the first manifest PUT with 429 and `Retry-After: 1`.
    throttle_manifest: bool,
    // Records.
    posts: usize,
    patches: usize,
    /// `Content-Range` starts of the PATCHes, in order.
    patch_starts: Vec<u64>,
    status_gets: usize,
    manifest_puts: usize,
    next_session: usize,
    /// Session id → bytes received.
    sessions: HashMap<String, Vec<u8>>,
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, Vec<u8>>,
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(socket: &mut TcpStream, body_limit: Option<usize>) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(
        !headers.contains_key("transfer-encoding"),
        "the fake reads Content-Length bodies only: {head}"
    );
    let length: usize = headers
        .get("content-length")
        .map_or(0, |v| v.parse().unwrap());
    let want = body_limit.map_or(length, |limit| limit.min(length));
    let mut body = buf[head_end..].to_vec();
    while body.len() < want {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(want);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":")))
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        headers,
        body,
    })
}

async fn respond(socket: &mut TcpStream, status: u16, headers: &[(&str, String)]) {
    let mut response = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n");
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// A session location whose `_state` is the bytes received so far: a PATCH or PUT with a stale
/// location is refused (as distribution's signed state is), so the client must follow the
/// latest `Location`.
fn session_location(id: &str, received: usize) -> String {
    format!("/v2/kiln/retry/blobs/uploads/{id}?_state={received}")
}

async fn handle(mut socket: TcpStream, state: Arc<Mutex<State>>) {
    // A PATCH that is to be dropped keeps half its body: peek at the headers first.
    let drop_this = {
        let s = state.lock().unwrap();
        s.drop_patch == Some(s.patches + 1)
    };
    let limit = drop_this.then_some((CHUNK / 2) as usize);
    let Some(request) = read_request(&mut socket, limit).await else {
        return;
    };
    let reply = answer(&mut state.lock().unwrap(), request, drop_this);
    if let Some((status, headers)) = reply {
        respond(&mut socket, status, &headers).await;
    }
    // None: no answer, the connection just closes.
}

/// The fake's answer to `request`; `None` to drop the connection instead.
fn answer(
    s: &mut State,
    request: Request,
    drop_this: bool,
) -> Option<(u16, Vec<(&'static str, String)>)> {
    let prefix = "/v2/kiln/retry/";
    let rest = request.path.strip_prefix(prefix).unwrap_or("");
    Some(match (request.method.as_str(), rest) {
        ("GET", _) if request.path == "/v2/" => (200, vec![]),
        ("HEAD", blob) if blob.starts_with("blobs/") => {
            let digest = blob.trim_start_matches("blobs/");
            (
                if s.blobs.contains_key(digest) {
                    200
                } else {
                    404
                },
                vec![],
            )
        }
        ("POST", "blobs/uploads/") => {
            s.posts += 1;
            if let Some(status) = s.refuse_posts {
                (status, vec![])
            } else if s.fail_posts > 0 {
                s.fail_posts -= 1;
                (503, vec![])
            } else {
                s.next_session += 1;
                let id = format!("session{}", s.next_session);
                s.sessions.insert(id.clone(), Vec::new());
                (202, vec![("Location", session_location(&id, 0))])
            }
        }
        (method, upload) if upload.starts_with("blobs/uploads/") => {
            let id = upload.trim_start_matches("blobs/uploads/").to_owned();
            let state_ok = |s: &State| {
                s.sessions.get(&id).map(Vec::len).map(|n| n.to_string())
                    == request.query.get("_state").cloned()
            };
            match method {
                "PATCH" => {
                    s.patches += 1;
                    let start: u64 = request.headers["content-range"]
                        .split_once('-')
                        .unwrap()
                        .0
                        .parse()
                        .unwrap();
                    s.patch_starts.push(start);
                    if !state_ok(s) {
                        (400, vec![])
                    } else if s.sessions[&id].len() as u64 != start {
                        (416, vec![])
                    } else {
                        s.sessions
                            .get_mut(&id)
                            .unwrap()
                            .extend_from_slice(&request.body);
                        if drop_this {
                            if s.lose_session {
                                s.sessions.remove(&id);
                            }
                            return None;
                        }
                        let n = s.sessions[&id].len();
                        (
                            202,
                            vec![
                                ("Location", session_location(&id, n)),
                                ("Range", format!("0-{}", n.saturating_sub(1))),
                            ],
                        )
                    }
                }
                "GET" => {
                    s.status_gets += 1;
                    match s.sessions.get(&id).map(Vec::len) {
                        Some(n) => (
                            204,
                            vec![
                                ("Location", session_location(&id, n)),
                                ("Range", format!("0-{}", n.saturating_sub(1))),
                            ],
                        ),
                        None => (404, vec![]),
                    }
                }
                "PUT" if state_ok(s) => {
                    let mut bytes = s.sessions.remove(&id).unwrap();
                    bytes.extend_from_slice(&request.body);
                    let digest = request.query["digest"].clone();
                    if Digest::of(&bytes).to_string() == digest {
                        s.blobs.insert(digest, bytes);
                        (201, vec![])
                    } else {
                        (400, vec![])
                    }
                }
                _ => (400, vec![]),
            }
        }
        ("PUT", manifest) if manifest.starts_with("manifests/") => {
            s.manifest_puts += 1;
            if s.throttle_manifest {
                s.throttle_manifest = false;
                (429, vec![("Retry-After", "1".to_owned())])
            } else {
                let tag = manifest.trim_start_matches("manifests/").to_owned();
                s.manifests.insert(tag, request.body);
                (201, vec![])
            }
        }
        _ => (404, vec![]),
    })
}

async fn start_fake(state: State) -> (u16, Arc<Mutex<State>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(Mutex::new(state));
    let shared = state.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(handle(socket, shared.clone()));
        }
    });
    (port, state)
}

fn resolver(port: u16, attempts: u32) -> Resolver {
    let mut hosts = RegistryHosts::new();
    hosts.insert(
        format!("127.0.0.1:{port}"),
        HostConfig {
            http: true,
            insecure: false,
        },
    );
    Resolver::with_push_options(
        hosts,
        PushOptions {
            attempts,
            initial_backoff: Duration::from_millis(5),
            // Also caps the fake's `Retry-After: 1`.
            max_backoff: Duration::from_millis(20),
            chunk_size: CHUNK,
        },
    )
    .unwrap()
}

/// Bytes that differ at every offset, so a chunk resent at the wrong place changes the digest.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// An image of a config and one layer of `layer_len` bytes, written to `store`.
fn image(store: &ContentStore, layer_len: usize) -> (Descriptor, Vec<u8>, Vec<u8>) {
    let layer = pattern(layer_len);
    let layer_digest = store.write_blob(&layer).unwrap();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = store.write_blob(config).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_types::OCI_MANIFEST.into()),
        config: Descriptor::new(media_types::OCI_CONFIG, config_digest, config.len() as u64),
        layers: vec![Descriptor::new(
            media_types::OCI_LAYER,
            layer_digest,
            layer.len() as u64,
        )],
        annotations: None,
    };
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = store.write_blob(&bytes).unwrap();
    (
        Descriptor::new(media_types::OCI_MANIFEST, digest, bytes.len() as u64),
        layer,
        bytes,
    )
}

#[tokio::test]
async fn chunked_push_resumes_after_a_dropped_chunk_and_retries_503_and_429() {
    let (port, state) = start_fake(State {
        fail_posts: 1,
        drop_patch: Some(3),
        throttle_manifest: true,
        ..State::default()
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    let layer_len = 300_000;
    let (manifest, layer, manifest_bytes) = image(&store, layer_len);
    let reference =
        Reference::parse_normalized(&format!("127.0.0.1:{port}/kiln/retry:v1")).unwrap();

    let report = resolver(port, 5)
        .push_image(&reference, &manifest, &store)
        .await
        .unwrap();
    assert_eq!(report.count(BlobPush::Uploaded), 2, "{report:?}");

    let s = state.lock().unwrap();
    let layer_digest = Digest::of(&layer).to_string();
    assert_eq!(
        s.blobs.get(&layer_digest),
        Some(&layer),
        "layer arrived intact"
    );
    // The config's POST failed once with 503 and was tried again; then the layer's POST.
    assert_eq!(s.posts, 3);
    // Chunks at 0, 64 Ki, 128 Ki (dropped after 32 Ki were kept), then — after asking the
    // session's status — from 160 Ki, not from the start of the dropped chunk.
    let c = CHUNK;
    assert_eq!(
        s.patch_starts,
        vec![0, c, 2 * c, 2 * c + c / 2, 3 * c + c / 2, 4 * c + c / 2]
    );
    assert_eq!(s.status_gets, 1);
    assert_eq!(s.manifest_puts, 2, "the 429 was retried");
    assert_eq!(s.manifests.get("v1"), Some(&manifest_bytes));
}

#[tokio::test]
async fn chunked_push_starts_over_when_the_session_is_lost() {
    let (port, state) = start_fake(State {
        drop_patch: Some(2),
        lose_session: true,
        ..State::default()
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    let (manifest, layer, _) = image(&store, 200_000);
    let layer_desc: ImageManifest =
        serde_json::from_slice(&store.read(&manifest.digest).unwrap()).unwrap();
    let reference =
        Reference::parse_normalized(&format!("127.0.0.1:{port}/kiln/retry:v1")).unwrap();

    let how = resolver(port, 5)
        .push_blob(&reference, &layer_desc.layers[0], &store)
        .await
        .unwrap();
    assert_eq!(how, BlobPush::Uploaded);
    let s = state.lock().unwrap();
    assert_eq!(
        s.blobs.get(&Digest::of(&layer).to_string()),
        Some(&layer),
        "layer arrived intact"
    );
    assert_eq!(s.posts, 2, "a new session after the lost one");
    assert_eq!(s.status_gets, 1);
    let c = CHUNK;
    assert_eq!(s.patch_starts, vec![0, c, 0, c, 2 * c, 3 * c]);
}

#[tokio::test]
async fn refusals_are_not_retried_and_transient_failures_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ContentStore::open(tmp.path()).unwrap();
    let (manifest, _, _) = image(&store, 1000);
    let image: ImageManifest =
        serde_json::from_slice(&store.read(&manifest.digest).unwrap()).unwrap();

    let (port, state) = start_fake(State {
        refuse_posts: Some(403),
        ..State::default()
    })
    .await;
    let reference =
        Reference::parse_normalized(&format!("127.0.0.1:{port}/kiln/retry:v1")).unwrap();
    let err = resolver(port, 4)
        .push_blob(&reference, &image.layers[0], &store)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PushStatus { status, .. } if status == StatusCode::FORBIDDEN),
        "{err}"
    );
    assert_eq!(state.lock().unwrap().posts, 1, "a 403 is final");

    let (port, state) = start_fake(State {
        refuse_posts: Some(503),
        ..State::default()
    })
    .await;
    let reference =
        Reference::parse_normalized(&format!("127.0.0.1:{port}/kiln/retry:v1")).unwrap();
    let err = resolver(port, 4)
        .push_blob(&reference, &image.layers[0], &store)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PushStatus { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
    assert_eq!(
        state.lock().unwrap().posts,
        4,
        "tried `attempts` times, no more"
    );
}
