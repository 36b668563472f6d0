//! Shell-like word processing as BuildKit's `shell.Lex` does it: quotes, escapes and variable
//! expansion (`$v`, `${v}`, `${v:-d}`, `${v-d}`, `${v:+a}`, `${v+a}`, `${v:?m}`, `${v?m}`, and the
//! pattern forms `${v#p}`, `${v##p}`, `${v%p}`, `${v%%p}`, `${v/p/r}`, `${v//p/r}` with shell
//! globs `*`, `?`, `[...]`).

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// A quote is not closed.
    #[error("unexpected end of statement while looking for matching {quote}")]
    UnterminatedQuote {
        /// `single-quote` or `double-quote`.
        quote: &'static str,
    },
    /// `${` is not closed.
    #[error("missing '}}' in substitution of {name:?}")]
    UnterminatedBrace {
        /// The variable name read so far.
        name: String,
    },
    /// `${}` or `${:...}`.
    #[error("bad substitution: empty variable name")]
    EmptyName,
    /// A modifier other than `-`, `+`, `?` (with or without `:`).
    #[error("unsupported modifier ({modifier}) in substitution of {name:?}")]
    UnsupportedModifier {
        /// The variable.
        name: String,
        /// The modifier character.
        modifier: char,
    },
    /// `${v?message}` with `v` unset (or empty with `:?`).
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// The message given in the substitution.
        message: String,
    },
}

/// Variables visible to an expansion, in definition order; later entries do not shadow earlier
/// ones (callers keep keys unique).
pub type Env = [(String, String)];

/// How a word is processed.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    /// The escape character (`\` or `` ` ``).
    pub escape: char,
    /// Keep quote characters in the output (used for progress names).
    pub raw_quotes: bool,
    /// Leave references to unset variables as written (used for progress names).
    pub skip_unset: bool,
    /// Treat quotes as ordinary characters (BuildKit's `SkipProcessQuotes`, used to expand
    /// heredoc bodies); escapes and variables are still processed.
    pub skip_quotes: bool,
}

impl Lexer {
    /// The lexer for instruction arguments.
    pub fn new(escape: char) -> Self {
        Self {
            escape,
            raw_quotes: false,
            skip_unset: false,
            skip_quotes: false,
        }
    }

    /// Processes one word: removes quotes and escapes, expands variables from `env`.
    pub fn process_word(&self, word: &str, env: &Env) -> Result<String, ExpandError> {
        let chars: Vec<char> = word.chars().collect();
        let mut pos = 0;
        self.process_until(&chars, &mut pos, env, None)
    }

    /// Processes until `stop` (not consumed) or the end.
    fn process_until(
        &self,
        chars: &[char],
        pos: &mut usize,
        env: &Env,
        stop: Option<char>,
    ) -> Result<String, ExpandError> {
        match stop {
            Some(stop) => self.process_until_any(chars, pos, env, &[stop]),
            None => self.process_until_any(chars, pos, env, &[]),
        }
    }

