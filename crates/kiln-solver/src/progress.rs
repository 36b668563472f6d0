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
        }
    }
}

/// One vertex in progress: logs, sub-statuses and completion.
#[derive(Clone, Debug)]
pub struct VertexProgress {
    writer: ProgressWriter,
    vertex: Arc<Mutex<Vertex>>,
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

    /// Sends a log chunk (stream 1 = stdout, 2 = stderr).
    pub fn log(&self, stream: i64, data: &[u8]) {
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
