//! `.dockerignore`-style path patterns, as fsutil applies include and exclude
//! patterns while walking a directory.
//!
//! Semantics (moby patternmatcher): `*` matches any run of characters except
//! `/`, `?` one such character, `[...]` a class, `\` escapes, `**` any number
//! of path components (`**/` may match nothing). A pattern starting with `!`
//! is an exception that re-includes what earlier patterns matched; the last
//! pattern that matches decides. A pattern also matches every path below a
//! directory it matches (`foo` matches `foo/bar`). Patterns are cleaned
//! lexically and a leading `/` is dropped.

use crate::Error;

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(char),
    /// `*`: any run of non-separator characters.
    Star,
    /// `?`: one non-separator character.
    Question,
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**/` or `**` before more text: nothing, or anything ending in `/`.
    AnyDirs,
    /// `**` at the end: anything.
    AnyRest,
}

/// One compiled pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    exclusion: bool,
    tokens: Vec<Token>,
    components: usize,
}

impl Pattern {
    /// Compiles one pattern; `!` marks an exception.
    pub fn new(raw: &str) -> Result<Self, Error> {
        let trimmed = raw.trim();
        let (exclusion, body) = match trimmed.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let text = clean(body);
        if text.is_empty() || (exclusion && body.trim().is_empty()) {
            return Err(Error::InvalidPattern {
                pattern: raw.to_string(),
                reason: "empty pattern",
            });
        }
        let tokens = compile(&text).map_err(|reason| Error::InvalidPattern {
            pattern: raw.to_string(),
            reason,
        })?;
        let components = text.split('/').count();
        Ok(Pattern {
            text,
            exclusion,
            tokens,
            components,
        })
    }

    /// The cleaned pattern text, without the `!`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether this is a `!` exception.
    pub fn is_exclusion(&self) -> bool {
        self.exclusion
    }

    /// Whether the text has glob syntax (`*`, `?`, `[`, `\`).
    pub fn has_wildcards(&self) -> bool {
        self.text.contains(['*', '?', '[', '\\'])
    }

    /// Whether `path` (clean, relative, `/`-separated) or one of its parent
    /// directories matches.
    pub fn matches(&self, path: &str) -> bool {
        let chars: Vec<char> = path.chars().collect();
        if match_tokens(&self.tokens, &chars) {
            return true;
        }
        // A pattern matching a parent directory matches everything below it.
        let parents: Vec<&str> = path.split('/').collect();
        let parent_count = parents.len() - 1;
        if parent_count >= 1 && self.components <= parent_count {
            let prefix = parents[..self.components].join("/");
            let chars: Vec<char> = prefix.chars().collect();
            return match_tokens(&self.tokens, &chars);
        }
        false
    }
}

/// An ordered list of patterns where the last matching one decides.
#[derive(Debug, Clone, Default)]
pub struct PatternMatcher {
    patterns: Vec<Pattern>,
}

impl PatternMatcher {
    /// Compiles `patterns`; blank entries are skipped.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, Error> {
        let patterns = patterns
            .iter()
            .map(AsRef::as_ref)
            .filter(|p| !p.trim().is_empty())
            .map(Pattern::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PatternMatcher { patterns })
    }

    /// Whether no patterns were given.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The compiled patterns in order.
    pub fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }

    /// Whether `path` is matched after applying every pattern in order
    /// (exceptions un-match).
    pub fn matches(&self, path: &str) -> bool {
        let mut matched = false;
        for pattern in &self.patterns {
            if pattern.exclusion != matched {
                // An exception only matters once matched; a plain pattern
                // only while not matched.
                continue;
            }
            if pattern.matches(path) {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// Whether some pattern of the given kind could match a path strictly
    /// inside directory `dir`: true for any wildcard pattern (we cannot tell
    /// cheaply), else when the pattern text lies below `dir/`.
    pub fn may_match_inside(&self, dir: &str, exclusions: bool) -> bool {
        let prefix = format!("{dir}/");
        self.patterns
            .iter()
            .filter(|p| p.exclusion == exclusions)
            .any(|p| p.has_wildcards() || p.text.starts_with(&prefix))
    }
}

/// Lexical clean of a `/`-separated pattern: no leading `/`, no `.` or empty
/// components, `..` folded where it can be.
fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if matches!(parts.last(), Some(last) if *last != "..") {
                    parts.pop();
                } else {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

fn compile(text: &str) -> Result<Vec<Token>, &'static str> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i >= chars.len() {
                    tokens.push(Token::AnyRest);
                } else {
                    tokens.push(Token::AnyDirs);
                }
                continue;
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Question),
            '\\' => {
                i += 1;
                let escaped = chars.get(i).ok_or("trailing backslash")?;
                tokens.push(Token::Literal(*escaped));
            }
            '[' => {
                let (token, next) = compile_class(&chars, i + 1)?;
                tokens.push(token);
                i = next;
                continue;
            }
            other => tokens.push(Token::Literal(other)),
        }
        i += 1;
    }
    Ok(tokens)
}

/// Parses a class whose body starts at `start`; returns the token and the
/// index after `]`.
fn compile_class(chars: &[char], start: usize) -> Result<(Token, usize), &'static str> {
    let mut i = start;
    let negated = matches!(chars.get(i), Some('^') | Some('!'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let mut c = *chars.get(i).ok_or("unterminated character class")?;
        if c == ']' && !first {
            return Ok((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        if c == '\\' {
            i += 1;
            c = *chars.get(i).ok_or("unterminated character class")?;
        }
        if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|e| *e != ']') {
            let mut end = chars[i + 2];
            i += 2;
            if end == '\\' {
                i += 1;
                end = *chars.get(i).ok_or("unterminated character class")?;
            }
            if end < c {
                return Err("bad character range");
            }
            ranges.push((c, end));
        } else {
            ranges.push((c, c));
        }
        i += 1;
    }
}

fn match_tokens(tokens: &[Token], s: &[char]) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return s.is_empty();
    };
    match first {
        Token::Literal(c) => s.first() == Some(c) && match_tokens(rest, &s[1..]),
        Token::Question => s.first().is_some_and(|c| *c != '/') && match_tokens(rest, &s[1..]),
        Token::Class { negated, ranges } => {
            s.first().is_some_and(|c| {
                let inside = ranges.iter().any(|(lo, hi)| lo <= c && c <= hi);
                *c != '/' && inside != *negated
            }) && match_tokens(rest, &s[1..])
        }
        Token::Star => {
            for k in 0..=s.len() {
                if match_tokens(rest, &s[k..]) {
                    return true;
                }
                if k < s.len() && s[k] == '/' {
                    break;
                }
            }
            false
        }
        Token::AnyDirs => {
            if match_tokens(rest, s) {
                return true;
            }
            (0..s.len()).any(|k| s[k] == '/' && match_tokens(rest, &s[k + 1..]))
        }
        Token::AnyRest => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_patterns_table() {
        // (pattern, path, matches)
        let cases = [
            ("foo", "foo", true),
            ("foo", "foo/bar", true),
            ("foo", "foobar", false),
            ("foo", "a/foo", false),
            ("/foo", "foo", true),
            ("./foo/", "foo/x", true),
            ("*.txt", "a.txt", true),
            ("*.txt", "dir/a.txt", false),
            ("*/a.txt", "dir/a.txt", true),
            ("*", "anything/below", true),
            ("?.go", "a.go", true),
            ("?.go", "ab.go", false),
            ("**/*.log", "x.log", true),
            ("**/*.log", "a/b/c.log", true),
            ("**/*.log", "a/b/c.txt", false),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/y/c", false),
            ("a/**", "a/x/y", true),
            ("**", "x/y", true),
            ("[a-c].md", "b.md", true),
            ("[a-c].md", "d.md", false),
            ("[^a-c].md", "d.md", true),
            ("\\*.md", "*.md", true),
            ("\\*.md", "x.md", false),
            ("dir/*", "dir/sub/file", true),
            ("dir/*/file", "dir/sub/file", true),
            ("dir/*/file", "dir/sub/deeper/file", false),
        ];
        for (pattern, path, want) in cases {
            let compiled = Pattern::new(pattern).unwrap();
            assert_eq!(
                compiled.matches(path),
                want,
                "pattern {pattern:?} on {path:?}"
            );
        }
    }

    #[test]
    fn matcher_with_exceptions_table() {
        // (patterns, path, excluded)
        let cases: &[(&[&str], &str, bool)] = &[
            (&["*.log", "!keep.log"], "a.log", true),
            (&["*.log", "!keep.log"], "keep.log", false),
            (&["*.log", "!keep.log", "keep.log"], "keep.log", true),
            (&["secret", "!secret/ok"], "secret/no", true),
            (&["secret", "!secret/ok"], "secret/ok", false),
            (&["secret", "!secret/ok"], "secret/ok/deep", false),
            (&["!x"], "x", false),
            (&["**", "!src"], "src/main.rs", false),
            (&["**", "!src"], "README", true),
        ];
        for (patterns, path, want) in cases {
            let matcher = PatternMatcher::new(patterns).unwrap();
            assert_eq!(matcher.matches(path), *want, "{patterns:?} on {path:?}");
        }
    }

    #[test]
    fn may_match_inside_uses_prefixes_and_wildcards() {
        let m = PatternMatcher::new(&["secret", "!secret/ok"]).unwrap();
        assert!(m.may_match_inside("secret", true));
        assert!(!m.may_match_inside("other", true));
        let w = PatternMatcher::new(&["secret", "!**/*.keep"]).unwrap();
        assert!(w.may_match_inside("anything", true));
    }

    #[test]
    fn invalid_patterns_are_errors() {
        assert!(Pattern::new("!").is_err());
        assert!(Pattern::new("[abc").is_err());
        assert!(Pattern::new("a\\").is_err());
    }
}
