//! `--debugaddr`: a small plain-HTTP listener (off by default) for health
//! checks and basic process facts. buildkitd serves Go's `/debug/pprof`,
//! `/debug/requests` and `/debug/events` there, which have no Rust
//! counterpart; kiln serves `/debug/health`, `/debug/vars` (JSON) and
//! `/metrics` (Prometheus text) and answers 404 with the list of paths for
//! anything else.

use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the debug pages report.
#[derive(Clone, Debug)]
pub struct DebugInfo {
    /// State directory.
    pub root: PathBuf,
    /// gRPC listen addresses.
    pub addresses: Vec<String>,
    /// The worker's id.
    pub worker: String,
}

const PATHS: &str = "/debug/health /debug/vars /metrics";

/// Binds `address` (`host:port`, or `tcp://host:port`) and returns the
/// server loop to spawn.
pub async fn bind(
    address: &str,
    info: DebugInfo,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let host = address.strip_prefix("tcp://").unwrap_or(address);
    let listener = tokio::net::TcpListener::bind(host)
        .await
        .with_context(|| format!("failed to listen on debug address {address}"))?;
    let started = Instant::now();
    Ok(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let info = info.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 4096];
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buffer),
                )
                .await;
                let Ok(Ok(n)) = read else { return };
                let request = String::from_utf8_lossy(&buffer[..n]);
                let (status, content_type, body) = respond(&request, &info, started);
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    })
}

/// The response to one request: status line text, content type, body.
fn respond(
    request: &str,
    info: &DebugInfo,
    started: Instant,
) -> (&'static str, &'static str, String) {
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        );
    }
    let uptime = started.elapsed().as_secs_f64();
    match path {
        "/debug/health" => ("200 OK", "text/plain", "ok\n".to_string()),
        "/debug/vars" => {
            let vars = serde_json::json!({
                "pid": std::process::id(),
                "uptime_seconds": uptime,
                "root": info.root,
                "addresses": info.addresses,
                "worker": info.worker,
                "version": env!("CARGO_PKG_VERSION"),
            });
            ("200 OK", "application/json", format!("{vars}\n"))
        }
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            format!(
                "# HELP kilnd_uptime_seconds Seconds since kilnd started.\n# TYPE kilnd_uptime_seconds gauge\nkilnd_uptime_seconds {uptime}\n"
            ),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            format!("not found; kilnd serves {PATHS}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let info = DebugInfo {
            root: PathBuf::from("/r"),
            addresses: vec!["unix:///s".into()],
            worker: "w1".into(),
        };
        let now = Instant::now();
        let (status, _, body) = respond("GET /debug/health HTTP/1.1\r\n\r\n", &info, now);
        assert_eq!((status, body.as_str()), ("200 OK", "ok\n"));
        let (_, kind, body) = respond("GET /debug/vars HTTP/1.1\r\n\r\n", &info, now);
        assert_eq!(kind, "application/json");
        let vars: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(vars["worker"], "w1");
        assert_eq!(vars["root"], "/r");
        let (_, _, body) = respond("GET /metrics HTTP/1.1\r\n\r\n", &info, now);
        assert!(body.contains("kilnd_uptime_seconds "), "{body}");
        let (status, _, body) = respond("GET /debug/pprof/ HTTP/1.1\r\n\r\n", &info, now);
        assert_eq!(status, "404 Not Found");
        assert!(body.contains("/debug/vars"));
    }
}
