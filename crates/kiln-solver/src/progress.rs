//! Progress as data: the solver (and the daemon around it) emit BuildKit
//! `StatusResponse` messages; only the client renders them.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kiln_proto::moby::buildkit::v1::{StatusResponse, Vertex, VertexLog, VertexStatus};
use tokio::sync::mpsc;

/// A `google.protobuf.Timestamp` for now.
pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// Where progress events go. Cheap to clone; sending never blocks and never
/// fails the build (a client that went away simply stops listening).
#[derive(Clone, Debug)]
pub struct ProgressWriter {
    tx: Option<mpsc::UnboundedSender<StatusResponse>>,
}

impl ProgressWriter {
    /// A writer feeding `tx`.
    pub fn new(tx: mpsc::UnboundedSender<StatusResponse>) -> Self {
        Self { tx: Some(tx) }
    }

    /// A writer that drops every event.
    pub fn discard() -> Self {
        Self { tx: None }
    }

    /// Sends one raw status message.
    pub fn send(&self, message: StatusResponse) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(message);
        }
    }

    /// Starts a vertex: announces it (name, inputs, start time) and returns
    /// the handle that logs to it and completes it.
    pub fn start_vertex(&self, digest: &str, name: &str, inputs: Vec<String>) -> VertexProgress {
        let vertex = Vertex {
            digest: digest.to_string(),
            inputs,
            name: name.to_string(),
            started: Some(now()),
            ..Default::default()
        };
        self.send(StatusResponse {
            vertexes: vec![vertex.clone()],
            ..Default::default()
        });
        VertexProgress {
            writer: self.clone(),
            vertex: Arc::new(Mutex::new(vertex)),
            logged: Arc::new(Mutex::new(LogBudget::default())),
        }
    }
}

/// One vertex in progress: logs, sub-statuses and completion.
#[derive(Clone, Debug)]
pub struct VertexProgress {
    writer: ProgressWriter,
    vertex: Arc<Mutex<Vertex>>,
    logged: Arc<Mutex<LogBudget>>,
}

/// BuildKit's default cap on the log output of one step (`BUILDKIT_STEP_LOG_MAX_SIZE`).
const DEFAULT_MAX_LOG_SIZE: i64 = 2 << 20;

/// The cap on one step's log bytes: `BUILDKIT_STEP_LOG_MAX_SIZE` of kilnd's environment (bytes;
/// negative = unlimited), else 2 MiB, as buildkitd.
fn max_log_size() -> Option<u64> {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let limit = std::env::var("BUILDKIT_STEP_LOG_MAX_SIZE")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(DEFAULT_MAX_LOG_SIZE);
        u64::try_from(limit).ok()
    })
}

/// `2MiB`, `512KiB`, `100B`: Go's `units.BytesSize` for whole values, as BuildKit prints the cap.
fn binary_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{}", units[unit])
}

/// How much of a step's log went out, and whether it was clipped.
#[derive(Debug, Default)]
struct LogBudget {
    sent: u64,
    clipped: bool,
}

