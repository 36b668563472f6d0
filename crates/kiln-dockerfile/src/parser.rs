//! Dockerfile text → [`Dockerfile`]: directives, comments, continuations, instructions.

use std::collections::BTreeMap;

use crate::shell::split_words;

/// A parse failure, with the 1-based line it was found on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn error(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

/// Lines `start..=end` (1-based) of the Dockerfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First line.
    pub start: usize,
    /// Last line.
    pub end: usize,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq)]
pub struct Dockerfile {
    /// Parser directives (`syntax`, `escape`, `check`), keys lower-cased.
    pub directives: BTreeMap<String, String>,
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
    /// `ARG` instructions before the first `FROM` (the global scope).
    pub meta_args: Vec<Command>,
    /// Build stages in file order.
    pub stages: Vec<Stage>,
}

/// One `FROM` and the instructions under it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// `AS name`, lower-cased (stage names match case-insensitively).
    pub name: Option<String>,
    /// The base as written (variables not yet expanded).
    pub base: String,
    /// `--platform` as written.
    pub platform: Option<String>,
    /// Lines of the `FROM` instruction.
    pub span: Span,
    /// The `FROM` instruction text.
    pub original: String,
    /// Instructions of the stage.
    pub commands: Vec<Command>,
}

/// One instruction with its place in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Lines of the instruction (continuations included).
    pub span: Span,
    /// The keyword, upper-cased.
    pub keyword: String,
    /// The instruction text with continuations joined, trimmed (BuildKit's `node.Original`).
    pub original: String,
    /// The typed instruction.
    pub instruction: Instruction,
}

/// Shell form (run through the shell) or exec form (a JSON array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// `RUN echo hi`: the text, unexpanded.
    Shell(String),
    /// `RUN ["echo", "hi"]`.
    Exec(Vec<String>),
}

/// `key=value` as written (quotes still in; expanded at compile time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

/// `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDef {
    /// Name.
    pub name: String,
    /// Default as written, if any.
    pub default: Option<String>,
}

/// `COPY [--from=] [--chown=] [--chmod=] [--link] src... dest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInstruction {
    /// `--from`: a stage name, a stage index or an image.
    pub from: Option<String>,
    /// `--chown`, unexpanded.
    pub chown: Option<String>,
    /// `--chmod`, unexpanded.
    pub chmod: Option<String>,
    /// `--link` (accepted; copied like a plain COPY, as BuildKit does without merge-op support).
    pub link: bool,
    /// Flags BuildKit knows but kiln does not support yet (`--parents`, `--exclude`).
    pub unsupported_flags: Vec<String>,
    /// Sources, unexpanded.
    pub sources: Vec<String>,
    /// Destination, unexpanded.
    pub dest: String,
}

/// A Dockerfile instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    /// `RUN` with its flags (`--mount`, `--network`, ... — not supported yet).
    Run {
        /// Flags as written (`mount=type=cache,...`).
        flags: Vec<String>,
        /// The command.
        command: CommandLine,
    },
    /// `COPY`.
    Copy(CopyInstruction),
    /// `ENV k=v ...` (or legacy `ENV k v`).
    Env(Vec<KeyValue>),
    /// `LABEL k=v ...`.
    Label(Vec<KeyValue>),
    /// `WORKDIR path`, unexpanded.
    Workdir(String),
    /// `USER user[:group]`, unexpanded.
    User(String),
    /// `CMD`.
    Cmd(CommandLine),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `SHELL ["exe", "arg"]`.
    Shell(Vec<String>),
    /// `ARG name[=default] ...`.
    Arg(Vec<ArgDef>),
    /// A known instruction kiln cannot compile yet (`ADD`, `EXPOSE`, `VOLUME`, ...).
    Unsupported {
        /// Its arguments as written.
        arguments: String,
    },
}

/// Every instruction keyword BuildKit's Dockerfile frontend knows.
const KNOWN: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A logical line: continuations joined.
struct Logical {
    span: Span,
    text: String,
}