    /// Processes until one of `stops` (not consumed) or the end; with stops, quotes are
    /// ordinary characters (as inside `${…}`).
    fn process_until_any(
        &self,
        chars: &[char],
        pos: &mut usize,
        env: &Env,
        stops: &[char],
    ) -> Result<String, ExpandError> {
        let mut out = String::new();
        while *pos < chars.len() {
            let c = chars[*pos];
            if stops.contains(&c) {
                return Ok(out);
            }
            *pos += 1;
            if c == self.escape {
                if let Some(&next) = chars.get(*pos) {
                    if self.raw_quotes {
                        out.push(c);
                    }
                    out.push(next);
                    *pos += 1;
                } else if self.raw_quotes {
                    out.push(c);
                }
            } else if c == '\'' && stops.is_empty() && !self.skip_quotes {
                if self.raw_quotes {
                    out.push(c);
                }
                loop {
                    let Some(&q) = chars.get(*pos) else {
                        return Err(ExpandError::UnterminatedQuote {
                            quote: "single-quote",
                        });
                    };
                    *pos += 1;
                    if q == '\'' {
                        break;
                    }
                    out.push(q);
                }
                if self.raw_quotes {
                    out.push('\'');
                }
            } else if c == '"' && stops.is_empty() && !self.skip_quotes {
                if self.raw_quotes {
                    out.push(c);
                }
                loop {
                    let Some(&q) = chars.get(*pos) else {
                        return Err(ExpandError::UnterminatedQuote {
                            quote: "double-quote",
                        });
                    };
                    *pos += 1;
                    if q == '"' {
                        break;
                    } else if q == '$' {
                        out.push_str(&self.process_dollar(chars, pos, env)?);
                    } else if q == self.escape {
                        match chars.get(*pos) {
                            Some(&n) if n == '"' || n == '$' || n == self.escape => {
                                if self.raw_quotes {
                                    out.push(q);
                                }
                                out.push(n);
                                *pos += 1;
                            }
                            _ => out.push(q),
                        }
                    } else {
                        out.push(q);
                    }
                }
                if self.raw_quotes {
                    out.push('"');
                }
            } else if c == '$' {
                out.push_str(&self.process_dollar(chars, pos, env)?);
            } else {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Expands after a `$` (already consumed).
    fn process_dollar(
        &self,
        chars: &[char],
        pos: &mut usize,
        env: &Env,
    ) -> Result<String, ExpandError> {
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        match chars.get(*pos) {
            Some('{') => {
                let start = *pos - 1;
                *pos += 1;
                let mut name = String::new();
                while let Some(&c) = chars.get(*pos) {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                        *pos += 1;
                    } else {
                        break;
                    }
                }
                let Some(&next) = chars.get(*pos) else {
                    return Err(ExpandError::UnterminatedBrace { name });
                };
                if name.is_empty() {
                    return Err(ExpandError::EmptyName);
                }
                let value = lookup(&name);
                if next == '}' {
                    *pos += 1;
                    return Ok(match value {
                        Some(v) => v,
                        None if self.skip_unset => chars[start..*pos].iter().collect(),
                        None => String::new(),
                    });
                }
                *pos += 1;
                if matches!(next, '#' | '%' | '/') {
                    return self.pattern_substitution(chars, pos, env, name, next, value);
                }
                let colon = next == ':';
                let modifier = if colon {
                    let Some(&m) = chars.get(*pos) else {
                        return Err(ExpandError::UnterminatedBrace { name });
                    };
                    *pos += 1;
                    m
                } else {
                    next
                };
                let word = self.process_until(chars, pos, env, Some('}'))?;
                if chars.get(*pos) != Some(&'}') {
                    return Err(ExpandError::UnterminatedBrace { name });
                }
                *pos += 1;
                // With ':', an empty value counts as unset.
                let set = match &value {
                    Some(v) => !(colon && v.is_empty()),
                    None => false,
                };
                match modifier {
                    '-' => Ok(if set { value.unwrap_or_default() } else { word }),
                    '+' => Ok(if set { word } else { String::new() }),
                    '?' => {
                        if set {
                            Ok(value.unwrap_or_default())
                        } else {
                            let message = if word.is_empty() {
                                "is not allowed to be unset".to_string()
                            } else {
                                word
                            };
                            Err(ExpandError::Required { name, message })
                        }
                    }
                    other => Err(ExpandError::UnsupportedModifier {
                        name,
                        modifier: other,
                    }),
                }
            }
            Some(&c) if c.is_ascii_digit() => {
                // Positional parameters are never set in a Dockerfile.
                *pos += 1;
                Ok(if self.skip_unset {
                    format!("${c}")
                } else {
                    String::new()
                })
            }
            Some(&c) if c.is_ascii_alphabetic() || c == '_' => {
                let mut name = String::new();
                while let Some(&c) = chars.get(*pos) {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        name.push(c);
                        *pos += 1;
                    } else {
                        break;
                    }
                }
                Ok(match lookup(&name) {
                    Some(v) => v,
                    None if self.skip_unset => format!("${name}"),
                    None => String::new(),
                })
            }
            _ => Ok("$".to_string()),
        }
    }
}

impl Lexer {
    /// `${v#p}`, `${v##p}`, `${v%p}`, `${v%%p}`, `${v/p/r}`, `${v//p/r}`: `kind` (`#`, `%` or
    /// `/`) is consumed; the pattern keeps its escapes so `\*` stays a literal star.
    fn pattern_substitution(
        &self,
        chars: &[char],
        pos: &mut usize,
        env: &Env,
        name: String,
        kind: char,
        value: Option<String>,
    ) -> Result<String, ExpandError> {
        let doubled = chars.get(*pos) == Some(&kind);
        if doubled {
            *pos += 1;
        }
        let pattern_lexer = Lexer {
            raw_quotes: true,
            ..*self
        };
        let stops: &[char] = if kind == '/' { &['/', '}'] } else { &['}'] };
        let pattern: Vec<char> = pattern_lexer
            .process_until_any(chars, pos, env, stops)?
            .chars()
            .collect();
        let replacement = if kind == '/' && chars.get(*pos) == Some(&'/') {
            *pos += 1;
            self.process_until(chars, pos, env, Some('}'))?
        } else {
            String::new()
        };
        if chars.get(*pos) != Some(&'}') {
            return Err(ExpandError::UnterminatedBrace { name });
        }
        *pos += 1;
        let value: Vec<char> = match value {
            Some(value) => value.chars().collect(),
            None if self.skip_unset => {
                return Ok(String::new());
            }
            None => Vec::new(),
        };
        let text = |range: &[char]| range.iter().collect::<String>();
        let n = value.len();
        Ok(match (kind, doubled) {
            // Shortest, then longest, matching prefix removed.
            ('#', false) => (0..=n)
                .find(|&i| glob(&pattern, &value[..i]))
                .map_or_else(|| text(&value), |i| text(&value[i..])),
            ('#', true) => (0..=n)
                .rev()
                .find(|&i| glob(&pattern, &value[..i]))
                .map_or_else(|| text(&value), |i| text(&value[i..])),
            // Shortest, then longest, matching suffix removed.
            ('%', false) => (0..=n)
                .rev()
                .find(|&i| glob(&pattern, &value[i..]))
                .map_or_else(|| text(&value), |i| text(&value[..i])),
            ('%', true) => (0..=n)
                .find(|&i| glob(&pattern, &value[i..]))
                .map_or_else(|| text(&value), |i| text(&value[..i])),
            // The longest match at the leftmost position, once or everywhere.
            (_, all) => {
                let mut out = String::new();
                let mut start = 0;
                while start <= n {
                    let found = (start..=n).find_map(|s| {
                        (s + 1..=n)
                            .rev()
                            .find(|&e| glob(&pattern, &value[s..e]))
                            .map(|e| (s, e))
                    });
                    let Some((s, e)) = found else { break };
                    out.push_str(&text(&value[start..s]));
                    out.push_str(&replacement);
                    start = e;
                    if !all {
                        break;
                    }
                }
                out.push_str(&text(&value[start.min(n)..]));
                out
            }
        })
    }
}

/// Whether the shell glob `pattern` (`*`, `?`, `[abc]`, `[a-z]`, `[!x]`, `\x`) matches all of
/// `text`.
fn glob(pattern: &[char], text: &[char]) -> bool {
    match pattern.first() {
        None => text.is_empty(),
        Some('*') => (0..=text.len()).any(|k| glob(&pattern[1..], &text[k..])),
        Some('?') => !text.is_empty() && glob(&pattern[1..], &text[1..]),
        Some('\\') if pattern.len() > 1 => {
            text.first() == Some(&pattern[1]) && glob(&pattern[2..], &text[1..])
        }
        Some('[') => {
            let Some(&c) = text.first() else {
                return false;
            };
            let mut i = 1;
            let negate = matches!(pattern.get(1), Some('!') | Some('^'));
            if negate {
                i += 1;
            }
            let mut matched = false;
            let mut first = true;
            while i < pattern.len() {
                if pattern[i] == ']' && !first {
                    return matched != negate && glob(&pattern[i + 1..], &text[1..]);
                }
                first = false;
                if i + 2 < pattern.len() && pattern[i + 1] == '-' && pattern[i + 2] != ']' {
                    matched |= pattern[i] <= c && c <= pattern[i + 2];
                    i += 3;
                } else {
                    matched |= pattern[i] == c;
                    i += 1;
                }
            }
            // No closing bracket: a literal `[`.
            c == '[' && glob(&pattern[1..], &text[1..])
        }
        Some(&p) => text.first() == Some(&p) && glob(&pattern[1..], &text[1..]),
    }
}

/// Splits `input` on whitespace outside quotes; quotes and escapes stay in the words (BuildKit's
/// `parseWords`, used for `ENV`/`LABEL`/`ARG` lists).
pub fn split_words(input: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in input.chars() {
        if escaped {
            word.push(c);
            escaped = false;
            continue;
        }
        match quote {
            Some(q) => {
                if c == escape && q == '"' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                word.push(c);
            }
            None => {
                if c.is_whitespace() {
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    continue;
                }
                if c == escape {
                    escaped = true;
                } else if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                word.push(c);
            }
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("A".into(), "apple".into()),
            ("E".into(), String::new()),
            ("SP".into(), "a b".into()),
        ]
    }

    fn expand(word: &str) -> Result<String, ExpandError> {
        Lexer::new('\\').process_word(word, &env())
    }

    #[test]
    fn expansion_table() {
        let cases = [
            ("$A", "apple"),
            ("${A}", "apple"),
            ("x${A}y", "xappley"),
            ("$A-$B", "apple-"),
            ("${B:-def}", "def"),
            ("${E:-def}", "def"),
            ("${E-def}", ""),
            ("${A:-def}", "apple"),
            ("${A:+alt}", "alt"),
            ("${E:+alt}", ""),
            ("${E+alt}", "alt"),
            ("${B:+alt}", ""),
            ("${B:-$A}", "apple"),
            ("\\$A", "$A"),
            ("'$A'", "$A"),
            ("\"$A\"", "apple"),
            ("\"a\\\"b\"", "a\"b"),
            ("\"a\\nb\"", "a\\nb"),
            ("a\\ b", "a b"),
            ("$SP", "a b"),
            ("$", "$"),
            ("a$/", "a$/"),
            ("$1x", "x"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input).unwrap(), want, "input {input:?}");
        }
    }

