//! Where an error points in a Dockerfile, and how it is shown: the excerpt BuildKit's client
//! prints (`Dockerfile:3`, the lines around it, `>>>` on the offending ones), with a `^^^` marker
//! under the offending word when the error names one, and "did you mean" hints.

use crate::parser::Span;

/// The place of an error: the lines of the instruction and, when one word is at fault, its
/// column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// First line, 1-based.
    pub start_line: usize,
    /// Last line, 1-based (`>= start_line`).
    pub end_line: usize,
    /// The offending word, when the error names one that appears in the source.
    pub column: Option<Column>,
}

pub use kiln_llb::errdefs::Column;

/// Finds `token` in the lines of `span` (the first occurrence), as a [`Column`].
pub(crate) fn locate(source: &str, span: Span, token: &str) -> Option<Column> {
    if token.is_empty() {
        return None;
    }
    source
        .lines()
        .enumerate()
        .skip(span.start.saturating_sub(1))
        .take(span.end.saturating_sub(span.start) + 1)
        .find_map(|(index, line)| {
            let at = line.find(token)?;
            Some(Column {
                line: index + 1,
                start: line[..at].chars().count() + 1,
                width: token.chars().count().max(1),
            })
        })
}

/// Renders `location` in `source` the way BuildKit's client prints a failing step (see
/// [`kiln_llb::errdefs::Excerpt::render`]).
pub fn excerpt(filename: &str, source: &[u8], location: &Location) -> String {
    location.excerpt(filename, source).render()
}

impl Location {
    /// The location with its file, as an error carries it to the client.
    pub fn excerpt(&self, filename: &str, source: &[u8]) -> kiln_llb::errdefs::Excerpt {
        kiln_llb::errdefs::Excerpt {
            filename: filename.to_string(),
            data: source.to_vec(),
            start_line: self.start_line,
            end_line: self.end_line,
            column: self.column,
        }
    }
}

/// The option closest to `value` within an edit distance of 2, for a "did you mean" hint
/// (BuildKit's `suggest.WrapError`): none when `value` is one of the options. Without
/// `case_sensitive` the comparison ignores case and the hint takes the case of `value` when
/// that is all upper case (lower case otherwise).
pub(crate) fn suggest(value: &str, options: &[&str], case_sensitive: bool) -> Option<String> {
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let wanted = fold(value);
    let mut best: Option<(usize, String)> = None;
    for option in options {
        let candidate = fold(option);
        if candidate == wanted {
            return None;
        }
        let distance = edit_distance(&wanted, &candidate);
        if distance < 3 && best.as_ref().is_none_or(|(d, _)| distance < *d) {
            best = Some((distance, candidate));
        }
    }
    let (_, hint) = best?;
    if case_sensitive {
        return Some(hint);
    }
    Some(if value == value.to_ascii_uppercase() {
        hint.to_ascii_uppercase()
    } else {
        hint
    })
}

/// `message (did you mean <hint>?)` when there is a hint.
pub(crate) fn with_hint(message: String, hint: Option<String>) -> String {
    match hint {
        Some(hint) => format!("{message} (did you mean {hint}?)"),
        None => message,
    }
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("runn", "run"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn hints_follow_buildkit() {
        let instructions = ["from", "run", "copy", "workdir"];
        assert_eq!(
            suggest("RUNN", &instructions, false).as_deref(),
            Some("RUN")
        );
        assert_eq!(
            suggest("cpy", &instructions, false).as_deref(),
            Some("copy")
        );
        assert_eq!(
            suggest("Workdri", &instructions, false).as_deref(),
            Some("workdir")
        );
        assert_eq!(suggest("BOGUS", &instructions, false), None);
        assert_eq!(suggest("RUN", &instructions, false), None);
        let flags = ["chown", "chmod", "from"];
        assert_eq!(suggest("chwon", &flags, true).as_deref(), Some("chown"));
        assert_eq!(suggest("FROM", &flags, true), None);
    }

    #[test]
    fn excerpt_marks_lines_and_word() {
        let source = b"FROM a\nRUN true\nCOPY --foo=1 a b\nCMD x\n";
        let location = Location {
            start_line: 3,
            end_line: 3,
            column: locate(
                std::str::from_utf8(source).unwrap(),
                Span { start: 3, end: 3 },
                "--foo",
            ),
        };
        assert_eq!(
            excerpt("Dockerfile", source, &location),
            "Dockerfile:3\n--------------------\n   1 |     FROM a\n   2 |     RUN true\n   3 | >>> COPY --foo=1 a b\n     |          ^^^^^\n   4 |     CMD x\n--------------------\n"
        );
    }
}