/// Parses a Dockerfile.
pub fn parse(source: &str) -> Result<Dockerfile, ParseError> {
    let lines: Vec<&str> = source.lines().collect();
    let (directives, mut index) = parse_directives(&lines)?;
    let escape = match directives.get("escape").map(String::as_str) {
        None | Some("\\") => '\\',
        Some("`") => '`',
        Some(other) => {
            return Err(error(
                1,
                format!("invalid escape token '{other}' does not match ` or \\"),
            ))
        }
    };

    let mut logical = Vec::new();
    while index < lines.len() {
        let start = index + 1;
        let first = lines[index].trim_start();
        index += 1;
        if first.trim().is_empty() || first.starts_with('#') {
            continue;
        }
        let (mut text, mut done) = trim_continuation(first, escape);
        let mut end = start;
        while !done && index < lines.len() {
            let line = lines[index];
            index += 1;
            end = index;
            let trimmed = line.trim_start();
            // Comments and blank lines inside a continuation are skipped, as BuildKit does.
            if trimmed.starts_with('#') || trimmed.trim().is_empty() {
                continue;
            }
            let (part, finished) = trim_continuation(line, escape);
            text.push_str(&part);
            done = finished;
        }
        logical.push(Logical {
            span: Span { start, end },
            text,
        });
    }

    let mut dockerfile = Dockerfile {
        directives,
        escape,
        meta_args: Vec::new(),
        stages: Vec::new(),
    };
    for line in logical {
        let original = line.text.trim().to_string();
        let (word, rest) = split_first_word(&original);
        let keyword = word.to_ascii_uppercase();
        if !KNOWN.contains(&keyword.as_str()) {
            return Err(error(
                line.span.start,
                format!("unknown instruction: {word}"),
            ));
        }
        let (flags, rest) = extract_flags(rest);
        if keyword == "FROM" {
            dockerfile
                .stages
                .push(parse_from(&flags, rest, line.span, &original)?);
            continue;
        }
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") && has_heredoc(rest) {
            // BuildKit reads the following lines as the document; without support they would
            // be misread as instructions.
            return Err(error(
                line.span.start,
                format!("heredocs in {keyword} are not supported yet"),
            ));
        }
        let instruction = parse_instruction(&keyword, flags, rest, line.span.start, escape)?;
        let command = Command {
            span: line.span,
            keyword: keyword.clone(),
            original,
            instruction,
        };
        match dockerfile.stages.last_mut() {
            Some(stage) => stage.commands.push(command),
            None if keyword == "ARG" => dockerfile.meta_args.push(command),
            None => {
                return Err(error(
                    line.span.start,
                    format!("no build stage in current context: {keyword} before FROM"),
                ))
            }
        }
    }
    Ok(dockerfile)
}

/// Whether `text` holds a heredoc marker (`<<EOF`, `<<-"EOF"`).
fn has_heredoc(text: &str) -> bool {
    let mut rest = text;
    while let Some(i) = rest.find("<<") {
        let after = rest[i + 2..].trim_start_matches('-');
        let after = after.trim_start_matches(['"', '\'']);
        if after.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            return true;
        }
        rest = &rest[i + 2..];
    }
    false
}

/// Reads `# key=value` directives at the top of the file; returns them and the first line index
/// after them.
fn parse_directives(lines: &[&str]) -> Result<(BTreeMap<String, String>, usize), ParseError> {
    let mut directives = BTreeMap::new();
    let mut index = 0;
    while index < lines.len() {
        let Some(body) = lines[index].trim().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = body.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty()
            || !key.chars().all(|c| c.is_ascii_alphanumeric())
            || !["syntax", "escape", "check"].contains(&key.as_str())
        {
            break;
        }
        if directives
            .insert(key.clone(), value.trim().to_string())
            .is_some()
        {
            return Err(error(
                index + 1,
                format!("only one {key} parser directive can be used"),
            ));
        }
        index += 1;
    }
    Ok((directives, index))
}

/// Removes a trailing escape character (and whitespace after it); says whether the logical line
/// ends here.
fn trim_continuation(line: &str, escape: char) -> (String, bool) {
    let trimmed = line.trim_end();
    match trimmed.strip_suffix(escape) {
        Some(rest) => (rest.to_string(), false),
        None => (line.trim_end_matches(['\r', '\n']).to_string(), true),
    }
}

fn split_first_word(text: &str) -> (&str, &str) {
    match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], text[i..].trim_start()),
        None => (text, ""),
    }
}

/// Leading `--name[=value]` words (BuildKit's builder flags).
fn extract_flags(mut rest: &str) -> (Vec<(String, Option<String>)>, &str) {
    let mut flags = Vec::new();
    loop {
        let (word, after) = split_first_word(rest);
        let Some(flag) = word.strip_prefix("--") else {
            break;
        };
        if flag.is_empty() {
            rest = after;
            break;
        }
        match flag.split_once('=') {
            Some((name, value)) => flags.push((name.to_ascii_lowercase(), Some(value.to_string()))),
            None => flags.push((flag.to_ascii_lowercase(), None)),
        }
        rest = after;
    }
    (flags, rest)
}

