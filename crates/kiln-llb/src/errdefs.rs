//! The source lines an error points at, as BuildKit carries them in a gRPC status:
//! an `errdefs.Source` detail (the file's name and text, and line ranges) that the client
//! renders above the error — `Dockerfile:3`, the lines around it with `>>>` on the offending
//! ones. kiln adds a second, one-line range with characters when one word is at fault, drawn
//! as a `^^^` marker (upstream clients just mark that line again).

use kiln_proto::errdefs::Source;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::pb;
use prost::Message;

/// The type URL of BuildKit's `errdefs.Source` detail (the message's full name, as upstream's
/// `typeurl` writes it; a `type.googleapis.com/` prefix is accepted when reading).
pub const SOURCE_TYPE_URL: &str = "errdefs.Source";

/// The place of an error in a source file, with that file's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excerpt {
    /// The file's name as shown (`Dockerfile`).
    pub filename: String,
    /// The whole text of the file.
    pub data: Vec<u8>,
    /// First offending line, 1-based.
    pub start_line: usize,
    /// Last offending line, 1-based (`>= start_line`).
    pub end_line: usize,
    /// The offending word, when one is at fault.
    pub column: Option<Column>,
}

/// A word inside one source line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The line, 1-based.
    pub line: usize,
    /// First character of the word, 1-based (characters, not bytes).
    pub start: usize,
    /// Length of the word in characters (at least 1).
    pub width: usize,
}

fn position(line: usize, character: usize) -> Option<pb::Position> {
    Some(pb::Position {
        line: i32::try_from(line).unwrap_or(i32::MAX),
        character: i32::try_from(character).unwrap_or(i32::MAX),
    })
}

impl Excerpt {
    /// Renders the excerpt as BuildKit's client prints a failing step: the file and first
    /// line, then up to three lines before and two after with the offending lines marked
    /// `>>>`, framed by dashes; a [`Column`] adds a `^^^` line under its word.
    pub fn render(&self) -> String {
        let text = String::from_utf8_lossy(&self.data);
        let lines: Vec<&str> = text.lines().collect();
        let start = self.start_line.max(1);
        let end = self.end_line.max(start);
        let from = start.saturating_sub(3).max(1);
        let to = (end + 2).min(lines.len());
        let mut out = format!("{}:{start}\n--------------------\n", self.filename);
        for n in from..=to {
            let line = lines.get(n - 1).copied().unwrap_or_default();
            let marker = if (start..=end).contains(&n) {
                ">>>"
            } else {
                "   "
            };
            out.push_str(&format!("{n:>4} | {marker} {line}\n"));
            if let Some(column) = self.column.filter(|c| c.line == n) {
                // Tabs before the word stay tabs so the marker lines up with the source.
                let pad: String = line
                    .chars()
                    .take(column.start.saturating_sub(1))
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                out.push_str(&format!("     |     {pad}{}\n", "^".repeat(column.width)));
            }
        }
        out.push_str("--------------------\n");
        out
    }

    /// The excerpt as an `errdefs.Source` status detail.
    pub fn to_detail(&self) -> prost_types::Any {
        let mut ranges = vec![pb::Range {
            start: position(self.start_line, 0),
            end: position(self.end_line, 0),
        }];
        if let Some(column) = self.column {
            let first = column.start.saturating_sub(1);
            ranges.push(pb::Range {
                start: position(column.line, first),
                end: position(column.line, first + column.width.max(1)),
            });
        }
        let source = Source {
            info: Some(pb::SourceInfo {
                filename: self.filename.clone(),
                data: self.data.clone(),
                language: "Dockerfile".to_string(),
                ..Default::default()
            }),
            ranges,
        };
        prost_types::Any {
            type_url: SOURCE_TYPE_URL.to_string(),
            value: source.encode_to_vec(),
        }
    }

