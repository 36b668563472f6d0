//! Progress as data: the solver (and the daemon around it) emit BuildKit
//! `StatusResponse` messages; only the client renders them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
            logged: Arc::new(Mutex::new(LogBudget {
                started: Instant::now(),
                streams: BTreeMap::new(),
            })),
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

/// BuildKit's default cap on the log output of one step stream (`BUILDKIT_STEP_LOG_MAX_SIZE`).
const DEFAULT_MAX_LOG_SIZE: i64 = 2 << 20;

/// BuildKit's default log rate of one step stream (`BUILDKIT_STEP_LOG_MAX_SPEED`), bytes/second.
const DEFAULT_MAX_LOG_SPEED: i64 = 200 << 10;

/// How much of the output dropped for speed is kept and sent when the step ends, as buildkitd
/// keeps the tail of a fast stream.
const SPEED_TAIL_SIZE: usize = 256 << 10;

/// The limits on one stream of a step's log. `None` is no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LogLimits {
    max_size: Option<u64>,
    max_speed: Option<u64>,
}

impl LogLimits {
    /// `BUILDKIT_STEP_LOG_MAX_SIZE` (bytes) and `BUILDKIT_STEP_LOG_MAX_SPEED` (bytes/second) of
    /// kilnd's environment, else 2 MiB and 200 KiB/s, as buildkitd; a negative value lifts the
    /// limit, and an unparsable one keeps the default.
    fn from_env() -> Self {
        static LIMITS: std::sync::OnceLock<LogLimits> = std::sync::OnceLock::new();
        *LIMITS.get_or_init(|| {
            let read = |name: &str, default: i64| {
                let value = std::env::var(name)
                    .ok()
                    .and_then(|v| v.trim().parse::<i64>().ok())
                    .unwrap_or(default);
                u64::try_from(value).ok()
            };
            LogLimits {
                max_size: read("BUILDKIT_STEP_LOG_MAX_SIZE", DEFAULT_MAX_LOG_SIZE),
                max_speed: read("BUILDKIT_STEP_LOG_MAX_SPEED", DEFAULT_MAX_LOG_SPEED),
            }
        })
    }

    /// How many bytes a stream may have written `elapsed` after the step started, and whether
    /// the rate (rather than the size cap) is what binds. The rate allows `speed` bytes for every
    /// started second; a size cap below that wins. As in buildkitd, an unlimited size lifts the
    /// rate limit too (`BUILDKIT_STEP_LOG_MAX_SIZE=-1` turns clipping off).
    fn allowance(&self, elapsed: Duration) -> Option<(u64, ClipReason)> {
        let size = self.max_size?;
        let Some(speed) = self.max_speed else {
            return Some((size, ClipReason::Size));
        };
        let seconds = elapsed.as_nanos().div_ceil(1_000_000_000) as u64;
        let by_speed = seconds.saturating_mul(speed);
        if by_speed > size {
            Some((size, ClipReason::Size))
        } else {
            Some((by_speed, ClipReason::Speed))
        }
    }
}

/// Which limit clipped a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClipReason {
    Size,
    Speed,
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

/// The log budget of one step: when it started, and each stream's account.
#[derive(Debug)]
struct LogBudget {
    started: Instant,
    streams: BTreeMap<i64, StreamBudget>,
}

/// One stream's account, kept as buildkitd keeps it: every byte written counts (sent or not),
/// and clipping stops once a whole write fits again.
#[derive(Debug, Default)]
struct StreamBudget {
    written: u64,
    clipping: bool,
    /// The newest output dropped for speed (at most [`SPEED_TAIL_SIZE`] bytes).
    tail: VecDeque<u8>,
}

