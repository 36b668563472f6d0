//! Build progress: a typed model of `Control.Status` messages and renderers.
//!
//! The daemon streams [`StatusResponse`] messages; [`ProgressEvent::from_status`]
//! turns one into typed events and [`PlainPrinter`] renders them the way
//! `buildctl --progress=plain` does:
//!
//! ```text
//! #1 [internal] load build definition from Dockerfile
//! #1 transferring dockerfile: 38B done
//! #1 DONE 0.0s
//!
//! #5 [2/2] RUN echo hello
//! #5 0.123 hello
//! #5 DONE 0.2s
//! ```
//!
//! Vertices are numbered in order of first appearance. [`RawJsonPrinter`]
//! writes buildctl's `--progress=rawjson` lines and [`TtyPrinter`] a live
//! view redrawn in place like buildx's; [`Renderer`] picks one by mode. The
//! printers write to a writer owned by the caller; nothing here prints on
//! its own.

use std::collections::HashMap;
use std::io::{self, Write};
use std::time::SystemTime;

use kiln_proto::moby::buildkit::v1::StatusResponse;

mod rawjson;
mod tty;

pub use rawjson::{rfc3339_nano, RawJsonPrinter};
pub use tty::{TtyPrinter, LOG_LINES};

/// One of the progress renderers, chosen by `--progress`.
#[derive(Debug)]
pub enum Renderer<W: Write> {
    /// `plain`: buildctl's text.
    Plain(PlainPrinter<W>),
    /// `tty`: the live view.
    Tty(TtyPrinter<W>),
    /// `rawjson`: one JSON object per message.
    RawJson(RawJsonPrinter<W>),
    /// `quiet`: nothing (errors are reported by the caller from the solve
    /// result).
    Quiet,
}

impl<W: Write> Renderer<W> {
    /// Renders one status message.
    pub fn handle(&mut self, response: &StatusResponse) -> io::Result<()> {
        match self {
            Renderer::Plain(p) => p.handle(response),
            Renderer::Tty(p) => p.handle(response),
            Renderer::RawJson(p) => p.handle(response),
            Renderer::Quiet => Ok(()),
        }
    }

    /// Periodic redraw (only the live view changes with time).
    pub fn tick(&mut self) -> io::Result<()> {
        match self {
            Renderer::Tty(p) => p.redraw(SystemTime::now()),
            _ => Ok(()),
        }
    }

    /// Ends the rendering once the stream is over.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            Renderer::Plain(p) => p.finish(),
            Renderer::Tty(p) => p.finish(),
            Renderer::RawJson(p) => p.finish(),
            Renderer::Quiet => Ok(()),
        }
    }
}

/// One typed progress event, decoded from a [`StatusResponse`].
#[derive(Debug, Clone, PartialEq)]
pub enum ProgressEvent {
    /// A vertex (build step) changed state; every message carries its full state.
    Vertex {
        /// Vertex digest (identity).
        digest: String,
        /// Display name, e.g. `[2/2] RUN echo hello`.
        name: String,
        /// The step's result came from the cache.
        cached: bool,
        /// When the step started, if it has.
        started: Option<SystemTime>,
        /// When the step completed, if it has.
        completed: Option<SystemTime>,
        /// Error text when the step failed.
        error: Option<String>,
    },
    /// A sub-task of a vertex (a transfer, a layer pull).
    Status {
        /// The vertex this status belongs to.
        vertex: String,
        /// Status id, also its display text (`transferring context:`).
        id: String,
        /// Bytes or items done so far.
        current: i64,
        /// Total, `0` when unknown.
        total: i64,
        /// Time of this update.
        timestamp: Option<SystemTime>,
        /// When the sub-task started.
        started: Option<SystemTime>,
        /// When the sub-task completed.
        completed: Option<SystemTime>,
    },
    /// Output of a step (a `RUN` command's stdout or stderr).
    Log {
        /// The vertex that produced it.
        vertex: String,
        /// When the daemon received it.
        timestamp: Option<SystemTime>,
        /// 1 = stdout, 2 = stderr.
        stream: i64,
        /// Raw bytes; lines may be split across events.
        data: Vec<u8>,
    },
    /// A warning attached to a vertex.
    Warning {
        /// The vertex it refers to.
        vertex: String,
        /// Severity level.
        level: i64,
        /// One-line summary.
        short: String,
        /// Further lines.
        detail: Vec<String>,
        /// Documentation link, may be empty.
        url: String,
    },
}