fn parse_from(
    flags: &[(String, Option<String>)],
    rest: &str,
    span: Span,
    original: &str,
) -> Result<Stage, ParseError> {
    let mut platform = None;
    for (name, value) in flags {
        match name.as_str() {
            "platform" => platform = Some(flag_value("platform", value, span.start)?),
            other => return Err(error(span.start, format!("unknown flag: {other}"))),
        }
    }
    let words: Vec<&str> = rest.split_whitespace().collect();
    let name = match words.as_slice() {
        [_] => None,
        [_, as_word, name] if as_word.eq_ignore_ascii_case("as") => {
            let name = name.to_ascii_lowercase();
            let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
            if !valid {
                return Err(error(
                    span.start,
                    format!("invalid name for build stage: {name:?}, name can't start with a number or contain symbols"),
                ));
            }
            Some(name)
        }
        [] => {
            return Err(error(
                span.start,
                "FROM requires either one or three arguments",
            ))
        }
        _ => {
            return Err(error(
                span.start,
                "FROM requires either one or three arguments",
            ))
        }
    };
    Ok(Stage {
        name,
        base: words[0].to_string(),
        platform,
        span,
        original: original.to_string(),
        commands: Vec::new(),
    })
}

fn flag_value(name: &str, value: &Option<String>, line: usize) -> Result<String, ParseError> {
    value
        .clone()
        .ok_or_else(|| error(line, format!("missing a value on flag: {name}")))
}

fn parse_instruction(
    keyword: &str,
    flags: Vec<(String, Option<String>)>,
    rest: &str,
    line: usize,
    escape: char,
) -> Result<Instruction, ParseError> {
    let no_flags = |flags: &[(String, Option<String>)]| match flags.first() {
        Some((name, _)) => Err(error(line, format!("unknown flag: {name}"))),
        None => Ok(()),
    };
    Ok(match keyword {
        "RUN" => {
            for (name, _) in &flags {
                if !["mount", "network", "security", "device"].contains(&name.as_str()) {
                    return Err(error(line, format!("unknown flag: {name}")));
                }
            }
            if rest.is_empty() {
                return Err(error(line, "RUN requires at least one argument"));
            }
            Instruction::Run {
                flags: flags
                    .into_iter()
                    .map(|(n, v)| match v {
                        Some(v) => format!("{n}={v}"),
                        None => n,
                    })
                    .collect(),
                command: command_line(rest),
            }
        }
        "CMD" | "ENTRYPOINT" => {
            no_flags(&flags)?;
            let command = command_line(rest);
            if keyword == "CMD" {
                Instruction::Cmd(command)
            } else {
                Instruction::Entrypoint(command)
            }
        }
        "SHELL" => {
            no_flags(&flags)?;
            match command_line(rest) {
                CommandLine::Exec(args) if !args.is_empty() => Instruction::Shell(args),
                _ => {
                    return Err(error(
                        line,
                        "SHELL requires the arguments to be in JSON form",
                    ))
                }
            }
        }
        "COPY" => parse_copy(flags, rest, line)?,
        "ENV" | "LABEL" => {
            no_flags(&flags)?;
            let pairs = parse_key_values(keyword, rest, line, escape)?;
            if keyword == "ENV" {
                Instruction::Env(pairs)
            } else {
                Instruction::Label(pairs)
            }
        }
        "WORKDIR" | "USER" => {
            no_flags(&flags)?;
            if rest.is_empty() {
                return Err(error(
                    line,
                    format!("{keyword} requires exactly one argument"),
                ));
            }
            if keyword == "WORKDIR" {
                Instruction::Workdir(rest.to_string())
            } else {
                Instruction::User(rest.to_string())
            }
        }
        "ARG" => {
            no_flags(&flags)?;
            let words = split_words(rest, escape);
            if words.is_empty() {
                return Err(error(line, "ARG requires at least one argument"));
            }
            let mut args = Vec::new();
            for word in words {
                let (name, default) = match word.split_once('=') {
                    Some((name, value)) => (name.to_string(), Some(value.to_string())),
                    None => (word, None),
                };
                if name.is_empty() {
                    return Err(error(line, "ARG names can not be blank"));
                }
                args.push(ArgDef { name, default });
            }
            Instruction::Arg(args)
        }
        _ => Instruction::Unsupported {
            arguments: rest.to_string(),
        },
    })
}

/// Exec form when the text is a JSON array of strings, shell form otherwise.
fn command_line(rest: &str) -> CommandLine {
    if rest.starts_with('[') {
        if let Ok(args) = serde_json::from_str::<Vec<String>>(rest) {
            return CommandLine::Exec(args);
        }
    }
    CommandLine::Shell(rest.to_string())
}