impl StreamBudget {
    /// Takes `data` written `elapsed` into the step and returns what to send: the part within
    /// the allowance, then (when this write starts clipping) BuildKit's
    /// `[output clipped, log limit …]` line. Output dropped for speed is kept in the tail.
    fn admit(&mut self, data: &[u8], elapsed: Duration, limits: LogLimits) -> Vec<u8> {
        let before = self.written;
        self.written += data.len() as u64;
        let (keep, reason) = match limits.allowance(elapsed) {
            Some((allowed, reason)) if self.written > allowed => {
                (allowed.saturating_sub(before) as usize, Some(reason))
            }
            _ => (data.len(), None),
        };
        let mut out = Vec::new();
        if keep == data.len() {
            if self.clipping {
                // The output fits again: what was kept of the gap goes first, in order.
                self.clipping = false;
                out.extend(self.tail.drain(..));
            }
            out.extend_from_slice(data);
            return out;
        }
        out.extend_from_slice(&data[..keep]);
        let dropped = &data[keep..];
        if reason == Some(ClipReason::Speed) {
            let overflow = (self.tail.len() + dropped.len()).saturating_sub(SPEED_TAIL_SIZE);
            self.tail.drain(..overflow.min(self.tail.len()));
            let skip = dropped.len().saturating_sub(SPEED_TAIL_SIZE);
            self.tail.extend(&dropped[skip..]);
        }
        if !self.clipping {
            self.clipping = true;
            let limit = match reason {
                Some(ClipReason::Speed) => {
                    format!("{}/s", binary_size(limits.max_speed.unwrap_or_default()))
                }
                _ => binary_size(limits.max_size.unwrap_or_default()),
            };
            out.extend_from_slice(
                format!("\n[output clipped, log limit {limit} reached]\n").as_bytes(),
            );
        }
        out
    }
}