fn time(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    ts.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

impl ProgressEvent {
    /// Decodes one status message into events: vertices first, then statuses,
    /// warnings and logs, each in message order.
    pub fn from_status(response: &StatusResponse) -> Vec<ProgressEvent> {
        let mut events = Vec::new();
        for v in &response.vertexes {
            events.push(ProgressEvent::Vertex {
                digest: v.digest.clone(),
                name: v.name.clone(),
                cached: v.cached,
                started: time(&v.started),
                completed: time(&v.completed),
                error: (!v.error.is_empty()).then(|| v.error.clone()),
            });
        }
        for s in &response.statuses {
            events.push(ProgressEvent::Status {
                vertex: s.vertex.clone(),
                id: s.id.clone(),
                current: s.current,
                total: s.total,
                timestamp: time(&s.timestamp),
                started: time(&s.started),
                completed: time(&s.completed),
            });
        }
        for w in &response.warnings {
            events.push(ProgressEvent::Warning {
                vertex: w.vertex.clone(),
                level: w.level,
                short: String::from_utf8_lossy(&w.short).into_owned(),
                detail: w
                    .detail
                    .iter()
                    .map(|d| String::from_utf8_lossy(d).into_owned())
                    .collect(),
                url: w.url.clone(),
            });
        }
        for l in &response.logs {
            events.push(ProgressEvent::Log {
                vertex: l.vertex.clone(),
                timestamp: time(&l.timestamp),
                stream: l.stream,
                data: l.msg.clone(),
            });
        }
        events
    }
}

/// Seconds from `from` to `to`, `0.0` when either is unknown or time ran backwards.
fn seconds(from: Option<SystemTime>, to: Option<SystemTime>) -> f64 {
    match (from, to) {
        (Some(from), Some(to)) => to
            .duration_since(from)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Formats a byte count the way BuildKit's progress output does (decimal
/// units, two decimals above 1000: `38B`, `32.87kB`, `2.81MB`).
pub fn format_bytes(n: i64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n.abs() < 1000 {
        return format!("{n}B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value.abs() < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.2}{unit}")
}

/// Log-line time prefix: seconds since the vertex started, with 3 decimals
/// under 10 s, 2 under 100 s, 1 above (as BuildKit's plain output).
fn log_time(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.3}")
    } else if seconds < 100.0 {
        format!("{seconds:.2}")
    } else {
        format!("{seconds:.1}")
    }
}

#[derive(Debug, Default)]
struct VertexState {
    index: usize,
    name: String,
    cached: bool,
    started: Option<SystemTime>,
    completed: Option<SystemTime>,
    error: Option<String>,
    done_printed: bool,
    /// Bytes of an unterminated log line, with the time of its first chunk.
    partial_log: Vec<u8>,
    partial_time: Option<SystemTime>,
    /// Status id → (completed printed, timestamp of the last printed update).
    statuses: HashMap<String, (bool, Option<SystemTime>)>,
}

/// Renders progress as `buildctl --progress=plain` text.
///
/// Feed every [`StatusResponse`] to [`PlainPrinter::handle`] in arrival order,
/// then call [`PlainPrinter::finish`] once the stream ends.
#[derive(Debug)]
pub struct PlainPrinter<W: Write> {
    out: W,
    vertices: HashMap<String, VertexState>,
    next_index: usize,
    /// The vertex whose block is open (printed last and not yet completed).
    current: Option<String>,
    /// At least one block was printed (blocks are separated by a blank line).
    printed_any: bool,
}

/// Minimum spacing, in seconds, between two printed updates of the same
/// unfinished status (BuildKit throttles these in plain mode too).
const STATUS_INTERVAL: f64 = 1.0;

impl<W: Write> PlainPrinter<W> {
    /// A printer writing to `out` (the CLI passes stderr).
    pub fn new(out: W) -> Self {
        PlainPrinter {
            out,
            vertices: HashMap::new(),
            next_index: 0,
            current: None,
            printed_any: false,
        }
    }

    /// Gives the writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Renders one status message.
    pub fn handle(&mut self, response: &StatusResponse) -> io::Result<()> {
        for event in ProgressEvent::from_status(response) {
            self.event(event)?;
        }
        self.out.flush()
    }

    /// Renders one event.
    pub fn event(&mut self, event: ProgressEvent) -> io::Result<()> {
        match event {
            ProgressEvent::Vertex {
                digest,
                name,
                cached,
                started,
                completed,
                error,
            } => {
                let v = self.vertex(&digest);
                if v.done_printed {
                    return Ok(());
                }
                v.name = name;
                v.cached = cached;
                if started.is_some() {
                    v.started = started;
                }
                if completed.is_some() {
                    v.completed = completed;
                }
                if error.is_some() {
                    v.error = error;
                }
                let visible = v.started.is_some() || v.cached || v.error.is_some();
                if visible {
                    self.open(&digest)?;
                    self.complete_if_done(&digest)?;
                }
            }
            ProgressEvent::Status {
                vertex,
                id,
                current,
                total,
                timestamp,
                started,
                completed,
            } => {
                let v = self.vertex(&vertex);
                let (done_printed, last) = v.statuses.get(&id).copied().unwrap_or((false, None));
                let due = match completed {
                    Some(_) => !done_printed,
                    None => {
                        !done_printed
                            && (last.is_none() || seconds(last, timestamp) >= STATUS_INTERVAL)
                    }
                };
                if !due || v.done_printed {
                    return Ok(());
                }
                v.statuses
                    .insert(id.clone(), (completed.is_some(), timestamp));
                let mut line = id;
                if total != 0 {
                    line.push_str(&format!(
                        " {} / {}",
                        format_bytes(current),
                        format_bytes(total)
                    ));
                } else if current != 0 {
                    line.push_str(&format!(" {}", format_bytes(current)));
                }
                if started.is_some() {
                    let elapsed = seconds(started, completed.or(timestamp));
                    if elapsed > 0.01 {
                        line.push_str(&format!(" {elapsed:.1}s"));
                    }
                }
                if completed.is_some() {
                    line.push_str(" done");
                }
                self.open(&vertex)?;
                let index = self.vertex(&vertex).index;
                writeln!(self.out, "#{index} {line}")?;
            }
            ProgressEvent::Warning {
                vertex,
                short,
                detail,
                url,
                ..
            } => {
                self.open(&vertex)?;
                let index = self.vertex(&vertex).index;
                writeln!(self.out, "#{index} WARN: {short}")?;
                for d in detail {
                    writeln!(self.out, "#{index} {d}")?;
                }
                if !url.is_empty() {
                    writeln!(self.out, "#{index} More info: {url}")?;
                }
            }
            ProgressEvent::Log {
                vertex,
                timestamp,
                data,
                ..
            } => {
                self.open(&vertex)?;
                let v = self.vertex(&vertex);
                let mut rest: &[u8] = &data;
                let mut lines = Vec::new();
                while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
                    let mut line = std::mem::take(&mut v.partial_log);
                    let at = v.partial_time.take().or(timestamp);
                    line.extend_from_slice(&rest[..pos]);
                    lines.push((line, at));
                    rest = &rest[pos + 1..];
                }
                if !rest.is_empty() {
                    if v.partial_log.is_empty() {
                        v.partial_time = timestamp;
                    }
                    v.partial_log.extend_from_slice(rest);
                }
                let (index, started) = (v.index, v.started);
                for (line, at) in lines {
                    self.write_log(index, started, at, &line)?;
                }
            }
        }
        Ok(())
    }

    /// Ends the rendering: flushes unterminated log lines and marks blocks of
    /// vertices that never completed with `#N ...`.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Some(current) = self.current.take() {
            self.flush_partial(&current)?;
            let index = self.vertex(&current).index;
            writeln!(self.out, "#{index} ...")?;
        }
        self.out.flush()
    }

    fn vertex(&mut self, digest: &str) -> &mut VertexState {
        self.vertices.entry(digest.to_string()).or_default()
    }

    /// Makes `digest` the open block: numbers it on first appearance, closes
    /// the previous unfinished block with `#N ...`, prints the header once.
    fn open(&mut self, digest: &str) -> io::Result<()> {
        if self.vertex(digest).index == 0 {
            self.next_index += 1;
            let index = self.next_index;
            self.vertex(digest).index = index;
        }
        if self.current.as_deref() != Some(digest) {
            if let Some(previous) = self.current.take() {
                self.flush_partial(&previous)?;
                let index = self.vertex(&previous).index;
                writeln!(self.out, "#{index} ...")?;
            }
            if self.printed_any {
                writeln!(self.out)?;
            }
            self.printed_any = true;
            self.current = Some(digest.to_string());
            let v = self.vertex(digest);
            let index = v.index;
            // The name is printed again when a block is resumed (as buildctl
            // does), so interleaved output stays attributable.
            let name = v.name.clone();
            writeln!(self.out, "#{index} {name}")?;
        }
        Ok(())
    }

    fn complete_if_done(&mut self, digest: &str) -> io::Result<()> {
        let v = self.vertex(digest);
        if v.done_printed || !(v.completed.is_some() || v.error.is_some()) {
            return Ok(());
        }
        self.flush_partial(digest)?;
        let v = self.vertex(digest);
        v.done_printed = true;
        let index = v.index;
        let (error, cached) = (v.error.clone(), v.cached);
        let elapsed = seconds(v.started, v.completed);
        if let Some(error) = error {
            if error.ends_with("context canceled") {
                writeln!(self.out, "#{index} CANCELED")?;
            } else {
                writeln!(self.out, "#{index} ERROR: {error}")?;
            }
        } else if cached {
            writeln!(self.out, "#{index} CACHED")?;
        } else {
            writeln!(self.out, "#{index} DONE {elapsed:.1}s")?;
        }
        if self.current.as_deref() == Some(digest) {
            self.current = None;
        }
        Ok(())
    }

    fn flush_partial(&mut self, digest: &str) -> io::Result<()> {
        let v = self.vertex(digest);
        if v.partial_log.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut v.partial_log);
        let at = v.partial_time.take();
        let (index, started) = (v.index, v.started);
        self.write_log(index, started, at, &line)
    }

    fn write_log(
        &mut self,
        index: usize,
        started: Option<SystemTime>,
        at: Option<SystemTime>,
        line: &[u8],
    ) -> io::Result<()> {
        let line = String::from_utf8_lossy(line);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        writeln!(
            self.out,
            "#{index} {} {line}",
            log_time(seconds(started, at))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::moby::buildkit::v1::{Vertex, VertexLog, VertexStatus};
    use prost_types::Timestamp;

    /// Timestamp at `ms` milliseconds after an arbitrary epoch.
    fn ts(ms: i64) -> Option<Timestamp> {
        Some(Timestamp {
            seconds: 1_700_000_000 + ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        })
    }

    fn vertex(digest: &str, name: &str, started: Option<i64>, completed: Option<i64>) -> Vertex {
        Vertex {
            digest: digest.into(),
            name: name.into(),
            started: started.and_then(ts),
            completed: completed.and_then(ts),
            ..Default::default()
        }
    }

    fn render(messages: &[StatusResponse]) -> String {
        let mut printer = PlainPrinter::new(Vec::new());
        for m in messages {
            printer.handle(m).unwrap();
        }
        printer.finish().unwrap();
        String::from_utf8(printer.into_inner()).unwrap()
    }

    /// A recorded sequence of a two-step Dockerfile build: load definition
    /// with a transfer status, a cached step, then a RUN with output.
    fn recorded_build() -> Vec<StatusResponse> {
        let load = "sha256:load";
        let base = "sha256:base";
        let run = "sha256:run";
        vec![
            StatusResponse {
                vertexes: vec![vertex(
                    load,
                    "[internal] load build definition from Dockerfile",
                    Some(0),
                    None,
                )],
                ..Default::default()
            },
            StatusResponse {
                statuses: vec![VertexStatus {
                    id: "transferring dockerfile:".into(),
                    vertex: load.into(),
                    current: 38,
                    timestamp: ts(4),
                    started: ts(1),
                    completed: ts(4),
                    ..Default::default()
                }],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![vertex(
                    load,
                    "[internal] load build definition from Dockerfile",
                    Some(0),
                    Some(20),
                )],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![Vertex {
                    cached: true,
                    ..vertex(
                        base,
                        "[1/2] FROM 127.0.0.1:5000/busybox:latest",
                        Some(30),
                        Some(30),
                    )
                }],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![vertex(
                    run,
                    "[2/2] RUN echo hello > /hello",
                    Some(100),
                    None,
                )],
                ..Default::default()
            },
            StatusResponse {
                logs: vec![VertexLog {
                    vertex: run.into(),
                    timestamp: ts(223),
                    stream: 1,
                    msg: b"hello\nwor".to_vec(),
                }],
                ..Default::default()
            },
            StatusResponse {
                logs: vec![VertexLog {
                    vertex: run.into(),
                    timestamp: ts(300),
                    stream: 2,
                    msg: b"ld\n".to_vec(),
                }],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![vertex(
                    run,
                    "[2/2] RUN echo hello > /hello",
                    Some(100),
                    Some(1350),
                )],
                ..Default::default()
            },
        ]
    }

    #[test]
    fn renders_plain_like_buildctl() {
        let expected = "\
#1 [internal] load build definition from Dockerfile
#1 transferring dockerfile: 38B done
#1 DONE 0.0s

#2 [1/2] FROM 127.0.0.1:5000/busybox:latest
#2 CACHED

#3 [2/2] RUN echo hello > /hello
#3 0.123 hello
#3 0.123 world
#3 DONE 1.2s
";
        assert_eq!(render(&recorded_build()), expected);
    }

    #[test]
    fn error_and_interleaving() {
        let a = "sha256:a";
        let b = "sha256:b";
        let messages = vec![
            StatusResponse {
                vertexes: vec![
                    vertex(a, "[2/3] RUN sleep 1", Some(0), None),
                    vertex(b, "[3/3] RUN false", Some(0), None),
                ],
                ..Default::default()
            },
            StatusResponse {
                logs: vec![VertexLog {
                    vertex: a.into(),
                    timestamp: ts(12_345),
                    stream: 1,
                    msg: b"late\n".to_vec(),
                }],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![Vertex {
                    error:
                        "process \"/bin/sh -c false\" did not complete successfully: exit code: 1"
                            .into(),
                    ..vertex(b, "[3/3] RUN false", Some(0), Some(500))
                }],
                ..Default::default()
            },
        ];
        let expected = "\
#1 [2/3] RUN sleep 1
#1 ...

#2 [3/3] RUN false
#2 ...

#1 [2/3] RUN sleep 1
#1 12.35 late
#1 ...

#2 [3/3] RUN false
#2 ERROR: process \"/bin/sh -c false\" did not complete successfully: exit code: 1
";
        assert_eq!(render(&messages), expected);
    }

    #[test]
    fn unfinished_partial_line_is_flushed_on_finish() {
        let v = "sha256:v";
        let messages = vec![
            StatusResponse {
                vertexes: vec![vertex(v, "[1/1] RUN printf x", Some(0), None)],
                ..Default::default()
            },
            StatusResponse {
                logs: vec![VertexLog {
                    vertex: v.into(),
                    timestamp: ts(5),
                    stream: 1,
                    msg: b"no newline".to_vec(),
                }],
                ..Default::default()
            },
        ];
        assert_eq!(
            render(&messages),
            "#1 [1/1] RUN printf x\n#1 0.005 no newline\n#1 ...\n"
        );
    }

    #[test]
    fn unstarted_vertices_are_not_printed_and_numbering_follows_appearance() {
        let messages = vec![
            StatusResponse {
                vertexes: vec![
                    vertex("sha256:later", "[2/2] COPY . .", None, None),
                    vertex("sha256:first", "[1/2] FROM x", Some(0), Some(1000)),
                ],
                ..Default::default()
            },
            StatusResponse {
                vertexes: vec![vertex(
                    "sha256:later",
                    "[2/2] COPY . .",
                    Some(1000),
                    Some(1100),
                )],
                ..Default::default()
            },
        ];
        assert_eq!(
            render(&messages),
            "#1 [1/2] FROM x\n#1 DONE 1.0s\n\n#2 [2/2] COPY . .\n#2 DONE 0.1s\n"
        );
    }

    #[test]
    fn in_progress_statuses_are_throttled_and_show_totals() {
        let v = "sha256:pull";
        let status = |current: i64, at: i64, done: bool| VertexStatus {
            id: "sha256:abc".into(),
            vertex: v.into(),
            current,
            total: 2_810_000,
            timestamp: ts(at),
            started: ts(0),
            completed: if done { ts(at) } else { None },
            ..Default::default()
        };
        let messages = vec![
            StatusResponse {
                vertexes: vec![vertex(v, "[1/1] FROM r/busybox", Some(0), None)],
                statuses: vec![status(1000, 100, false)],
                ..Default::default()
            },
            StatusResponse {
                statuses: vec![status(2000, 500, false)],
                ..Default::default()
            },
            StatusResponse {
                statuses: vec![status(2_810_000, 1200, true)],
                ..Default::default()
            },
        ];
        assert_eq!(
            render(&messages),
            "#1 [1/1] FROM r/busybox\n\
             #1 sha256:abc 1.00kB / 2.81MB 0.1s\n\
             #1 sha256:abc 2.81MB / 2.81MB 1.2s done\n\
             #1 ...\n"
        );
    }

    #[test]
    fn canceled_vertex() {
        let messages = vec![StatusResponse {
            vertexes: vec![Vertex {
                error: "failed: context canceled".into(),
                ..vertex("sha256:c", "[1/1] RUN sleep 100", Some(0), Some(10))
            }],
            ..Default::default()
        }];
        assert_eq!(render(&messages), "#1 [1/1] RUN sleep 100\n#1 CANCELED\n");
    }

    #[test]
    fn bytes_format() {
        assert_eq!(format_bytes(0), "0B");
        assert_eq!(format_bytes(38), "38B");
        assert_eq!(format_bytes(32_870), "32.87kB");
        assert_eq!(format_bytes(2_810_000), "2.81MB");
    }

    #[test]
    fn events_decode_in_order() {
        let events = ProgressEvent::from_status(&recorded_build()[1]);
        assert_eq!(events.len(), 1);
        match &events[0] {
            ProgressEvent::Status {
                id, current, total, ..
            } => {
                assert_eq!(id, "transferring dockerfile:");
                assert_eq!((*current, *total), (38, 0));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rawjson_golden() {
        let mut printer = RawJsonPrinter::new(Vec::new());
        let mut messages = recorded_build();
        messages[4].vertexes[0].inputs = vec!["sha256:base".into()];
        for m in &messages {
            printer.handle(m).unwrap();
        }
        printer.finish().unwrap();
        let text = String::from_utf8(printer.into_inner()).unwrap();
        let expected = r#"{"vertexes":[{"digest":"sha256:load","name":"[internal] load build definition from Dockerfile","started":"2023-11-14T22:13:20Z"}]}
{"statuses":[{"id":"transferring dockerfile:","vertex":"sha256:load","current":38,"timestamp":"2023-11-14T22:13:20.004Z","started":"2023-11-14T22:13:20.001Z","completed":"2023-11-14T22:13:20.004Z"}]}
{"vertexes":[{"digest":"sha256:load","name":"[internal] load build definition from Dockerfile","started":"2023-11-14T22:13:20Z","completed":"2023-11-14T22:13:20.02Z"}]}
{"vertexes":[{"digest":"sha256:base","name":"[1/2] FROM 127.0.0.1:5000/busybox:latest","started":"2023-11-14T22:13:20.03Z","completed":"2023-11-14T22:13:20.03Z","cached":true}]}
{"vertexes":[{"digest":"sha256:run","inputs":["sha256:base"],"name":"[2/2] RUN echo hello > /hello","started":"2023-11-14T22:13:20.1Z"}]}
{"logs":[{"vertex":"sha256:run","stream":1,"data":"aGVsbG8Kd29y","timestamp":"2023-11-14T22:13:20.223Z"}]}
{"logs":[{"vertex":"sha256:run","stream":2,"data":"bGQK","timestamp":"2023-11-14T22:13:20.3Z"}]}
{"vertexes":[{"digest":"sha256:run","name":"[2/2] RUN echo hello > /hello","started":"2023-11-14T22:13:20.1Z","completed":"2023-11-14T22:13:21.35Z"}]}
"#;
        assert_eq!(text, expected);
        // Every line is one JSON object and log data decodes back.
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(value.is_object());
        }
    }

    #[test]
    fn rfc3339_nano_trims_and_defaults() {
        let t = Timestamp {
            seconds: 0,
            nanos: 120_000_000,
        };
        assert_eq!(rfc3339_nano(Some(&t)), "1970-01-01T00:00:00.12Z");
        assert_eq!(rfc3339_nano(None), "0001-01-01T00:00:00Z");
    }

    fn at(ms: i64) -> SystemTime {
        SystemTime::try_from(ts(ms).unwrap()).unwrap()
    }

    #[test]
    fn tty_frame_shows_running_step_with_logs_and_timer() {
        let mut printer = TtyPrinter::new(Vec::new(), 60, false);
        // Up to the RUN's first log line (its completion not yet seen).
        for m in &recorded_build()[..6] {
            printer.update(m);
        }
        let frame = printer.frame(at(1100), false).join("\n");
        let expected = "\
[+] Building 1.1s (2/3)
 => [internal] load build definition from Dockerfile    0.0s
 => => transferring dockerfile: 38B                     0.0s
 => CACHED [1/2] FROM 127.0.0.1:5000/busybox:latest     0.0s
 => [2/2] RUN echo hello > /hello                       1.0s
 => => # hello";
        assert_eq!(frame, expected);
    }

    #[test]
    fn tty_redraw_moves_over_previous_frame_and_colors_unless_disabled() {
        let messages = recorded_build();
        let mut printer = TtyPrinter::new(Vec::new(), 60, true);
        printer.update(&messages[0]);
        printer.redraw(at(10)).unwrap();
        printer.update(&messages[2]);
        printer.redraw(at(30)).unwrap();
        let out = String::from_utf8(printer.into_inner()).unwrap();
        // First frame: 2 lines; the second starts by moving up over them.
        let second = out.split("\x1b[J").nth(1).unwrap();
        assert!(second.starts_with("\x1b[2A\r[+] Building"), "{second:?}");
        assert!(second.contains("\x1b[34m => [internal] load build definition"));

        let mut plain = TtyPrinter::new(Vec::new(), 60, false);
        plain.update(&messages[0]);
        plain.update(&messages[2]);
        plain.redraw(at(30)).unwrap();
        let out = String::from_utf8(plain.into_inner()).unwrap();
        assert!(!out.contains("\x1b[34m"));
    }

    #[test]
    fn tty_final_frame_collapses_finished_steps_and_keeps_errors() {
        let mut printer = TtyPrinter::new(Vec::new(), 60, false);
        for m in &recorded_build() {
            printer.update(m);
        }
        printer.update(&StatusResponse {
            vertexes: vec![Vertex {
                error: "exit code: 1".into(),
                ..vertex("sha256:bad", "[3/3] RUN false", Some(1400), Some(1500))
            }],
            logs: vec![VertexLog {
                vertex: "sha256:bad".into(),
                timestamp: ts(1450),
                stream: 2,
                msg: b"boom\n".to_vec(),
            }],
            ..Default::default()
        });
        let frame = printer.frame(at(2000), true);
        assert!(!frame.iter().any(|l| l.contains("# hello")));
        assert!(frame
            .iter()
            .any(|l| l.starts_with(" => ERROR [3/3] RUN false")));
        assert!(frame.iter().any(|l| l == " => => # boom"));
        assert!(frame[0].ends_with("(4/4) FINISHED"), "{}", frame[0]);
    }
}