fn parse_copy(
    flags: Vec<(String, Option<String>)>,
    rest: &str,
    line: usize,
) -> Result<Instruction, ParseError> {
    let mut copy = CopyInstruction {
        from: None,
        chown: None,
        chmod: None,
        link: false,
        unsupported_flags: Vec::new(),
        sources: Vec::new(),
        dest: String::new(),
    };
    for (name, value) in &flags {
        match name.as_str() {
            "from" => copy.from = Some(flag_value(name, value, line)?),
            "chown" => copy.chown = Some(flag_value(name, value, line)?),
            "chmod" => copy.chmod = Some(flag_value(name, value, line)?),
            "link" => copy.link = value.as_deref().is_none_or(|v| v != "false"),
            "parents" | "exclude" => copy.unsupported_flags.push(name.clone()),
            other => return Err(error(line, format!("unknown flag: {other}"))),
        }
    }
    let mut words = match command_line(rest) {
        CommandLine::Exec(words) => words,
        CommandLine::Shell(text) => text.split_whitespace().map(str::to_string).collect(),
    };
    if words.len() < 2 {
        return Err(error(line, "COPY requires at least two arguments"));
    }
    copy.dest = words.pop().unwrap_or_default();
    copy.sources = words;
    Ok(Instruction::Copy(copy))
}

/// `k=v k2=v2` or legacy `k v` (BuildKit's `parseNameVal`).
fn parse_key_values(
    keyword: &str,
    rest: &str,
    line: usize,
    escape: char,
) -> Result<Vec<KeyValue>, ParseError> {
    let words = split_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(error(
            line,
            format!("{keyword} requires at least one argument"),
        ));
    };
    if !first.contains('=') {
        // Legacy form: the key, then the rest of the line is the value.
        let (key, value) = split_first_word(rest);
        if value.is_empty() {
            return Err(error(line, format!("{keyword} must have two arguments")));
        }
        return Ok(vec![KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        }]);
    }
    let mut pairs = Vec::new();
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(error(
                line,
                format!("Syntax error - can't find = in {word:?}. Must be of the form: name=value"),
            ));
        };
        if key.is_empty() {
            return Err(error(line, format!("{keyword} names can not be blank")));
        }
        pairs.push(KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_with_comment_and_blank_lines() {
        let df = parse("FROM x\nRUN echo a \\\n# comment\n\n  && echo b\nCMD [\"a\"]\n").unwrap();
        let stage = &df.stages[0];
        assert_eq!(stage.commands.len(), 2);
        let run = &stage.commands[0];
        assert_eq!(run.span, Span { start: 2, end: 5 });
        assert_eq!(run.original, "RUN echo a   && echo b");
        assert_eq!(
            run.instruction,
            Instruction::Run {
                flags: vec![],
                command: CommandLine::Shell("echo a   && echo b".into())
            }
        );
        assert_eq!(stage.commands[1].span, Span { start: 6, end: 6 });
    }

    #[test]
    fn backtick_escape_directive() {
        let df = parse("# escape=`\nFROM x\nRUN a `\n  b\n").unwrap();
        assert_eq!(df.escape, '`');
        assert_eq!(df.directives["escape"], "`");
        assert_eq!(df.stages[0].commands[0].original, "RUN a   b");
    }

    #[test]
    fn directives_stop_at_first_other_line() {
        let df = parse("# syntax=docker/dockerfile:1\n# hello\n# escape=`\nFROM x\n").unwrap();
        assert_eq!(df.directives.len(), 1);
        assert_eq!(df.escape, '\\');
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let df = parse("from x as Builder\nrun true\n").unwrap();
        assert_eq!(df.stages[0].name.as_deref(), Some("builder"));
        assert_eq!(df.stages[0].commands[0].keyword, "RUN");
    }

    #[test]
    fn env_forms() {
        let df = parse("FROM x\nENV A=1 B=\"two words\"\nENV C  legacy value\n").unwrap();
        let cmds = &df.stages[0].commands;
        assert_eq!(
            cmds[0].instruction,
            Instruction::Env(vec![
                KeyValue {
                    key: "A".into(),
                    value: "1".into()
                },
                KeyValue {
                    key: "B".into(),
                    value: "\"two words\"".into()
                }
            ])
        );
        assert_eq!(
            cmds[1].instruction,
            Instruction::Env(vec![KeyValue {
                key: "C".into(),
                value: "legacy value".into()
            }])
        );
    }

    #[test]
    fn heredoc_detection() {
        assert!(has_heredoc("<<EOF"));
        assert!(has_heredoc("cat <<-'EOF'"));
        assert!(!has_heredoc("echo $((1 << 2))"));
    }

    #[test]
    fn errors_carry_lines() {
        assert_eq!(
            parse("FROM x\nFOO bar\n").unwrap_err().to_string(),
            "2: unknown instruction: FOO"
        );
        assert_eq!(
            parse("RUN x\n").unwrap_err().to_string(),
            "1: no build stage in current context: RUN before FROM"
        );
        assert_eq!(parse("FROM x\nCOPY --bogus=1 a b\n").unwrap_err().line, 2);
        assert_eq!(parse("FROM a b\n").unwrap_err().line, 1);
    }
}