    /// Reads an `errdefs.Source` detail; `None` for any other detail or a malformed one.
    pub fn from_detail(detail: &prost_types::Any) -> Option<Self> {
        let name = detail.type_url.rsplit('/').next()?;
        if name != SOURCE_TYPE_URL {
            return None;
        }
        let source = Source::decode(detail.value.as_slice()).ok()?;
        let info = source.info?;
        let line = |p: &Option<pb::Position>| p.as_ref().map_or(0, |p| p.line.max(0) as usize);
        let character =
            |p: &Option<pb::Position>| p.as_ref().map_or(0, |p| p.character.max(0) as usize);
        let mut lines: Option<(usize, usize)> = None;
        let mut column = None;
        for range in &source.ranges {
            let (start, end) = (line(&range.start), line(&range.end).max(line(&range.start)));
            let (from, to) = (character(&range.start), character(&range.end));
            if start == end && to > from && column.is_none() {
                column = Some(Column {
                    line: start,
                    start: from + 1,
                    width: to - from,
                });
            }
            lines = Some(match lines {
                Some((s, e)) => (s.min(start), e.max(end)),
                None => (start, end),
            });
        }
        let (start_line, end_line) = lines?;
        Some(Self {
            filename: info.filename,
            data: info.data,
            start_line,
            end_line,
            column,
        })
    }
}

/// The bytes of a gRPC status's details trailer (`grpc-status-details-bin`, a
/// `google.rpc.Status`): the same code and message as the status itself, which Go clients
/// check, and the typed details.
pub fn status_details(code: i32, message: &str, details: Vec<prost_types::Any>) -> Vec<u8> {
    RpcStatus {
        code,
        message: message.to_string(),
        details,
    }
    .encode_to_vec()
}

/// The excerpts among a gRPC status's details (empty when there are none, or the bytes are
/// not a `google.rpc.Status`).
pub fn excerpts_in_status_details(bytes: &[u8]) -> Vec<Excerpt> {
    RpcStatus::decode(bytes)
        .map(|status| {
            status
                .details
                .iter()
                .filter_map(Excerpt::from_detail)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(column: Option<Column>) -> Excerpt {
        Excerpt {
            filename: "Dockerfile".into(),
            data: b"FROM a\nRUN true\nCOPY --foo=1 a b\nCMD x\n".to_vec(),
            start_line: 3,
            end_line: 3,
            column,
        }
    }

    #[test]
    fn renders_lines_and_word() {
        let excerpt = sample(Some(Column {
            line: 3,
            start: 6,
            width: 5,
        }));
        assert_eq!(
            excerpt.render(),
            "Dockerfile:3\n--------------------\n   1 |     FROM a\n   2 |     RUN true\n   3 | >>> COPY --foo=1 a b\n     |          ^^^^^\n   4 |     CMD x\n--------------------\n"
        );
    }

    #[test]
    fn details_round_trip_through_a_status() {
        for column in [
            None,
            Some(Column {
                line: 3,
                start: 6,
                width: 5,
            }),
        ] {
            let excerpt = sample(column);
            let other = prost_types::Any {
                type_url: "type.googleapis.com/errdefs.Vertex".into(),
                value: vec![10, 1, b'x'],
            };
            let bytes = status_details(2, "boom", vec![other, excerpt.to_detail()]);
            assert_eq!(excerpts_in_status_details(&bytes), vec![excerpt]);
        }
        assert!(excerpts_in_status_details(b"\xff\xff").is_empty());
    }

    #[test]
    fn reads_upstream_ranges_and_prefixed_type_urls() {
        // Upstream sends line ranges with character 0, possibly several.
        let source = Source {
            info: Some(pb::SourceInfo {
                filename: "Dockerfile".into(),
                data: b"FROM a\nRUN a \\\n  b\nCMD x\n".to_vec(),
                ..Default::default()
            }),
            ranges: vec![pb::Range {
                start: position(2, 0),
                end: position(3, 0),
            }],
        };
        let detail = prost_types::Any {
            type_url: "type.googleapis.com/errdefs.Source".into(),
            value: source.encode_to_vec(),
        };
        let excerpt = Excerpt::from_detail(&detail).unwrap();
        assert_eq!((excerpt.start_line, excerpt.end_line), (2, 3));
        assert_eq!(excerpt.column, None);
        assert!(excerpt.render().contains("   3 | >>>   b\n"));
    }
}
