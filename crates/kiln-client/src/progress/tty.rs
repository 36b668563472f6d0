//! `--progress=tty`: a live view redrawn in place, like buildx's.
//!
//! ```text
//! [+] Building 1.4s (3/4)
//!  => [internal] load build definition from Dockerfile         0.0s
//!  => CACHED [1/2] FROM 127.0.0.1:5000/busybox:latest          0.0s
//!  => [2/2] RUN echo hello                                     1.2s
//!  => => # hello
//! ```
//!
//! Each redraw moves the cursor up over the previous frame (`ESC[nA`),
//! rewrites every line (`ESC[K` clears its rest) and clears what is left
//! below (`ESC[J`). Running steps show their last [`LOG_LINES`] log lines;
//! finished steps collapse to one line. Colours (blue done, red error) are
//! left out when the caller says so (`NO_COLOR`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::time::SystemTime;

use kiln_proto::moby::buildkit::v1::StatusResponse;

use super::{format_bytes, seconds, ProgressEvent};

/// How many of a running step's last log lines are shown.
pub const LOG_LINES: usize = 6;

#[derive(Debug, Default)]
struct TtyVertex {
    name: String,
    cached: bool,
    started: Option<SystemTime>,
    completed: Option<SystemTime>,
    error: Option<String>,
    logs: VecDeque<String>,
    partial: Vec<u8>,
    /// Status id → (current, total, started, completed), in first-seen order.
    statuses: Vec<StatusLine>,
}

/// A sub-task: id, current, total, started, completed.
type StatusLine = (String, i64, i64, Option<SystemTime>, Option<SystemTime>);

/// Renders progress as a live, redrawn view.
#[derive(Debug)]
pub struct TtyPrinter<W: Write> {
    out: W,
    width: usize,
    color: bool,
    order: Vec<String>,
    vertices: HashMap<String, TtyVertex>,
    first_start: Option<SystemTime>,
    /// Lines of the frame on screen, to move back over.
    drawn: usize,
}

impl<W: Write> TtyPrinter<W> {
    /// A printer writing to `out` (a terminal `width` columns wide); `color`
    /// false leaves out ANSI colours (cursor movement stays).
    pub fn new(out: W, width: usize, color: bool) -> Self {
        TtyPrinter {
            out,
            width: width.max(40),
            color,
            order: Vec::new(),
            vertices: HashMap::new(),
            first_start: None,
            drawn: 0,
        }
    }

    /// Gives the writer back.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Takes one status message into the view and redraws it.
    pub fn handle(&mut self, response: &StatusResponse) -> io::Result<()> {
        self.update(response);
        self.redraw(SystemTime::now())
    }

    /// Takes one status message into the view without drawing.
    pub fn update(&mut self, response: &StatusResponse) {
        for event in ProgressEvent::from_status(response) {
            self.event(event);
        }
    }

