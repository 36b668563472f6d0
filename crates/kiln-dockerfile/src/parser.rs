//! Dockerfile text → [`Dockerfile`]: directives, comments, continuations, instructions.

use std::collections::BTreeMap;

use crate::diagnostic::{locate, suggest, with_hint, Column, Location};
use crate::shell::split_words;

/// A parse failure: the lines of the offending instruction, the offending word when the error
/// names one, and what is wrong (BuildKit's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dockerfile parse error on line {line}: {message}")]
pub struct ParseError {
    /// First line of the instruction, 1-based.
    pub line: usize,
    /// Last line of the instruction, 1-based.
    pub end_line: usize,
    /// The offending word, when the error names one.
    pub column: Option<Column>,
    /// What is wrong.
    pub message: String,
    /// The word to look for in the instruction's lines once they are known.
    token: Option<String>,
}

impl ParseError {
    pub(crate) fn new(line: usize, message: impl Into<String>) -> Self {
        ParseError {
            line,
            end_line: line,
            column: None,
            message: message.into(),
            token: None,
        }
    }

    /// Names the word the error is about (found in the source by [`ParseError::placed`]).
    fn at(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Widens the error to the lines of its instruction and locates its word in them.
    fn placed(mut self, source: &str, span: Span) -> Self {
        if self.line == span.start {
            self.end_line = self.end_line.max(span.end);
        }
        if let Some(token) = &self.token {
            let lines = Span {
                start: self.line,
                end: self.end_line,
            };
            self.column = locate(source, lines, token);
        }
        self
    }

    /// Where the error points, for [`excerpt`](crate::excerpt).
    pub fn location(&self) -> Location {
        Location {
            start_line: self.line,
            end_line: self.end_line.max(self.line),
            column: self.column,
        }
    }
}

fn error(line: usize, message: impl Into<String>) -> ParseError {
    ParseError::new(line, message)
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

/// An inline document (`<<EOF` ... `EOF`) attached to a `RUN`, `COPY` or `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed (`EOF`); for `COPY`/`ADD` also the file name.
    pub name: String,
    /// The body: every line up to the delimiter, each with its newline.
    pub content: String,
    /// Whether variables in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the body and the delimiter line.
    pub chomp: bool,
}

impl Heredoc {
    /// The body with leading tabs removed when [`Heredoc::chomp`] is set (BuildKit's
    /// `ChompHeredocContent`).
    pub fn data(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        let mut out = String::with_capacity(self.content.len());
        for line in self.content.split_inclusive('\n') {
            out.push_str(line.trim_start_matches('\t'));
        }
        out
    }
}

/// `COPY`/`ADD [--from=] [--chown=] [--chmod=] [--link] src... dest` (`--from` is `COPY` only;
/// `--keep-git-dir`, `--checksum` and `--unpack` are `ADD` only).
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
    /// `--exclude` patterns (repeatable), unexpanded.
    pub excludes: Vec<String>,
    /// `COPY --parents`: keep the sources' parent directories under the destination.
    pub parents: bool,
    /// `ADD --keep-git-dir` (only meaningful for git sources).
    pub keep_git_dir: Option<bool>,
    /// `ADD --checksum` (only meaningful for http and git sources).
    pub checksum: Option<String>,
    /// `ADD --unpack`: force or disable archive extraction.
    pub unpack: Option<bool>,
    /// Sources, unexpanded (heredoc sources are in [`CopyInstruction::heredocs`]).
    pub sources: Vec<String>,
    /// Inline documents used as sources (`COPY <<EOF /dest`), in order.
    pub heredocs: Vec<Heredoc>,
    /// Destination, unexpanded.
    pub dest: String,
}

/// `HEALTHCHECK`: `NONE` (test `["NONE"]`, no timings) or `CMD` with its options. Durations are
/// in nanoseconds, zero when not given (Docker's config omits them then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthcheckInstruction {
    /// `["NONE"]`, `["CMD", args...]` (exec form) or `["CMD-SHELL", command]`.
    pub test: Vec<String>,
    /// `--interval`.
    pub interval: i64,
    /// `--timeout`.
    pub timeout: i64,
    /// `--start-period`.
    pub start_period: i64,
    /// `--start-interval`.
    pub start_interval: i64,
    /// `--retries`.
    pub retries: i64,
}