    #[test]
    fn pattern_forms() {
        let env = vec![
            ("V".to_string(), "a.b.c".to_string()),
            ("H".to_string(), "hello".to_string()),
            ("P".to_string(), "/usr/local/bin".to_string()),
            ("S".to_string(), "a*b".to_string()),
        ];
        let cases = [
            ("${V#*.}", "b.c"),
            ("${V##*.}", "c"),
            ("${V%.*}", "a.b"),
            ("${V%%.*}", "a"),
            ("${V#x}", "a.b.c"),
            ("${H/l/L}", "heLlo"),
            ("${H//l/L}", "heLLo"),
            ("${H//l}", "heo"),
            ("${H/l*/X}", "heX"),
            ("${H/[aeiou]/_}", "h_llo"),
            ("${H//[!l]/.}", "..ll."),
            ("${P##*/}", "bin"),
            ("${P%/*}", "/usr/local"),
            ("${S/\\*/-}", "a-b"),
            ("${U#x}", ""),
            ("${H/$V/x}", "hello"),
        ];
        for (input, want) in cases {
            assert_eq!(
                Lexer::new('\\').process_word(input, &env).unwrap(),
                want,
                "input {input:?}"
            );
        }
        assert!(Lexer::new('\\').process_word("${H/l", &env).is_err());
    }

