//! `--progress=rawjson`: one JSON object per status message, in the shape
//! buildctl writes (`client.SolveStatus` of BuildKit's Go client): empty
//! lists and unset fields are left out, times are RFC 3339 with trimmed
//! nanoseconds in UTC, log data is base64.

use std::io::{self, Write};

use base64::Engine as _;
use kiln_proto::moby::buildkit::v1::StatusResponse;
use serde::Serialize;

/// Writes every [`StatusResponse`] as one line of JSON.
#[derive(Debug)]
pub struct RawJsonPrinter<W: Write> {
    out: W,
}

#[derive(Serialize)]
struct SolveStatus {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    vertexes: Vec<JsonVertex>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    statuses: Vec<JsonStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    logs: Vec<JsonLog>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<JsonWarning>,
}

#[derive(Serialize)]
struct JsonVertex {
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cached: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

#[derive(Serialize)]
struct JsonStatus {
    id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    vertex: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "is_zero")]
    total: i64,
    current: i64,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed: Option<String>,
}

#[derive(Serialize)]
struct JsonLog {
    #[serde(skip_serializing_if = "String::is_empty")]
    vertex: String,
    #[serde(skip_serializing_if = "is_zero")]
    stream: i64,
    data: String,
    timestamp: String,
}

#[derive(Serialize)]
struct JsonWarning {
    #[serde(skip_serializing_if = "String::is_empty")]
    vertex: String,
    #[serde(skip_serializing_if = "is_zero")]
    level: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    short: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    detail: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    url: String,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Go's `time.RFC3339Nano` of a protobuf timestamp in UTC
/// (`2023-11-14T22:13:20.123Z`; trailing zeros of the fraction dropped).
/// An unset timestamp is Go's zero time, as `encoding/json` writes it.
pub fn rfc3339_nano(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return "0001-01-01T00:00:00Z".to_string();
    };
    let nanos = u32::try_from(ts.nanos).unwrap_or(0);
    let Some(time) = chrono::DateTime::from_timestamp(ts.seconds, nanos) else {
        return "0001-01-01T00:00:00Z".to_string();
    };
    let mut text = time.format("%Y-%m-%dT%H:%M:%S").to_string();
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl<W: Write> RawJsonPrinter<W> {
    /// A printer writing to `out` (the CLI passes stderr).
    pub fn new(out: W) -> Self {
        RawJsonPrinter { out }
    }

    /// Gives the writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Writes one status message as one line.
    pub fn handle(&mut self, response: &StatusResponse) -> io::Result<()> {
        let status = SolveStatus {
            vertexes: response
                .vertexes
                .iter()
                .map(|v| JsonVertex {
                    digest: v.digest.clone(),
                    inputs: v.inputs.clone(),
                    name: v.name.clone(),
                    started: v.started.as_ref().map(|t| rfc3339_nano(Some(t))),
                    completed: v.completed.as_ref().map(|t| rfc3339_nano(Some(t))),
                    cached: v.cached,
                    error: v.error.clone(),
                })
                .collect(),
            statuses: response
                .statuses
                .iter()
                .map(|s| JsonStatus {
                    id: s.id.clone(),
                    vertex: s.vertex.clone(),
                    name: s.name.clone(),
                    total: s.total,
                    current: s.current,
                    timestamp: rfc3339_nano(s.timestamp.as_ref()),
                    started: s.started.as_ref().map(|t| rfc3339_nano(Some(t))),
                    completed: s.completed.as_ref().map(|t| rfc3339_nano(Some(t))),
                })
                .collect(),
            logs: response
                .logs
                .iter()
                .map(|l| JsonLog {
                    vertex: l.vertex.clone(),
                    stream: l.stream,
                    data: b64(&l.msg),
                    timestamp: rfc3339_nano(l.timestamp.as_ref()),
                })
                .collect(),
            warnings: response
                .warnings
                .iter()
                .map(|w| JsonWarning {
                    vertex: w.vertex.clone(),
                    level: w.level,
                    short: b64(&w.short),
                    detail: w.detail.iter().map(|d| b64(d)).collect(),
                    url: w.url.clone(),
                })
                .collect(),
        };
        serde_json::to_writer(&mut self.out, &status).map_err(io::Error::other)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// Ends the stream (nothing is buffered; flushes the writer).
    pub fn finish(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