/// A Dockerfile instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Instruction {
    /// `RUN` with its flags (`--network`, `--security`, `--mount`; `--device` is not supported
    /// yet).
    Run {
        /// Flags as written (`network=none`).
        flags: Vec<String>,
        /// The command.
        command: CommandLine,
        /// Inline documents named in the command line, in order.
        heredocs: Vec<Heredoc>,
    },
    /// `COPY`.
    Copy(CopyInstruction),
    /// `ADD` (local sources are extracted when they are archives; http(s) URLs are fetched).
    Add(CopyInstruction),
    /// `EXPOSE port...`, sorted as BuildKit does, unexpanded.
    Expose(Vec<String>),
    /// `VOLUME` (JSON or whitespace-separated paths), unexpanded.
    Volume(Vec<String>),
    /// `STOPSIGNAL signal`, unexpanded.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(HealthcheckInstruction),
    /// `ONBUILD <instruction>`: the trigger text as stored in the image's `OnBuild`.
    Onbuild(String),
    /// `MAINTAINER name` (sets the image author).
    Maintainer(String),
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
    heredocs: Vec<Heredoc>,
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
        let mut heredocs = Vec::new();
        if can_contain_heredoc(&text) {
            for (name, expand, chomp) in heredoc_markers(&text) {
                let mut content = String::new();
                let mut terminated = false;
                while index < lines.len() {
                    let line = lines[index];
                    index += 1;
                    end = index;
                    let candidate = line.trim_end_matches('\r');
                    let candidate = if chomp {
                        candidate.trim_start_matches('\t')
                    } else {
                        candidate
                    };
                    if candidate == name {
                        terminated = true;
                        break;
                    }
                    content.push_str(line);
                    content.push('\n');
                }
                if !terminated {
                    return Err(error(start, "unterminated heredoc"));
                }
                heredocs.push(Heredoc {
                    name,
                    content,
                    expand,
                    chomp,
                });
            }
        }
        logical.push(Logical {
            span: Span { start, end },
            text,
            heredocs,
        });
    }

    let mut dockerfile = Dockerfile {
        directives,
        escape,
        meta_args: Vec::new(),
        stages: Vec::new(),
    };
    for line in logical {
        let span = line.span;
        add_instruction(&mut dockerfile, line).map_err(|e| e.placed(source, span))?;
    }
    Ok(dockerfile)
}

/// Parses one logical line and adds it to the file: a new stage or a command of the current one.
fn add_instruction(dockerfile: &mut Dockerfile, line: Logical) -> Result<(), ParseError> {
    let original = line.text.trim().to_string();
    let (word, rest) = split_first_word(&original);
    let keyword = word.to_ascii_uppercase();
    if !KNOWN.contains(&keyword.as_str()) {
        let message = format!("unknown instruction: {word}");
        return Err(error(
            line.span.start,
            with_hint(message, suggest(word, KNOWN, false)),
        )
        .at(word));
    }
    let (flags, rest) = extract_flags(rest);
    if keyword == "FROM" {
        let stage = parse_from(&flags, rest, line.span, &original)?;
        dockerfile.stages.push(stage);
        return Ok(());
    }
    let instruction = parse_instruction(
        &keyword,
        flags,
        rest,
        &original,
        line.heredocs,
        line.span.start,
        dockerfile.escape,
    )?;
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
    Ok(())
}

/// BuildKit's flag checks: every flag known to the instruction (names are case-sensitive; a
/// near miss gets a hint), and only `repeatable` ones given more than once.
fn check_flags(
    flags: &[(String, Option<String>)],
    known: &[&str],
    repeatable: &[&str],
    line: usize,
) -> Result<(), ParseError> {
    for (index, (name, _)) in flags.iter().enumerate() {
        let flag = format!("--{name}");
        if !known.contains(&name.as_str()) {
            let message = with_hint(format!("unknown flag: {flag}"), suggest(name, known, true));
            return Err(error(line, message).at(flag));
        }
        if !repeatable.contains(&name.as_str()) && flags[..index].iter().any(|(n, _)| n == name) {
            return Err(error(line, format!("duplicate flag specified: {flag}")).at(flag));
        }
    }
    Ok(())
}