    /// Redraws the view as of `now` (the CLI calls this on a timer too, so
    /// running steps' timers advance).
    pub fn redraw(&mut self, now: SystemTime) -> io::Result<()> {
        let frame = self.frame(now, false);
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A\r", self.drawn));
        }
        for line in &frame {
            text.push_str(line);
            text.push_str("\x1b[K\n");
        }
        text.push_str("\x1b[J");
        self.drawn = frame.len();
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    /// Draws the final frame: every step collapsed, failed steps keep their
    /// last log lines.
    pub fn finish(&mut self) -> io::Result<()> {
        let now = SystemTime::now();
        let frame = self.frame(now, true);
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A\r", self.drawn));
        }
        for line in &frame {
            text.push_str(line);
            text.push_str("\x1b[K\n");
        }
        text.push_str("\x1b[J");
        self.drawn = 0;
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    fn event(&mut self, event: ProgressEvent) {
        match event {
            ProgressEvent::Vertex {
                digest,
                name,
                cached,
                started,
                completed,
                error,
            } => {
                if started.is_some() {
                    self.first_start = match self.first_start {
                        Some(first) => Some(first.min(started.unwrap_or(first))),
                        None => started,
                    };
                }
                let visible = started.is_some() || cached || error.is_some();
                let v = self.vertices.entry(digest.clone()).or_default();
                v.name = name;
                v.cached = cached;
                v.started = started.or(v.started);
                v.completed = completed.or(v.completed);
                v.error = error.or(v.error.take());
                // Announced but not started: shown once it starts.
                if visible && !self.order.contains(&digest) {
                    self.order.push(digest);
                }
            }
            ProgressEvent::Status {
                vertex,
                id,
                current,
                total,
                started,
                completed,
                ..
            } => {
                let v = self.vertices.entry(vertex).or_default();
                match v.statuses.iter_mut().find(|s| s.0 == id) {
                    Some(s) => {
                        s.1 = current;
                        s.2 = total;
                        s.3 = started.or(s.3);
                        s.4 = completed.or(s.4);
                    }
                    None => v.statuses.push((id, current, total, started, completed)),
                }
            }
            ProgressEvent::Log { vertex, data, .. } => {
                let v = self.vertices.entry(vertex).or_default();
                v.partial.extend_from_slice(&data);
                while let Some(pos) = v.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = v.partial.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]);
                    let line = line.trim_end_matches('\r').to_string();
                    v.logs.push_back(line);
                    if v.logs.len() > LOG_LINES {
                        v.logs.pop_front();
                    }
                }
            }
            ProgressEvent::Warning { .. } => {}
        }
    }

    /// The lines of the view as of `now`; `last` collapses running steps'
    /// logs (the build is over) but keeps failed steps' logs.
    pub fn frame(&self, now: SystemTime, last: bool) -> Vec<String> {
        let done = self
            .order
            .iter()
            .filter(|d| {
                self.vertices
                    .get(*d)
                    .is_some_and(|v| v.completed.is_some() || v.cached)
            })
            .count();
        let total = self.vertices.len();
        let mut lines = vec![format!(
            "[+] Building {:.1}s ({done}/{total}){}",
            seconds(self.first_start, Some(now)),
            if last { " FINISHED" } else { "" }
        )];
        for digest in &self.order {
            let Some(v) = self.vertices.get(digest) else {
                continue;
            };
            let finished = v.completed.is_some() || v.cached;
            let elapsed = seconds(v.started, v.completed.or(Some(now)));
            let prefix = if v.error.is_some() {
                "ERROR "
            } else if v.cached {
                "CACHED "
            } else {
                ""
            };
            let timer = format!("{elapsed:.1}s");
            let (open, close) = match (self.color, &v.error, finished) {
                (false, _, _) => ("", ""),
                (true, Some(_), _) => ("\x1b[31m", "\x1b[0m"),
                (true, None, true) => ("\x1b[34m", "\x1b[0m"),
                (true, None, false) => ("", ""),
            };
            lines.push(format!(
                "{open}{}{close}",
                self.fit(&format!(" => {prefix}{}", v.name), &timer)
            ));
            for (id, current, total, started, completed) in &v.statuses {
                let mut text = format!(" => => {id}");
                if *total != 0 {
                    text.push_str(&format!(
                        " {} / {}",
                        format_bytes(*current),
                        format_bytes(*total)
                    ));
                } else if *current != 0 {
                    text.push_str(&format!(" {}", format_bytes(*current)));
                }
                let elapsed = seconds(*started, completed.or(Some(now)));
                lines.push(format!(
                    "{open}{}{close}",
                    self.fit(&text, &format!("{elapsed:.1}s"))
                ));
            }
            let show_logs = if last {
                v.error.is_some()
            } else {
                !finished || v.error.is_some()
            };
            if show_logs {
                for log in &v.logs {
                    lines.push(truncate(&format!(" => => # {log}"), self.width));
                }
            }
        }
        lines
    }

    /// `left` padded (or cut) so `right` ends at the last column.
    fn fit(&self, left: &str, right: &str) -> String {
        let room = self.width.saturating_sub(right.chars().count() + 1);
        let left = truncate(left, room);
        let pad = room.saturating_sub(left.chars().count());
        format!("{left}{} {right}", " ".repeat(pad))
    }
}

fn truncate(text: &str, width: usize) -> String {
    text.chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .map(|c| if c == '\t' { ' ' } else { c })
        .take(width)
        .collect()
}