    #[test]
    fn expansion_errors() {
        assert!(matches!(
            expand("'abc"),
            Err(ExpandError::UnterminatedQuote { .. })
        ));
        assert!(matches!(
            expand("\"abc"),
            Err(ExpandError::UnterminatedQuote { .. })
        ));
        assert!(matches!(
            expand("${A"),
            Err(ExpandError::UnterminatedBrace { .. })
        ));
        assert!(matches!(
            expand("${A:=x}"),
            Err(ExpandError::UnsupportedModifier { modifier: '=', .. })
        ));
        assert_eq!(
            expand("${B:?must be set}").unwrap_err().to_string(),
            "B: must be set"
        );
    }

    #[test]
    fn backtick_escape() {
        let lexer = Lexer::new('`');
        assert_eq!(lexer.process_word("`$A\\x", &env()).unwrap(), "$A\\x");
    }

    #[test]
    fn skip_quotes_keeps_quotes_and_expands_inside() {
        let lexer = Lexer {
            skip_quotes: true,
            ..Lexer::new('\\')
        };
        assert_eq!(
            lexer.process_word("'$A' \"x\" \\$A", &env()).unwrap(),
            "'apple' \"x\" $A"
        );
    }

    #[test]
    fn raw_quotes_and_skip_unset_for_names() {
        let lexer = Lexer {
            escape: '\\',
            raw_quotes: true,
            skip_unset: true,
            skip_quotes: false,
        };
        assert_eq!(
            lexer
                .process_word("RUN echo \"$A\" $HOME ${NOPE}", &env())
                .unwrap(),
            "RUN echo \"apple\" $HOME ${NOPE}"
        );
    }

    #[test]
    fn split_words_keeps_quotes() {
        assert_eq!(
            split_words(r#"a=1 b="x y" c='p q'  d=\ e"#, '\\'),
            vec!["a=1", r#"b="x y""#, "c='p q'", r"d=\ e"]
        );
    }
}