/// A boolean flag: `--link`, `--link=true` or `--link=false` (any case).
fn bool_flag(name: &str, value: &Option<String>, line: usize) -> Result<bool, ParseError> {
    match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some("") => {
            Err(error(line, format!("missing a value on flag: --{name}")).at(format!("--{name}")))
        }
        Some(_) => Err(error(
            line,
            format!(
                "expecting boolean value for flag {name}, not: {}",
                value.as_deref().unwrap_or_default()
            ),
        )
        .at(format!("--{name}"))),
    }
}

/// Whether the logical line is an instruction whose following lines may hold heredoc bodies:
/// `RUN`, `COPY`, `ADD` (also as an `ONBUILD` trigger) in shell form (BuildKit's
/// `canContainHeredoc`).
fn can_contain_heredoc(text: &str) -> bool {
    let (word, rest) = split_first_word(text.trim());
    let (word, rest) = if word.eq_ignore_ascii_case("ONBUILD") {
        split_first_word(rest)
    } else {
        (word, rest)
    };
    if !["RUN", "COPY", "ADD"].contains(&word.to_ascii_uppercase().as_str()) {
        return false;
    }
    let (_, args) = extract_flags(rest);
    !matches!(command_line(args), CommandLine::Exec(_))
}

/// Heredoc markers of a line in order: `(name, expand, chomp)`. Each whitespace-separated word
/// (quotes and escapes kept) matching `<<[-]WORD` (optionally after a file-descriptor number) is
/// one; the body is expanded only when no part of `WORD` is quoted.
fn heredoc_markers(line: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    for word in split_words(line, '\\') {
        if let Some(marker) = parse_heredoc_word(&word) {
            out.push(marker);
        }
    }
    out
}

/// One word as a heredoc marker (BuildKit's `ParseHeredoc` on `^(\d*)<<(-?)([^<]*)$`).
pub(crate) fn parse_heredoc_word(word: &str) -> Option<(String, bool, bool)> {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let lexer = crate::shell::Lexer {
        skip_unset: true,
        ..crate::shell::Lexer::new('\\')
    };
    let name = lexer.process_word(rest, &[]).ok()?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let raw = crate::shell::Lexer {
        raw_quotes: true,
        ..lexer
    }
    .process_word(rest, &[])
    .ok()?;
    let quotes = |s: &str| s.chars().filter(|c| *c == '\'' || *c == '"').count();
    let expand = quotes(&name) == quotes(&raw);
    Some((name, expand, chomp))
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
            Some((name, value)) => flags.push((name.to_string(), Some(value.to_string()))),
            None => flags.push((flag.to_string(), None)),
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
    check_flags(flags, &["platform"], &[], span.start)?;
    let mut platform = None;
    for (name, value) in flags {
        platform = Some(flag_value(name, value, span.start)?);
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
                )
                .at(words[2]));
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
    value.clone().ok_or_else(|| {
        error(line, format!("missing a value on flag: --{name}")).at(format!("--{name}"))
    })
}