impl VertexProgress {
    fn snapshot(&self) -> Vertex {
        match self.vertex.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn finish(&self, cached: bool, error: Option<String>) {
        let vertex = {
            let mut v = match self.vertex.lock() {
                Ok(v) => v,
                Err(poisoned) => poisoned.into_inner(),
            };
            v.cached = cached;
            v.completed = Some(now());
            v.error = error.unwrap_or_default();
            v.clone()
        };
        self.writer.send(StatusResponse {
            vertexes: vec![vertex],
            ..Default::default()
        });
    }

    /// The vertex digest.
    pub fn digest(&self) -> String {
        self.snapshot().digest
    }

    /// Completes the vertex as taken from the cache.
    pub fn cached(&self) {
        self.finish(true, None);
    }

    /// Completes the vertex as run.
    pub fn done(&self) {
        self.finish(false, None);
    }

    /// Completes the vertex with an error.
    pub fn failed(&self, error: &str) {
        self.finish(false, Some(error.to_string()));
    }

    /// Sends a log chunk (stream 1 = stdout, 2 = stderr). Past the step's cap (2 MiB unless
    /// `BUILDKIT_STEP_LOG_MAX_SIZE` says otherwise) the output is dropped after BuildKit's
    /// `[output clipped, log limit 2MiB reached]` line.
    pub fn log(&self, stream: i64, data: &[u8]) {
        self.log_limited(stream, data, max_log_size());
    }

    fn log_limited(&self, stream: i64, data: &[u8], limit: Option<u64>) {
        let (keep, clip) = {
            let mut budget = match self.logged.lock() {
                Ok(b) => b,
                Err(poisoned) => poisoned.into_inner(),
            };
            if budget.clipped {
                return;
            }
            match limit {
                Some(limit) if budget.sent + data.len() as u64 > limit => {
                    let keep = limit.saturating_sub(budget.sent) as usize;
                    budget.sent = limit;
                    budget.clipped = true;
                    (keep, Some(limit))
                }
                _ => {
                    budget.sent += data.len() as u64;
                    (data.len(), None)
                }
            }
        };
        if keep > 0 {
            self.send_log(stream, &data[..keep]);
        }
        if let Some(limit) = clip {
            let note = format!(
                "\n[output clipped, log limit {} reached]\n",
                binary_size(limit)
            );
            self.send_log(stream, note.as_bytes());
        }
    }

    fn send_log(&self, stream: i64, data: &[u8]) {
        self.writer.send(StatusResponse {
            logs: vec![VertexLog {
                vertex: self.digest(),
                timestamp: Some(now()),
                stream,
                msg: data.to_vec(),
            }],
            ..Default::default()
        });
    }

    /// Sends a sub-status (`transferring context: 2B`, `extracting sha256:…`).
    pub fn status(&self, id: &str, name: &str, current: u64, total: Option<u64>, done: bool) {
        let timestamp = now();
        self.writer.send(StatusResponse {
            statuses: vec![VertexStatus {
                id: id.to_string(),
                vertex: self.digest(),
                name: name.to_string(),
                current: current as i64,
                total: total.map(|t| t as i64).unwrap_or(0),
                timestamp: Some(timestamp),
                started: Some(timestamp),
                completed: done.then_some(timestamp),
            }],
            ..Default::default()
        });
    }
}

impl kiln_worker::ProgressSink for VertexProgress {
    fn log(&self, stream: i64, data: &[u8]) {
        VertexProgress::log(self, stream, data)
    }

    fn status(&self, id: &str, name: &str, current: u64, total: Option<u64>, done: bool) {
        VertexProgress::status(self, id, name, current, total, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_logs_are_clipped_once_past_the_cap() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let writer = ProgressWriter::new(tx);
        let vertex = writer.start_vertex("sha256:v", "[1/1] RUN x", Vec::new());
        vertex.log_limited(1, b"hello ", Some(10));
        vertex.log_limited(1, b"world and more", Some(10));
        vertex.log_limited(2, b"dropped", Some(10));
        let mut logs = Vec::new();
        while let Ok(message) = rx.try_recv() {
            for log in message.logs {
                logs.push(String::from_utf8(log.msg).unwrap());
            }
        }
        assert_eq!(
            logs,
            vec![
                "hello ",
                "worl",
                "\n[output clipped, log limit 10B reached]\n"
            ]
        );
        let unlimited = writer.start_vertex("sha256:w", "[1/1] RUN y", Vec::new());
        unlimited.log_limited(1, &[b'x'; 64], None);
        let sent: usize = std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|m| m.logs)
            .map(|l| l.msg.len())
            .sum();
        assert_eq!(sent, 64);
        assert_eq!(binary_size(2 << 20), "2MiB");
        assert_eq!(binary_size(1536), "1.5KiB");
    }
}