impl VertexProgress {
    fn snapshot(&self) -> Vertex {
        match self.vertex.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn finish(&self, cached: bool, error: Option<String>) {
        self.flush_log_tails();
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

    /// Sends a log chunk (stream 1 = stdout, 2 = stderr), within buildkitd's limits on each
    /// stream of a step: 2 MiB in all (`BUILDKIT_STEP_LOG_MAX_SIZE`) and 200 KiB per started
    /// second (`BUILDKIT_STEP_LOG_MAX_SPEED`). Output past a limit is dropped after BuildKit's
    /// `[output clipped, log limit 2MiB reached]` (or `… 200KiB/s reached`) line; the last
    /// 256 KiB dropped for speed are sent when the output fits again or the step ends.
    pub fn log(&self, stream: i64, data: &[u8]) {
        self.log_at(stream, data, None, LogLimits::from_env());
    }

    /// [`Self::log`] with the limits given, `elapsed` since the step started (now when `None`).
    fn log_at(&self, stream: i64, data: &[u8], elapsed: Option<Duration>, limits: LogLimits) {
        let mut budget = match self.logged.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let elapsed = elapsed.unwrap_or_else(|| budget.started.elapsed());
        let out = budget
            .streams
            .entry(stream)
            .or_default()
            .admit(data, elapsed, limits);
        // Sent under the lock so that concurrent writers keep each stream in order.
        if !out.is_empty() {
            self.send_log(stream, &out);
        }
    }

    /// Sends what each stream kept of the output it dropped for speed.
    fn flush_log_tails(&self) {
        let mut budget = match self.logged.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (stream, account) in budget.streams.iter_mut() {
            if !account.tail.is_empty() {
                let tail: Vec<u8> = account.tail.drain(..).collect();
                self.send_log(*stream, &tail);
            }
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

    fn logs(rx: &mut mpsc::UnboundedReceiver<StatusResponse>) -> Vec<(i64, String)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .flat_map(|m| m.logs)
            .map(|l| (l.stream, String::from_utf8(l.msg).unwrap()))
            .collect()
    }

    fn at(millis: u64) -> Option<Duration> {
        Some(Duration::from_millis(millis))
    }

    #[test]
    fn step_logs_are_clipped_once_past_the_size_cap_per_stream() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let writer = ProgressWriter::new(tx);
        let vertex = writer.start_vertex("sha256:v", "[1/1] RUN x", Vec::new());
        let size_only = LogLimits {
            max_size: Some(10),
            max_speed: None,
        };
        vertex.log_at(1, b"hello ", at(0), size_only);
        vertex.log_at(1, b"world and more", at(0), size_only);
        vertex.log_at(1, b"dropped", at(0), size_only);
        // Each stream has its own account, as buildkitd's two stream writers.
        vertex.log_at(2, b"stderr", at(0), size_only);
        assert_eq!(
            logs(&mut rx),
            vec![
                (1, "hello ".to_string()),
                (
                    1,
                    "worl\n[output clipped, log limit 10B reached]\n".to_string()
                ),
                (2, "stderr".to_string()),
            ]
        );
        let unlimited = writer.start_vertex("sha256:w", "[1/1] RUN y", Vec::new());
        // An unlimited size lifts the rate limit too, as in buildkitd.
        let no_size = LogLimits {
            max_size: None,
            max_speed: Some(1),
        };
        unlimited.log_at(1, &[b'x'; 64], at(0), no_size);
        let sent: usize = logs(&mut rx).iter().map(|(_, l)| l.len()).sum();
        assert_eq!(sent, 64);
        assert_eq!(binary_size(2 << 20), "2MiB");
        assert_eq!(binary_size(200 << 10), "200KiB");
        assert_eq!(binary_size(1536), "1.5KiB");
    }

    #[test]
    fn step_logs_are_clipped_by_rate_and_keep_the_dropped_tail() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let writer = ProgressWriter::new(tx);
        let vertex = writer.start_vertex("sha256:v", "[1/1] RUN x", Vec::new());
        let limits = LogLimits {
            max_size: Some(1000),
            max_speed: Some(10),
        };
        // First second: 10 bytes allowed.
        vertex.log_at(1, b"012345", at(500), limits);
        vertex.log_at(1, b"6789abcd", at(600), limits);
        vertex.log_at(1, b"ef", at(900), limits);
        assert_eq!(
            logs(&mut rx),
            vec![
                (1, "012345".to_string()),
                (
                    1,
                    "6789\n[output clipped, log limit 10B/s reached]\n".to_string()
                ),
            ]
        );
        // Second second: 20 bytes allowed, 16 written, so 4 more fit: the dropped part goes
        // first, then the write.
        vertex.log_at(1, b"ghi", at(1500), limits);
        assert_eq!(logs(&mut rx), vec![(1, "abcdefghi".to_string())]);
        // Dropped bytes count: 19 written, one more fits, then clipping again.
        vertex.log_at(1, b"jklmn", at(1600), limits);
        vertex.log_at(1, b"opq", at(1700), limits);
        assert_eq!(
            logs(&mut rx),
            vec![(
                1,
                "j\n[output clipped, log limit 10B/s reached]\n".to_string()
            )]
        );
        // The step ends while clipping: the dropped tail is sent before the completion.
        vertex.done();
        let mut messages = std::iter::from_fn(|| rx.try_recv().ok());
        let tail = messages.next().unwrap();
        assert_eq!(tail.logs[0].msg, b"klmnopq");
        let completed = messages.next().unwrap();
        assert!(completed.vertexes[0].completed.is_some());
    }

    #[test]
    fn the_speed_tail_keeps_only_the_newest_bytes_and_the_size_cap_still_binds() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let writer = ProgressWriter::new(tx);
        let vertex = writer.start_vertex("sha256:v", "[1/1] RUN x", Vec::new());
        let limits = LogLimits {
            max_size: Some(2 << 20),
            max_speed: Some(1),
        };
        let mut data = vec![b'a'; SPEED_TAIL_SIZE];
        data.extend_from_slice(b"the end");
        vertex.log_at(2, &data, at(10), limits);
        vertex.failed("boom");
        let sent = logs(&mut rx);
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].1, "a\n[output clipped, log limit 1B/s reached]\n");
        assert_eq!(sent[1].1.len(), SPEED_TAIL_SIZE);
        assert!(sent[1].1.ends_with("aaathe end"));

        // Once the rate allows more than the size cap, the cap is what clips, and nothing is
        // kept for later.
        let vertex = writer.start_vertex("sha256:w", "[1/1] RUN y", Vec::new());
        let limits = LogLimits {
            max_size: Some(8),
            max_speed: Some(100),
        };
        vertex.log_at(1, b"0123456789", at(10), limits);
        vertex.done();
        assert_eq!(
            logs(&mut rx),
            vec![(
                1,
                "01234567\n[output clipped, log limit 8B reached]\n".to_string()
            )]
        );
    }
}