fn parse_instruction(
    keyword: &str,
    flags: Vec<(String, Option<String>)>,
    rest: &str,
    original: &str,
    heredocs: Vec<Heredoc>,
    line: usize,
    escape: char,
) -> Result<Instruction, ParseError> {
    let no_flags = |flags: &[(String, Option<String>)]| check_flags(flags, &[], &[], line);
    Ok(match keyword {
        "RUN" => {
            check_flags(
                &flags,
                &["mount", "network", "security", "device"],
                &["mount", "device"],
                line,
            )?;
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
                heredocs,
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
        "COPY" => Instruction::Copy(parse_copy("COPY", flags, rest, heredocs, line)?),
        "ADD" => Instruction::Add(parse_copy("ADD", flags, rest, heredocs, line)?),
        "EXPOSE" => {
            no_flags(&flags)?;
            let mut ports: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            if ports.is_empty() {
                return Err(error(line, "EXPOSE requires at least one argument"));
            }
            ports.sort();
            Instruction::Expose(ports)
        }
        "VOLUME" => {
            no_flags(&flags)?;
            let words = match command_line(rest) {
                CommandLine::Exec(words) => words,
                CommandLine::Shell(text) => text.split_whitespace().map(str::to_string).collect(),
            };
            if words.is_empty() {
                return Err(error(line, "VOLUME requires at least one argument"));
            }
            let mut volumes = Vec::new();
            for word in words {
                let word = word.trim();
                if word.is_empty() {
                    return Err(error(line, "VOLUME specified can not be an empty string"));
                }
                volumes.push(word.to_string());
            }
            Instruction::Volume(volumes)
        }
        "STOPSIGNAL" | "MAINTAINER" => {
            no_flags(&flags)?;
            if rest.is_empty() {
                return Err(error(
                    line,
                    format!("{keyword} requires exactly one argument"),
                ));
            }
            if keyword == "STOPSIGNAL" {
                Instruction::StopSignal(rest.to_string())
            } else {
                Instruction::Maintainer(rest.to_string())
            }
        }
        "HEALTHCHECK" => Instruction::Healthcheck(parse_healthcheck(&flags, rest, line)?),
        "ONBUILD" => {
            no_flags(&flags)?;
            let (trigger, _) = split_first_word(rest);
            if trigger.is_empty() {
                return Err(error(line, "ONBUILD requires at least one argument"));
            }
            let trigger = trigger.to_ascii_uppercase();
            match trigger.as_str() {
                "ONBUILD" => {
                    return Err(error(
                        line,
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
                    ))
                }
                "MAINTAINER" | "FROM" => {
                    return Err(error(
                        line,
                        format!("{trigger} isn't allowed as an ONBUILD trigger"),
                    ))
                }
                _ => {}
            }
            // The instruction text after the ONBUILD keyword, heredoc bodies appended.
            let (_, expression) = split_first_word(original);
            let mut expression = expression.to_string();
            for doc in &heredocs {
                expression.push('\n');
                expression.push_str(&doc.content);
                expression.push_str(&doc.name);
            }
            Instruction::Onbuild(expression)
        }
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
        other => return Err(error(line, format!("unknown instruction: {other}"))),
    })
}

/// `HEALTHCHECK [options] CMD ...` or `HEALTHCHECK NONE` (BuildKit's `parseHealthcheck`).
fn parse_healthcheck(
    flags: &[(String, Option<String>)],
    rest: &str,
    line: usize,
) -> Result<HealthcheckInstruction, ParseError> {
    let (kind, args) = split_first_word(rest);
    if kind.is_empty() {
        return Err(error(line, "HEALTHCHECK requires at least one argument"));
    }
    let kind = kind.to_ascii_uppercase();
    let mut check = HealthcheckInstruction {
        test: Vec::new(),
        interval: 0,
        timeout: 0,
        start_period: 0,
        start_interval: 0,
        retries: 0,
    };
    if kind == "NONE" {
        // BuildKit does not look at the flags of `HEALTHCHECK NONE`.
        if !args.is_empty() {
            return Err(error(line, "HEALTHCHECK NONE takes no arguments"));
        }
        check.test = vec![kind];
        return Ok(check);
    }
    check_flags(
        flags,
        &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
        &[],
        line,
    )?;
    for (name, value) in flags {
        let slot = match name.as_str() {
            "interval" => &mut check.interval,
            "timeout" => &mut check.timeout,
            "start-period" => &mut check.start_period,
            "start-interval" => &mut check.start_interval,
            "retries" => {
                let value = flag_value(name, value, line)?;
                if value.is_empty() {
                    continue;
                }
                let retries: i32 = value.parse().map_err(|_| {
                    error(
                        line,
                        format!("strconv.ParseInt: parsing {value:?}: invalid syntax"),
                    )
                })?;
                if retries < 0 {
                    return Err(error(
                        line,
                        format!("--retries cannot be negative ({retries})"),
                    ));
                }
                check.retries = i64::from(retries);
                continue;
            }
            _ => continue,
        };
        let value = flag_value(name, value, line)?;
        if value.is_empty() {
            continue;
        }
        let nanos = parse_go_duration(&value)
            .ok_or_else(|| error(line, format!("time: invalid duration {value:?}")))?;
        if nanos != 0 && nanos < 1_000_000 {
            return Err(error(
                line,
                format!("Interval {name:?} cannot be less than 1ms"),
            ));
        }
        *slot = nanos;
    }
    if kind != "CMD" {
        return Err(error(
            line,
            format!("Unknown type {kind:?} in HEALTHCHECK (try CMD)"),
        )
        .at(kind));
    }
    let test = match command_line(args) {
        CommandLine::Exec(words) if !words.is_empty() => {
            let mut test = vec!["CMD".to_string()];
            test.extend(words);
            test
        }
        CommandLine::Shell(text) if !text.is_empty() => vec!["CMD-SHELL".to_string(), text],
        _ => return Err(error(line, "Missing command after HEALTHCHECK CMD")),
    };
    check.test = test;
    Ok(check)
}

/// Go's `time.ParseDuration` in nanoseconds (`1m30s`, `1.5h`, `300ms`, `0`).
pub(crate) fn parse_go_duration(text: &str) -> Option<i64> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_end];
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += value * scale;
    }
    if total > i64::MAX as f64 {
        return None;
    }
    let nanos = total.round() as i64;
    Some(if negative { -nanos } else { nanos })
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
    keyword: &str,
    flags: Vec<(String, Option<String>)>,
    rest: &str,
    heredocs: Vec<Heredoc>,
    line: usize,
) -> Result<CopyInstruction, ParseError> {
    let add = keyword == "ADD";
    let mut copy = CopyInstruction {
        from: None,
        chown: None,
        chmod: None,
        link: false,
        excludes: Vec::new(),
        parents: false,
        keep_git_dir: None,
        checksum: None,
        unpack: None,
        sources: Vec::new(),
        heredocs: Vec::new(),
        dest: String::new(),
    };
    let known: &[&str] = if add {
        &[
            "chown",
            "chmod",
            "link",
            "keep-git-dir",
            "checksum",
            "unpack",
            "exclude",
        ]
    } else {
        &["from", "chown", "chmod", "link", "parents", "exclude"]
    };
    check_flags(&flags, known, &["exclude"], line)?;
    for (name, value) in &flags {
        match name.as_str() {
            "from" => copy.from = Some(flag_value(name, value, line)?),
            "chown" => copy.chown = Some(flag_value(name, value, line)?),
            "chmod" => copy.chmod = Some(flag_value(name, value, line)?),
            "link" => copy.link = bool_flag(name, value, line)?,
            "keep-git-dir" => copy.keep_git_dir = Some(bool_flag(name, value, line)?),
            "checksum" => copy.checksum = Some(flag_value(name, value, line)?),
            "unpack" => copy.unpack = Some(bool_flag(name, value, line)?),
            "exclude" => copy.excludes.push(flag_value(name, value, line)?),
            "parents" => copy.parents = bool_flag(name, value, line)?,
            _ => {}
        }
    }
    let mut words = match command_line(rest) {
        CommandLine::Exec(words) => words,
        CommandLine::Shell(text) => text.split_whitespace().map(str::to_string).collect(),
    };
    if words.len() < 2 {
        return Err(error(
            line,
            format!(
                "{keyword} requires at least two arguments, but only one was provided. Destination could not be determined"
            ),
        ));
    }
    copy.dest = words.pop().unwrap_or_default();
    if parse_heredoc_word(&copy.dest).is_some() && !heredocs.is_empty() {
        return Err(error(
            line,
            format!("{keyword} cannot accept a heredoc as a destination"),
        ));
    }
    for word in words {
        match parse_heredoc_word(&word) {
            Some((name, _, _)) if !heredocs.is_empty() => {
                let doc = heredocs
                    .iter()
                    .find(|d| d.name == name)
                    .cloned()
                    .ok_or_else(|| error(line, format!("heredoc {name} has no body")))?;
                copy.heredocs.push(doc);
            }
            _ => copy.sources.push(word),
        }
    }
    Ok(copy)
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
                command: CommandLine::Shell("echo a   && echo b".into()),
                heredocs: vec![],
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
        assert_eq!(
            parse_heredoc_word("<<EOF"),
            Some(("EOF".to_string(), true, false))
        );
        assert_eq!(
            parse_heredoc_word("<<-'EOF'"),
            Some(("EOF".to_string(), false, true))
        );
        assert_eq!(
            parse_heredoc_word("2<<\"E\"OF"),
            Some(("EOF".to_string(), false, false))
        );
        assert_eq!(parse_heredoc_word("<<"), None);
        assert!(heredoc_markers("echo $((1 << 2))").is_empty());
        assert_eq!(heredoc_markers("RUN cat <<A <<-B").len(), 2);
    }

    #[test]
    fn heredoc_bodies_are_read_after_the_line() {
        let df = parse("FROM x\nRUN <<-EOF cat\n\techo a\n\tEOF\nCMD [\"b\"]\n").unwrap();
        let run = &df.stages[0].commands[0];
        assert_eq!(run.span, Span { start: 2, end: 4 });
        let Instruction::Run { heredocs, .. } = &run.instruction else {
            panic!("not a run")
        };
        assert_eq!(heredocs[0].content, "\techo a\n");
        assert_eq!(heredocs[0].data(), "echo a\n");
        assert_eq!(df.stages[0].commands[1].keyword, "CMD");
        assert_eq!(
            parse("FROM x\nRUN <<EOF\necho\n").unwrap_err().to_string(),
            "dockerfile parse error on line 2: unterminated heredoc"
        );
        // JSON form never reads heredocs.
        let df = parse("FROM x\nRUN [\"<<EOF\"]\nCMD x\n").unwrap();
        assert_eq!(df.stages[0].commands.len(), 2);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Some(30_000_000_000));
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000_000_000));
        assert_eq!(parse_go_duration("10ms"), Some(10_000_000));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn healthcheck_forms() {
        let df = parse(
            "FROM x\nHEALTHCHECK --interval=5m --timeout=3s --retries=3 CMD curl -f http://x/ || exit 1\n",
        )
        .unwrap();
        let Instruction::Healthcheck(h) = &df.stages[0].commands[0].instruction else {
            panic!("not a healthcheck")
        };
        assert_eq!(h.test, vec!["CMD-SHELL", "curl -f http://x/ || exit 1"]);
        assert_eq!(h.interval, 300_000_000_000);
        assert_eq!(h.timeout, 3_000_000_000);
        assert_eq!(h.retries, 3);
        let err = parse("FROM x\nHEALTHCHECK --interval=1us CMD true\n").unwrap_err();
        assert_eq!(err.message, "Interval \"interval\" cannot be less than 1ms");
        let err = parse("FROM x\nHEALTHCHECK NONE x\n").unwrap_err();
        assert_eq!(err.message, "HEALTHCHECK NONE takes no arguments");
        let err = parse("FROM x\nHEALTHCHECK FOO x\n").unwrap_err();
        assert_eq!(err.message, "Unknown type \"FOO\" in HEALTHCHECK (try CMD)");
    }

    #[test]
    fn onbuild_rules() {
        let df = parse("FROM x\nonbuild  RUN echo hi\n").unwrap();
        assert_eq!(
            df.stages[0].commands[0].instruction,
            Instruction::Onbuild("RUN echo hi".into())
        );
        assert!(parse("FROM x\nONBUILD ONBUILD RUN x\n").is_err());
        assert_eq!(
            parse("FROM x\nONBUILD from y\n").unwrap_err().message,
            "FROM isn't allowed as an ONBUILD trigger"
        );
    }

    #[test]
    fn errors_carry_lines() {
        assert_eq!(
            parse("FROM x\nFOO bar\n").unwrap_err().to_string(),
            "dockerfile parse error on line 2: unknown instruction: FOO (did you mean FROM?)"
        );
        assert_eq!(
            parse("RUN x\n").unwrap_err().to_string(),
            "dockerfile parse error on line 1: no build stage in current context: RUN before FROM"
        );
        assert_eq!(parse("FROM x\nCOPY --bogus=1 a b\n").unwrap_err().line, 2);
        assert_eq!(parse("FROM a b\n").unwrap_err().line, 1);
    }

    #[test]
    fn errors_carry_span_and_column() {
        let e = parse("FROM x\nRUN --network=none \\\n  --mnt=x \\\n  true\nCMD y\n").unwrap_err();
        assert_eq!((e.line, e.end_line), (2, 4));
        assert_eq!(
            e.column,
            Some(Column {
                line: 3,
                start: 3,
                width: 5
            })
        );
        assert_eq!(e.message, "unknown flag: --mnt (did you mean mount?)");
        let e = parse("FROM x\n\tcopy --FROM=a b c\n").unwrap_err();
        assert_eq!(e.message, "unknown flag: --FROM");
        assert_eq!(e.column.map(|c| (c.line, c.start)), Some((2, 7)));
        let e = parse("FROM x\nWORKDIR --link /a\n").unwrap_err();
        assert_eq!(e.message, "unknown flag: --link");
        let e = parse("FROM x\nCOPY --from a b\n").unwrap_err();
        assert_eq!(e.message, "missing a value on flag: --from");
    }
}
