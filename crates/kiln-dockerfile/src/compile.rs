//! [`Dockerfile`] → LLB definition + image config, the way BuildKit's `dockerfile2llb` does it.

use std::collections::{BTreeMap, BTreeSet};

use kiln_image::oci::{EmptyObject, HealthConfig, History, ImageConfig, Platform, RuntimeConfig};
use kiln_image::reference::Reference;
use kiln_image::Digest;
use kiln_llb::{pb, DefinitionBuilder, OutputRef};

use crate::diagnostic::Location;
use crate::parser::{
    parse_heredoc_word, CommandLine, CopyInstruction, Dockerfile, Heredoc, Instruction, KeyValue,
    Span, Stage,
};
use crate::shell::{ExpandError, Lexer};

/// `PATH` BuildKit adds when the image has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";
const CUSTOM_NAME: &str = "llb.customname";
const DOCKERFILE_COMMAND: &str = "com.docker.dockerfile.v1.command";

/// Boxed error returned by an [`ImageMetaResolver`].
pub type ResolveError = Box<dyn std::error::Error + Send + Sync>;

/// Resolves an image reference to its manifest digest and config JSON for a platform.
#[async_trait::async_trait]
pub trait ImageMetaResolver: Send + Sync {
    /// The manifest digest and the config blob of `reference` for `platform`.
    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<(Digest, Vec<u8>), ResolveError>;

    /// The reference the build's source op pins (with its digest), the manifest digest and the
    /// config blob. By default `reference` itself; a resolver that rewrites references (a
    /// source policy converting the image) returns the one it resolved.
    async fn resolve_pinned(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<(Reference, Digest, Vec<u8>), ResolveError> {
        let (digest, config) = self.resolve(reference, platform).await?;
        Ok((reference.with_digest(digest.clone()), digest, config))
    }
}

/// Inputs of [`compile`] besides the Dockerfile.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// Dockerfile name shown in source locations (default `Dockerfile`).
    pub filename: String,
    /// The Dockerfile bytes, carried in `pb::Source`.
    pub source: Vec<u8>,
    /// Stage to build (default: the last one).
    pub target: Option<String>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `--label` values, merged into the result's labels.
    pub labels: BTreeMap<String, String>,
    /// Target platform (`TARGETPLATFORM`, the platform of stages without `--platform`).
    pub platform: Platform,
    /// The platform the build runs on (`BUILDPLATFORM`): the worker's, whatever the target.
    pub build_platform: Platform,
    /// This compile is one platform of a multi-platform build: step names carry the platform.
    pub multi_platform: bool,
    /// Session id for the local context source.
    pub session_id: String,
    /// Name of the main context local source (default `context`).
    pub context_name: String,
    /// `.dockerignore` patterns for the main context.
    pub excludes: Vec<String>,
    /// Network mode of every `RUN` without its own `--network` (frontend
    /// attr `force-network-mode`; `Unset` = the worker's default).
    pub network: pb::NetMode,
    /// Extra `/etc/hosts` entries of every `RUN` (frontend attr `add-hosts`).
    pub extra_hosts: Vec<(String, String)>,
    /// `--build-context` overrides (frontend attrs `context:<name>`), by the name a `FROM` or
    /// `COPY --from` uses.
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// Stages whose steps ignore the cache (frontend attr `no-cache=<stage>,…`, what
    /// `--no-cache-filter` sends), by name; `no-cache=""` (every stage) is the solver's
    /// `no_cache` instead.
    pub no_cache_stages: Vec<String>,
}

/// What a `--build-context name=…` replaces `name` with (frontend attr `context:<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// `local:<local name>`: a directory the client serves in the session under that name.
    Local(String),
    /// `docker-image://<reference>`: another image.
    Image(String),
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            filename: "Dockerfile".to_string(),
            source: Vec::new(),
            target: None,
            build_args: BTreeMap::new(),
            labels: BTreeMap::new(),
            platform: Platform::host(),
            build_platform: Platform::host(),
            multi_platform: false,
            session_id: String::new(),
            context_name: "context".to_string(),
            excludes: Vec::new(),
            network: pb::NetMode::Unset,
            extra_hosts: Vec::new(),
            named_contexts: BTreeMap::new(),
            no_cache_stages: Vec::new(),
        }
    }
}

/// What [`compile`] produces.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The LLB of the target stage.
    pub definition: pb::Definition,
    /// The image config of the target stage (`rootfs.diff_ids` left to the exporter).
    pub image_config: ImageConfig,
}

/// Why a Dockerfile could not be compiled. The place is [`CompileError::line`] (rendered with
/// [`CompileError::location`]), not part of the message.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The file has no `FROM`.
    #[error("dockerfile contains no stages to build")]
    NoStages,
    /// `--target` names no stage.
    #[error("target stage {target:?} could not be found")]
    TargetNotFound {
        /// The requested target.
        target: String,
    },
    /// A known instruction kiln does not compile yet.
    #[error("instruction {instruction} is not supported yet")]
    Unsupported {
        /// Line of the instruction.
        line: usize,
        /// The keyword.
        instruction: String,
    },
    /// A flag kiln does not support yet.
    #[error("{instruction} --{flag} is not supported yet")]
    UnsupportedFlag {
        /// Line of the instruction.
        line: usize,
        /// The keyword.
        instruction: String,
        /// The flag name.
        flag: String,
    },
    /// A variable expansion failed.
    #[error("failed to expand {word:?}")]
    Expand {
        /// Line of the instruction.
        line: usize,
        /// The word.
        word: String,
        /// What went wrong.
        #[source]
        source: ExpandError,
    },
    /// `FROM` expands to nothing.
    #[error("base name ({base}) should not be blank")]
    BlankBase {
        /// Line of the `FROM`.
        line: usize,
        /// The base as written.
        base: String,
    },
    /// An image reference does not parse.
    #[error("failed to parse image reference {reference:?}")]
    Reference {
        /// Line of the instruction.
        line: usize,
        /// The reference.
        reference: String,
        /// Parser error.
        #[source]
        source: kiln_image::reference::ParseError,
    },
    /// `--platform` does not parse.
    #[error("failed to parse platform {platform:?}")]
    Platform {
        /// Line of the `FROM`.
        line: usize,
        /// The expanded value.
        platform: String,
    },
    /// The resolver failed.
    #[error("failed to resolve {reference}")]
    Resolve {
        /// Line of the instruction.
        line: usize,
        /// The reference.
        reference: String,
        /// Resolver error.
        #[source]
        source: ResolveError,
    },
    /// The image config the resolver returned is not valid JSON.
    #[error("failed to parse image config of {reference}")]
    ImageConfig {
        /// Line of the instruction.
        line: usize,
        /// The reference.
        reference: String,
        /// JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// `COPY --from` with a variable.
    #[error("variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround")]
    FromExpansion {
        /// Line of the `COPY`.
        line: usize,
    },
    /// `COPY --from=<n>` out of range.
    #[error("invalid stage index {index}")]
    StageIndex {
        /// Line of the `COPY`.
        line: usize,
        /// The index.
        index: usize,
    },
    /// `COPY --from` names a later stage.
    #[error(
        "cannot copy from stage {from:?}, it needs to be defined before current stage {stage:?}"
    )]
    StageOrder {
        /// Line of the `COPY`.
        line: usize,
        /// The `--from` value.
        from: String,
        /// The current stage name.
        stage: String,
    },
    /// `COPY --from=<own stage>` or a stage built on itself.
    #[error("circular dependency detected on stage: {stage}")]
    Circular {
        /// Line of the instruction.
        line: usize,
        /// The stage.
        stage: String,
    },
    /// `--chmod` is not octal.
    #[error(
        "invalid chmod parameter: '{value}'. it should be octal string and between 0 and 07777"
    )]
    Chmod {
        /// Line of the `COPY`.
        line: usize,
        /// The value.
        value: String,
    },
    /// `--chown` is malformed.
    #[error("invalid chown parameter: {value:?}")]
    Chown {
        /// Line of the `COPY`.
        line: usize,
        /// The value.
        value: String,
    },
    /// `WORKDIR` expands to nothing.
    #[error("cannot normalize nothing")]
    EmptyWorkdir {
        /// Line of the `WORKDIR`.
        line: usize,
    },
    /// An argument BuildKit rejects (bad port, signal, network mode, ...); the message is
    /// BuildKit's.
    #[error("{message}")]
    Invalid {
        /// Line of the instruction.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A source kind kiln cannot build from yet (a git repository).
    #[error("{what} is not supported yet")]
    UnsupportedSource {
        /// Line of the instruction.
        line: usize,
        /// The kind of source.
        what: String,
    },
    /// An `ONBUILD` trigger of the base does not parse.
    #[error("failed to parse onbuild trigger {trigger:?}")]
    Trigger {
        /// Line of the `FROM` whose base carries the trigger.
        line: usize,
        /// The trigger text.
        trigger: String,
        /// Parser error (its line is relative to the trigger).
        #[source]
        source: Box<crate::parser::ParseError>,
    },
    /// Building the LLB failed (a bug in the compiler).
    #[error("failed to build llb")]
    Llb(#[from] kiln_llb::Error),
}

impl CompileError {
    /// The 1-based line of the instruction at fault, when one is.
    pub fn line(&self) -> Option<usize> {
        use CompileError::*;
        match self {
            NoStages | TargetNotFound { .. } | Llb(_) => None,
            Unsupported { line, .. }
            | UnsupportedFlag { line, .. }
            | Expand { line, .. }
            | BlankBase { line, .. }
            | Reference { line, .. }
            | Platform { line, .. }
            | Resolve { line, .. }
            | ImageConfig { line, .. }
            | FromExpansion { line }
            | StageIndex { line, .. }
            | StageOrder { line, .. }
            | Circular { line, .. }
            | Chmod { line, .. }
            | Chown { line, .. }
            | EmptyWorkdir { line }
            | Invalid { line, .. }
            | UnsupportedSource { line, .. }
            | Trigger { line, .. } => Some(*line),
        }
    }

    /// The word of the instruction the error is about, as written in the source.
    fn token(&self) -> Option<String> {
        use CompileError::*;
        match self {
            UnsupportedFlag { flag, .. } => Some(format!("--{flag}")),
            Expand { word, .. } => Some(word.clone()),
            BlankBase { base, .. } => Some(base.clone()),
            Reference { reference, .. } | Resolve { reference, .. } => Some(reference.clone()),
            FromExpansion { .. } => Some("--from".to_string()),
            StageOrder { from, .. } => Some(from.clone()),
            Chmod { value, .. } | Chown { value, .. } => Some(value.clone()),
            _ => None,
        }
    }

    /// Where the error points in `source` (the text `dockerfile` was parsed from): the lines of
    /// the instruction at fault and, when the error names a word found there, its column.
    pub fn location(&self, dockerfile: &Dockerfile, source: &str) -> Option<Location> {
        let line = self.line()?;
        let span = dockerfile
            .stages
            .iter()
            .flat_map(|stage| {
                std::iter::once(stage.span).chain(stage.commands.iter().map(|c| c.span))
            })
            .chain(dockerfile.meta_args.iter().map(|c| c.span))
            .find(|span| span.start == line)
            .unwrap_or(Span {
                start: line,
                end: line,
            });
        let column = self
            .token()
            .and_then(|token| crate::diagnostic::locate(source, span, &token));
        Some(Location {
            start_line: span.start,
            end_line: span.end,
            column,
        })
    }
}

/// What a stage starts from.
#[derive(Debug, Clone)]
enum Base {
    Scratch,
    Image(String),
    Stage(usize),
}

/// What a `COPY`/`ADD` source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    /// A path in the build context or the `--from` stage/image.
    Local,
    /// An `http(s)://` URL (ADD only).
    Http,
    /// A git repository (ADD only).
    Git,
}

/// What `COPY --from` names.
#[derive(Debug, Clone)]
enum CopySource {
    Stage(usize),
    Image(String),
}

/// A stage's build state: the LLB output plus what later instructions see.
#[derive(Debug, Clone)]
struct State {
    output: Option<OutputRef>,
    platform: Platform,
    /// The process environment (image env plus stage ARGs), in definition order.
    env: Vec<(String, String)>,
    dir: String,
    user: String,
    image: ImageConfig,
    /// ARGs declared in the stage with their values, for `RUN` history.
    build_args: Vec<(String, Option<String>)>,
    /// CMD set in this stage (so ENTRYPOINT keeps it).
    cmd_set: bool,
}

impl State {
    fn runtime(&mut self) -> &mut RuntimeConfig {
        self.image.config.get_or_insert_with(RuntimeConfig::default)
    }

    fn add_env(&mut self, key: &str, value: &str) {
        set_pair(&mut self.env, key, value);
    }
}

fn set_pair(list: &mut Vec<(String, String)>, key: &str, value: &str) {
    match list.iter_mut().find(|(k, _)| k == key) {
        Some(pair) => pair.1 = value.to_string(),
        None => list.push((key.to_string(), value.to_string())),
    }
}

/// Progress-name counter of one stage (`[name 2/5] ...`).
#[derive(Debug, Clone, Default)]
struct Prefix {
    stage_name: String,
    index: usize,
    total: usize,
    /// The instruction comes from an `ONBUILD` trigger of the base.
    onbuild: bool,
}

impl Prefix {
    fn apply(&mut self, text: &str) -> String {
        if self.total == 0 {
            return text.to_string();
        }
        self.index += 1;
        let width = self.total.to_string().len();
        let name = if self.stage_name.is_empty() {
            String::new()
        } else {
            format!("{} ", self.stage_name)
        };
        let onbuild = if self.onbuild { "ONBUILD " } else { "" };
        format!(
            "[{name}{:>width$}/{}] {onbuild}{text}",
            self.index,
            self.total,
            width = width
        )
    }
}

struct Compiler<'a> {
    dockerfile: &'a Dockerfile,
    options: &'a CompileOptions,
    resolver: &'a dyn ImageMetaResolver,
    lexer: Lexer,
    builder: DefinitionBuilder,
    source_index: i32,
    global_args: Vec<(String, String)>,
    context: Option<OutputRef>,
    /// Whether the steps of the stage being compiled ignore the cache.
    ignore_cache: bool,
}

/// Compiles `dockerfile` for `options.target` (default: the last stage).
///
/// Only stages the target needs are compiled and emitted; base images are resolved through
/// `resolver` (once per `FROM`/`COPY --from=<image>` reached).
pub async fn compile(
    dockerfile: &Dockerfile,
    options: &CompileOptions,
    resolver: &dyn ImageMetaResolver,
) -> Result<Compiled, CompileError> {
    if dockerfile.stages.is_empty() {
        return Err(CompileError::NoStages);
    }
    let mut builder = DefinitionBuilder::new();
    let source_index = builder.add_source(
        options.filename.clone(),
        options.source.clone(),
        "Dockerfile",
    );
    let mut compiler = Compiler {
        dockerfile,
        options,
        resolver,
        lexer: Lexer::new(dockerfile.escape),
        builder,
        source_index,
        global_args: Vec::new(),
        context: None,
        ignore_cache: false,
    };
    compiler.run().await
}

impl Compiler<'_> {
    async fn run(&mut self) -> Result<Compiled, CompileError> {
        let stages = &self.dockerfile.stages;
        let target = match &self.options.target {
            None => stages.len() - 1,
            Some(target) => stages
                .iter()
                .position(|s| s.name.as_deref() == Some(target.to_ascii_lowercase().as_str()))
                .ok_or_else(|| CompileError::TargetNotFound {
                    target: target.clone(),
                })?,
        };
        self.global_args = self.meta_args(target)?;

        // Bases and COPY --from sources of every stage, as BuildKit resolves them up front.
        let mut bases = Vec::new();
        let mut platforms = Vec::new();
        let mut copy_sources: Vec<Vec<Vec<(String, CopySource)>>> = Vec::new();
        let mut image_copies = 0;
        for (i, stage) in stages.iter().enumerate() {
            let line = stage.span.start;
            let base = self.expand(&stage.base, &self.global_args, line)?;
            if base.is_empty() {
                return Err(CompileError::BlankBase {
                    line,
                    base: stage.base.clone(),
                });
            }
            let earlier = stages[..i]
                .iter()
                .position(|s| s.name.as_deref() == Some(base.to_ascii_lowercase().as_str()));
            bases.push(match earlier {
                Some(j) => Base::Stage(j),
                None if base == "scratch" => Base::Scratch,
                None => Base::Image(base),
            });
            platforms.push(match &stage.platform {
                None => None,
                Some(raw) => {
                    let value = self.expand(raw, &self.global_args, line)?;
                    Some(Platform::parse(&value).ok_or(CompileError::Platform {
                        line,
                        platform: value,
                    })?)
                }
            });
            let mut sources = Vec::new();
            for command in &stage.commands {
                let named = self.command_sources(command, stages)?;
                image_copies += named
                    .iter()
                    .filter(|(_, s)| matches!(s, CopySource::Image(_)))
                    .count();
                sources.push(named);
            }
            copy_sources.push(sources);
        }

        // Stages reachable from the target.
        let mut reachable = BTreeSet::new();
        let mut stack = vec![target];
        while let Some(i) = stack.pop() {
            if !reachable.insert(i) {
                continue;
            }
            if let Base::Stage(j) = bases[i] {
                stack.push(j);
            }
            for (_, source) in copy_sources[i].iter().flatten() {
                if let CopySource::Stage(j) = source {
                    stack.push(*j);
                }
            }
        }

        let single = stages.len() + image_copies == 1;
        let mut states: Vec<Option<State>> = vec![None; stages.len()];
        for i in 0..stages.len() {
            if !reachable.contains(&i) {
                continue;
            }
            let stage = &stages[i];
            self.ignore_cache = stage.name.as_ref().is_some_and(|name| {
                self.options
                    .no_cache_stages
                    .iter()
                    .any(|wanted| wanted.eq_ignore_ascii_case(name))
            });
            let stage_name = if single {
                String::new()
            } else {
                stage.name.clone().unwrap_or_else(|| format!("stage-{i}"))
            };
            let mut total = usize::from(matches!(bases[i], Base::Image(_)));
            total += stage
                .commands
                .iter()
                .filter(|c| matches!(c.keyword.as_str(), "RUN" | "COPY" | "ADD" | "WORKDIR"))
                .count();
            let platform = platforms[i]
                .clone()
                .unwrap_or_else(|| self.options.platform.clone());
            // A multi-platform build names each step's platform, as BuildKit does
            // (`[linux/arm64 build 2/3] RUN …`), so the platforms' steps tell apart.
            let step_prefix = if self.options.multi_platform {
                format!("{} {stage_name}", platform.id())
                    .trim_end()
                    .to_string()
            } else {
                stage_name.clone()
            };
            let mut prefix = Prefix {
                stage_name: step_prefix,
                index: 0,
                total,
                onbuild: false,
            };
            let mut state = match &bases[i] {
                Base::Stage(j) => states[*j].clone().ok_or_else(|| CompileError::Circular {
                    line: stage.span.start,
                    stage: dependency_name(stage, i),
                })?,
                Base::Scratch => self.init_state(None, empty_image(&platform), platform),
                Base::Image(name) => {
                    let (output, image) = self
                        .resolve_image(name, &platform, stage.span, Some(stage), &mut prefix)
                        .await?;
                    self.init_state(output, image, platform)
                }
            };
            state.cmd_set = false;

            // ONBUILD triggers of the base (image config `OnBuild`, or the ONBUILD
            // instructions of a base stage) run first; the base's list is not inherited.
            let triggers = state
                .image
                .config
                .as_mut()
                .and_then(|c| c.on_build.take())
                .unwrap_or_default();
            if !triggers.is_empty() {
                // BuildKit counts triggers after naming the FROM step.
                prefix.total += triggers.len();
                prefix.onbuild = true;
                for trigger in &triggers {
                    let command = parse_trigger(trigger, stage.span)?;
                    let mut from_state = Vec::new();
                    for (from, source) in self.command_sources(&command, stages)? {
                        let output = match source {
                            CopySource::Stage(j) => match &states[j] {
                                Some(s) => s.output.clone(),
                                None => return Err(CompileError::UnsupportedSource {
                                    line: stage.span.start,
                                    what:
                                        "ONBUILD COPY --from a stage the target does not otherwise need"
                                            .to_string(),
                                }),
                            },
                            CopySource::Image(name) => {
                                let mut no_prefix = Prefix::default();
                                let (output, _) = self
                                    .resolve_image(
                                        &name,
                                        &state.platform.clone(),
                                        stage.span,
                                        None,
                                        &mut no_prefix,
                                    )
                                    .await?;
                                output
                            }
                        };
                        from_state.push((from, output));
                    }
                    self.dispatch(&mut state, &command, &from_state, &mut prefix)?;
                }
                prefix.onbuild = false;
            }

            for (command, sources) in stage.commands.iter().zip(&copy_sources[i]) {
                let mut from_state = Vec::new();
                for (from, source) in sources {
                    let output = match source {
                        CopySource::Stage(j) => match &states[*j] {
                            Some(s) => s.output.clone(),
                            None => {
                                return Err(if *j == i {
                                    CompileError::Circular {
                                        line: command.span.start,
                                        stage: dependency_name(stage, i),
                                    }
                                } else {
                                    CompileError::StageOrder {
                                        line: command.span.start,
                                        from: from.clone(),
                                        stage: stage_name.clone(),
                                    }
                                });
                            }
                        },
                        CopySource::Image(name) => {
                            let mut no_prefix = Prefix::default();
                            let (output, _) = self
                                .resolve_image(
                                    name,
                                    &state.platform.clone(),
                                    command.span,
                                    None,
                                    &mut no_prefix,
                                )
                                .await?;
                            output
                        }
                    };
                    from_state.push((from.clone(), output));
                }
                self.dispatch(&mut state, command, &from_state, &mut prefix)?;
            }
            states[i] = Some(state);
        }

        let mut result = states[target].take().ok_or(CompileError::NoStages)?;
        self.finalize(&mut result);
        let definition = self.builder.build(result.output.clone());
        Ok(Compiled {
            definition,
            image_config: result.image,
        })
    }

    /// The stages and images `command` reads besides its own state: `COPY --from` and the
    /// `from=` of `RUN --mount=type=bind`, each with the name as written.
    fn command_sources(
        &self,
        command: &crate::parser::Command,
        stages: &[Stage],
    ) -> Result<Vec<(String, CopySource)>, CompileError> {
        let line = command.span.start;
        match &command.instruction {
            Instruction::Copy(CopyInstruction {
                from: Some(from), ..
            }) => {
                if self.expand(from, &[], line)? != *from {
                    return Err(CompileError::FromExpansion { line });
                }
                Ok(vec![(from.clone(), named_source(from, stages, line)?)])
            }
            Instruction::Run { flags, .. } => {
                let mut sources = Vec::new();
                for mount in run_modes(flags, line)?.mounts {
                    if let RunMount::Bind {
                        from: Some(from), ..
                    }
                    | RunMount::Cache {
                        from: Some(from), ..
                    } = mount
                    {
                        let source = named_source(&from, stages, line)?;
                        sources.push((from, source));
                    }
                }
                Ok(sources)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Global scope: BuildKit's platform args, then `ARG`s before the first `FROM`.
    fn meta_args(&self, target: usize) -> Result<Vec<(String, String)>, CompileError> {
        let mut args = Vec::new();
        for (prefix, p) in [
            ("BUILD", &self.options.build_platform),
            ("TARGET", &self.options.platform),
        ] {
            args.push((format!("{prefix}PLATFORM"), p.to_string()));
            args.push((format!("{prefix}OS"), p.os.clone()));
            args.push((format!("{prefix}ARCH"), p.architecture.clone()));
            args.push((
                format!("{prefix}VARIANT"),
                p.variant.clone().unwrap_or_default(),
            ));
        }
        args.push((
            "TARGETSTAGE".to_string(),
            self.dockerfile.stages[target]
                .name
                .clone()
                .unwrap_or_default(),
        ));
        for command in &self.dockerfile.meta_args {
            let Instruction::Arg(defs) = &command.instruction else {
                continue;
            };
            for def in defs {
                let value = match (self.options.build_args.get(&def.name), &def.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(default)) => {
                        Some(self.expand(default, &args, command.span.start)?)
                    }
                    (None, None) => None,
                };
                if let Some(value) = value {
                    set_pair(&mut args, &def.name, &value);
                }
            }
        }
        Ok(args)
    }

    fn expand(
        &self,
        word: &str,
        env: &[(String, String)],
        line: usize,
    ) -> Result<String, CompileError> {
        self.lexer
            .process_word(word, env)
            .map_err(|source| CompileError::Expand {
                line,
                word: word.to_string(),
                source,
            })
    }

    /// A progress name: the instruction text with known variables expanded, keyword upper-cased.
    fn display_name(&self, original: &str, env: &[(String, String)]) -> String {
        let lexer = Lexer {
            raw_quotes: true,
            skip_unset: true,
            ..self.lexer
        };
        let text = lexer
            .process_word(original, env)
            .unwrap_or_else(|_| original.to_string());
        match text.split_once(' ') {
            Some((keyword, rest)) => format!("{} {rest}", keyword.to_ascii_uppercase()),
            None => text.to_ascii_uppercase(),
        }
    }

    fn metadata(&self, name: &str, command: Option<&str>) -> pb::OpMetadata {
        let mut description = BTreeMap::from([(CUSTOM_NAME.to_string(), name.to_string())]);
        if let Some(command) = command {
            description.insert(DOCKERFILE_COMMAND.to_string(), command.to_string());
        }
        pb::OpMetadata {
            description,
            ignore_cache: self.ignore_cache,
            ..Default::default()
        }
    }

    fn add_op(
        &mut self,
        op: pb::Op,
        inputs: &[OutputRef],
        metadata: pb::OpMetadata,
        span: Option<Span>,
    ) -> Result<OutputRef, CompileError> {
        let digest = self.builder.add_with_metadata(op, inputs, metadata)?;
        if let Some(span) = span {
            self.builder.add_location(
                &digest,
                self.source_index,
                span.start as i32,
                span.end as i32,
            )?;
        }
        Ok(OutputRef::new(digest, 0))
    }

    /// Resolves an image and adds its source op (unless it has no layers); returns the output and
    /// the image config with `created` cleared.
    async fn resolve_image(
        &mut self,
        name: &str,
        platform: &Platform,
        span: Span,
        stage: Option<&Stage>,
        prefix: &mut Prefix,
    ) -> Result<(Option<OutputRef>, ImageConfig), CompileError> {
        let line = span.start;
        let replaced;
        let name = match self.named_context(name).cloned() {
            Some(NamedContext::Local(local)) => {
                let output = self.named_local(local, stage, span)?;
                return Ok((Some(output), empty_image(platform)));
            }
            Some(NamedContext::Image(image)) => {
                replaced = image;
                replaced.as_str()
            }
            None => name,
        };
        let reference =
            Reference::parse_normalized(name).map_err(|source| CompileError::Reference {
                line,
                reference: name.to_string(),
                source,
            })?;
        let (pinned, _digest, bytes) = self
            .resolver
            .resolve_pinned(&reference, platform)
            .await
            .map_err(|source| CompileError::Resolve {
                line,
                reference: reference.to_string(),
                source,
            })?;
        let mut image: ImageConfig =
            serde_json::from_slice(&bytes).map_err(|source| CompileError::ImageConfig {
                line,
                reference: reference.to_string(),
                source,
            })?;
        image.created = None;
        tracing::debug!(reference = %pinned, "resolved base image");
        let scratch =
            image.rootfs.diff_ids.is_empty() && image.history.iter().all(|h| h.empty_layer);
        if scratch {
            return Ok((None, image));
        }
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("docker-image://{pinned}"),
                attrs: BTreeMap::new(),
            })),
            platform: Some(pb_platform(platform)),
            ..Default::default()
        };
        let name = prefix.apply(&format!("FROM {pinned}"));
        let metadata = self.metadata(&name, stage.map(|s| s.original.as_str()));
        let output = self.add_op(op, &[], metadata, Some(span))?;
        Ok((Some(output), image))
    }

    /// The `--build-context` replacing image `name`: looked up as written, then by its familiar
    /// form without `:latest` (`docker.io/library/alpine:latest` → `alpine`), as BuildKit does.
    fn named_context(&self, name: &str) -> Option<&NamedContext> {
        let contexts = &self.options.named_contexts;
        if contexts.is_empty() {
            return None;
        }
        contexts.get(name).or_else(|| {
            let familiar = Reference::parse_normalized(name).ok()?.familiar();
            contexts.get(familiar.strip_suffix(":latest").unwrap_or(&familiar))
        })
    }

    /// The source op of a named local context (`--build-context name=DIR`), added once.
    fn named_local(
        &mut self,
        local: String,
        stage: Option<&Stage>,
        span: Span,
    ) -> Result<OutputRef, CompileError> {
        let attrs = BTreeMap::from([
            ("local.session".to_string(), self.options.session_id.clone()),
            ("local.sharedkeyhint".to_string(), local.clone()),
        ]);
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("local://{local}"),
                attrs,
            })),
            platform: None,
            ..Default::default()
        };
        let metadata = self.metadata(
            &format!("[context {local}] load from client"),
            stage.map(|s| s.original.as_str()),
        );
        self.add_op(op, &[], metadata, Some(span))
    }

    /// A fresh state on top of `image` (BuildKit's per-stage initialisation).
    fn init_state(
        &self,
        output: Option<OutputRef>,
        mut image: ImageConfig,
        platform: Platform,
    ) -> State {
        let runtime = image.config.get_or_insert_with(RuntimeConfig::default);
        let env = runtime.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.split('=').next() == Some("PATH")) {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        let mut state = State {
            output,
            platform,
            env: Vec::new(),
            dir: "/".to_string(),
            user: String::new(),
            image,
            build_args: Vec::new(),
            cmd_set: false,
        };
        let runtime = state.runtime().clone();
        for entry in runtime.env.iter().flatten() {
            let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
            state.add_env(key, value);
        }
        if let Some(dir) = runtime.working_dir.as_deref().filter(|d| !d.is_empty()) {
            state.dir = normalize_workdir("/", dir);
        }
        if let Some(user) = runtime.user.as_deref() {
            state.user = user.to_string();
        }
        state
    }

    fn history(&self, state: &mut State, created_by: String, layer: bool) {
        state.image.history.push(History {
            created: None,
            created_by: Some(created_by),
            author: None,
            comment: Some(HISTORY_COMMENT.to_string()),
            empty_layer: !layer,
        });
    }

    fn dispatch(
        &mut self,
        state: &mut State,
        command: &crate::parser::Command,
        from: &[(String, Option<OutputRef>)],
        prefix: &mut Prefix,
    ) -> Result<(), CompileError> {
        let line = command.span.start;
        match &command.instruction {
            Instruction::Run {
                flags,
                command: cmd,
                heredocs,
            } => {
                let modes = run_modes(flags, line)?;
                self.dispatch_run(state, command, cmd, heredocs, modes, from, prefix)
            }
            Instruction::Copy(copy) | Instruction::Add(copy) => {
                let is_add = matches!(command.instruction, Instruction::Add(_));
                let from = from.first().map(|(_, output)| output.clone());
                self.dispatch_copy(state, command, copy, is_add, from, prefix)
            }
            Instruction::Expose(raw) => {
                let mut ports = Vec::new();
                for word in raw {
                    let expanded = self.expand(word, &state.env, line)?;
                    for spec in expanded.split_whitespace() {
                        ports.extend(
                            parse_port_spec(spec)
                                .map_err(|message| CompileError::Invalid { line, message })?,
                        );
                    }
                }
                let exposed = state
                    .runtime()
                    .exposed_ports
                    .get_or_insert_with(BTreeMap::new);
                for port in &ports {
                    exposed.insert(port.clone(), EmptyObject::default());
                }
                self.history(state, format!("EXPOSE [{}]", ports.join(" ")), false);
                Ok(())
            }
            Instruction::Volume(raw) => {
                let mut volumes = Vec::new();
                for word in raw {
                    let volume = self.expand(word, &state.env, line)?;
                    if volume.is_empty() {
                        return Err(CompileError::Invalid {
                            line,
                            message: "VOLUME specified can not be an empty string".to_string(),
                        });
                    }
                    volumes.push(volume);
                }
                let set = state.runtime().volumes.get_or_insert_with(BTreeMap::new);
                for volume in &volumes {
                    set.insert(volume.clone(), EmptyObject::default());
                }
                self.history(state, format!("VOLUME [{}]", volumes.join(" ")), false);
                Ok(())
            }
            Instruction::StopSignal(raw) => {
                let signal = self.expand(raw, &state.env, line)?;
                if !valid_signal(&signal) {
                    return Err(CompileError::Invalid {
                        line,
                        message: format!("Invalid signal: {signal}"),
                    });
                }
                state.runtime().stop_signal = Some(signal.clone());
                self.history(state, format!("STOPSIGNAL {signal}"), false);
                Ok(())
            }
            Instruction::Healthcheck(check) => {
                let nonzero = |v: i64| (v != 0).then_some(v);
                state.runtime().healthcheck = Some(HealthConfig {
                    test: Some(check.test.clone()),
                    interval: nonzero(check.interval),
                    timeout: nonzero(check.timeout),
                    start_period: nonzero(check.start_period),
                    start_interval: nonzero(check.start_interval),
                    retries: nonzero(check.retries),
                });
                // Go's `%+v` of Docker's HealthcheckConfig.
                let message = format!(
                    "HEALTHCHECK {{Test:[{}] Interval:{} Timeout:{} StartPeriod:{} StartInterval:{} Retries:{}}}",
                    check.test.join(" "),
                    go_duration(check.interval),
                    go_duration(check.timeout),
                    go_duration(check.start_period),
                    go_duration(check.start_interval),
                    check.retries
                );
                self.history(state, message, false);
                Ok(())
            }
            Instruction::Onbuild(expression) => {
                // BuildKit records no history entry for ONBUILD.
                state
                    .runtime()
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(expression.clone());
                Ok(())
            }
            Instruction::Maintainer(name) => {
                state.image.author = Some(name.clone());
                self.history(state, format!("MAINTAINER {name}"), false);
                Ok(())
            }
            Instruction::Env(pairs) => {
                let pairs = self.expand_pairs(pairs, &state.env, line)?;
                let mut message = String::from("ENV");
                for (key, value) in pairs {
                    message.push_str(&format!(" {key}={value}"));
                    state.add_env(&key, &value);
                    let env = state.runtime().env.get_or_insert_with(Vec::new);
                    let entry = format!("{key}={value}");
                    match env
                        .iter_mut()
                        .find(|e| e.split('=').next() == Some(key.as_str()))
                    {
                        Some(existing) => *existing = entry,
                        None => env.push(entry),
                    }
                }
                self.history(state, message, false);
                Ok(())
            }
            Instruction::Label(pairs) => {
                let pairs = self.expand_pairs(pairs, &state.env, line)?;
                let mut message = String::from("LABEL");
                let labels = state.runtime().labels.get_or_insert_with(BTreeMap::new);
                for (key, value) in pairs {
                    message.push_str(&format!(" {key}={value}"));
                    labels.insert(key, value);
                }
                self.history(state, message, false);
                Ok(())
            }
            Instruction::Workdir(path) => {
                let path = self.expand(path, &state.env, line)?;
                if path.is_empty() {
                    return Err(CompileError::EmptyWorkdir { line });
                }
                let current = state
                    .runtime()
                    .working_dir
                    .clone()
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| "/".to_string());
                let dir = normalize_workdir(&current, &path);
                state.runtime().working_dir = Some(dir.clone());
                state.dir = dir.clone();
                let mut layer = false;
                if dir != "/" {
                    let owner = if state.user.is_empty() {
                        None
                    } else {
                        Some(chown_opt(&state.user, 0, line)?)
                    };
                    let action = pb::FileAction {
                        input: if state.output.is_some() { 0 } else { -1 },
                        secondary_input: -1,
                        output: 0,
                        action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                            path: dir.clone(),
                            mode: 0o755,
                            make_parents: true,
                            owner,
                            timestamp: -1,
                        })),
                    };
                    let name = prefix.apply(&self.display_name(&command.original, &state.env));
                    let op = pb::Op {
                        op: Some(pb::op::Op::File(pb::FileOp {
                            actions: vec![action],
                        })),
                        platform: Some(pb_platform(&state.platform)),
                        ..Default::default()
                    };
                    let inputs: Vec<OutputRef> = state.output.iter().cloned().collect();
                    let metadata = self.metadata(&name, None);
                    state.output = Some(self.add_op(op, &inputs, metadata, Some(command.span))?);
                    layer = true;
                }
                self.history(state, format!("WORKDIR {dir}"), layer);
                Ok(())
            }
            Instruction::User(user) => {
                let user = self.expand(user, &state.env, line)?;
                state.user = user.clone();
                state.runtime().user = Some(user.clone());
                self.history(state, format!("USER {user}"), false);
                Ok(())
            }
            Instruction::Cmd(cmd) => {
                let args = self.with_shell(state, cmd);
                let runtime = state.runtime();
                runtime.cmd = Some(args.clone());
                runtime.args_escaped = Some(true);
                state.cmd_set = true;
                self.history(state, format!("CMD {}", go_quote_list(&args)), false);
                Ok(())
            }
            Instruction::Entrypoint(cmd) => {
                let args = self.with_shell(state, cmd);
                let keep_cmd = state.cmd_set;
                let runtime = state.runtime();
                // `ENTRYPOINT []` clears the entrypoint (BuildKit stores nil, not an empty list).
                runtime.entrypoint = (!args.is_empty()).then(|| args.clone());
                if !keep_cmd {
                    runtime.cmd = None;
                }
                self.history(state, format!("ENTRYPOINT {}", go_quote_list(&args)), false);
                Ok(())
            }
            Instruction::Shell(args) => {
                state.runtime().shell = Some(args.clone());
                self.history(state, format!("SHELL [{}]", args.join(" ")), false);
                Ok(())
            }
            Instruction::Arg(defs) => {
                let mut parts = Vec::new();
                for def in defs {
                    let value = match (self.options.build_args.get(&def.name), &def.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(default)) => Some(self.expand(default, &state.env, line)?),
                        (None, None) => self
                            .global_args
                            .iter()
                            .find(|(k, _)| *k == def.name)
                            .map(|(_, v)| v.clone()),
                    };
                    match &value {
                        Some(v) => {
                            // An ENV (of the stage or its base image) always wins over an ARG
                            // of the same name.
                            let set_by_env = state
                                .image
                                .config
                                .as_ref()
                                .and_then(|c| c.env.as_ref())
                                .is_some_and(|env| {
                                    env.iter().any(|e| {
                                        e.split_once('=').map_or(e.as_str(), |(k, _)| k) == def.name
                                    })
                                });
                            if !set_by_env {
                                state.add_env(&def.name, v);
                            }
                            parts.push(format!("{}={v}", def.name));
                        }
                        None => parts.push(def.name.clone()),
                    }
                    state.build_args.push((def.name.clone(), value));
                }
                self.history(state, format!("ARG {}", parts.join(" ")), false);
                Ok(())
            }
        }
    }

    fn expand_pairs(
        &self,
        pairs: &[KeyValue],
        env: &[(String, String)],
        line: usize,
    ) -> Result<Vec<(String, String)>, CompileError> {
        pairs
            .iter()
            .map(|p| {
                Ok((
                    self.expand(&p.key, env, line)?,
                    self.expand(&p.value, env, line)?,
                ))
            })
            .collect()
    }

    /// Shell form → `SHELL` (default `/bin/sh -c`) plus the text; exec form as is.
    fn with_shell(&self, state: &State, cmd: &CommandLine) -> Vec<String> {
        match cmd {
            CommandLine::Exec(args) => args.clone(),
            CommandLine::Shell(text) => {
                let mut args = state
                    .image
                    .config
                    .as_ref()
                    .and_then(|c| c.shell.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| vec!["/bin/sh".to_string(), "-c".to_string()]);
                args.push(text.clone());
                args
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch_run(
        &mut self,
        state: &mut State,
        command: &crate::parser::Command,
        cmd: &CommandLine,
        heredocs: &[Heredoc],
        modes: RunModes,
        from: &[(String, Option<OutputRef>)],
        prefix: &mut Prefix,
    ) -> Result<(), CompileError> {
        // Heredocs (BuildKit's dispatchRun): a command that is only `<<EOF` runs the body with
        // the shell, or, with a shebang, as a file mounted at /dev/pipes/; otherwise the bodies
        // are appended to the command line for the shell to read.
        let mut display = command.original.clone();
        let mut pipe: Option<(String, Vec<u8>)> = None;
        let line_args: CommandLine = match (cmd, heredocs.first()) {
            (CommandLine::Shell(text), Some(first)) => {
                if parse_heredoc_word(text.trim()).is_some() {
                    let data = first.data();
                    display.push_str(&format!(" ({})", summarize_heredoc(&first.content)));
                    if data.starts_with("#!") {
                        let path = format!("/dev/pipes/{}", first.name);
                        pipe = Some((first.name.clone(), data.into_bytes()));
                        CommandLine::Shell(path)
                    } else {
                        CommandLine::Shell(data)
                    }
                } else {
                    let mut full = text.clone();
                    for doc in heredocs {
                        full.push('\n');
                        full.push_str(&doc.content);
                        full.push_str(&doc.name);
                    }
                    CommandLine::Shell(full)
                }
            }
            _ => cmd.clone(),
        };
        let args = self.with_shell(state, &line_args);
        let env: Vec<String> = state.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let proxy_env = proxy_env(&self.options.build_args);
        let mut inputs: Vec<OutputRef> = state.output.iter().cloned().collect();
        let mut mounts = vec![pb::Mount {
            input: if state.output.is_some() { 0 } else { -1 },
            dest: "/".to_string(),
            output: 0,
            ..Default::default()
        }];
        if let Some((name, data)) = pipe {
            let file = self.inline_file(state, &name, data, 0o755)?;
            inputs.push(file);
            mounts.push(pb::Mount {
                input: (inputs.len() - 1) as i64,
                selector: "/".to_string(),
                dest: "/dev/pipes/".to_string(),
                output: -1,
                readonly: true,
                mount_type: pb::MountType::Bind as i32,
                ..Default::default()
            });
        }
        let mut session_mounts: Vec<pb::Mount> = Vec::new();
        let mut secret_env: Vec<pb::SecretEnv> = Vec::new();
        let mut ssh_auth_sock: Option<String> = None;
        for mount in &modes.mounts {
            let absolute = |target: &str| {
                if target.starts_with('/') {
                    clean_path(target)
                } else {
                    clean_path(&format!("{}/{target}", state.dir))
                }
            };
            match mount {
                RunMount::Cache {
                    target,
                    id,
                    sharing,
                    readonly,
                    uid,
                    gid,
                    mode,
                    from: from_name,
                    source,
                } => {
                    // dockerfile2llb: a new cache dir starts as `source` of `from`, or as a
                    // scratch mkdir carrying the requested owner and mode.
                    let (dir, selector) = match from_name {
                        Some(_) => {
                            let (output, bind) = self.bind_mount(
                                from,
                                from_name,
                                source,
                                &absolute(target),
                                *readonly,
                                command.span.start,
                            )?;
                            (output, bind.selector)
                        }
                        None => (
                            Some(self.cache_dir_state(state, *uid, *gid, *mode)?),
                            "/cache".to_string(),
                        ),
                    };
                    let input = match dir {
                        Some(output) => {
                            inputs.push(output);
                            (inputs.len() - 1) as i64
                        }
                        None => -1,
                    };
                    mounts.push(pb::Mount {
                        input,
                        selector,
                        dest: absolute(target),
                        output: -1,
                        readonly: *readonly,
                        mount_type: pb::MountType::Cache as i32,
                        cache_opt: Some(pb::CacheOpt {
                            id: if id.is_empty() {
                                absolute(target)
                            } else {
                                id.clone()
                            },
                            sharing: *sharing as i32,
                        }),
                        ..Default::default()
                    });
                }
                RunMount::Secret(secret) => {
                    if let Some(name) = &secret.env {
                        secret_env.push(pb::SecretEnv {
                            id: secret.id.clone(),
                            name: name.clone(),
                            optional: !secret.required,
                        });
                    }
                    if let Some(target) = &secret.target {
                        session_mounts.push(secret_mount(secret, absolute(target)));
                    }
                }
                RunMount::Ssh(ssh) => {
                    // llb: the n-th ssh mount of a RUN defaults to /run/buildkit/ssh_agent.<n>.
                    let n = session_mounts
                        .iter()
                        .filter(|m| m.mount_type == pb::MountType::Ssh as i32)
                        .count();
                    let target = match &ssh.target {
                        Some(t) => absolute(t),
                        None => format!("/run/buildkit/ssh_agent.{n}"),
                    };
                    ssh_auth_sock.get_or_insert_with(|| target.clone());
                    session_mounts.push(ssh_mount(ssh, target));
                }
                RunMount::Bind {
                    target,
                    from: source_name,
                    source,
                    readonly,
                } => {
                    let line = command.span.start;
                    let mount = self.bind_mount(
                        from,
                        source_name,
                        source,
                        &absolute(target),
                        *readonly,
                        line,
                    )?;
                    let input = match mount.0 {
                        Some(output) => match inputs.iter().position(|i| *i == output) {
                            Some(p) => p as i64,
                            None => {
                                inputs.push(output);
                                (inputs.len() - 1) as i64
                            }
                        },
                        None => -1,
                    };
                    mounts.push(pb::Mount { input, ..mount.1 });
                }
                RunMount::Tmpfs { target, size } => mounts.push(pb::Mount {
                    input: -1,
                    dest: absolute(target),
                    output: -1,
                    mount_type: pb::MountType::Tmpfs as i32,
                    tmpfs_opt: Some(pb::TmpfsOpt { size: *size }),
                    ..Default::default()
                }),
            }
        }
        // llb: secrets and ssh sockets come after the other mounts, and the first ssh socket is
        // SSH_AUTH_SOCK unless the environment sets it.
        mounts.extend(session_mounts);
        let mut env = env;
        if let Some(sock) = ssh_auth_sock {
            if !env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
                env.push(format!("SSH_AUTH_SOCK={sock}"));
            }
        }
        let exec = pb::ExecOp {
            meta: Some(pb::Meta {
                args: args.clone(),
                env,
                cwd: state.dir.clone(),
                user: state.user.clone(),
                proxy_env,
                extra_hosts: self
                    .options
                    .extra_hosts
                    .iter()
                    .map(|(host, ip)| pb::HostIp {
                        host: host.clone(),
                        ip: ip.clone(),
                    })
                    .collect(),
                ..Default::default()
            }),
            mounts,
            network: if modes.network == pb::NetMode::Unset {
                self.options.network as i32
            } else {
                modes.network as i32
            },
            security: modes.security as i32,
            secretenv: secret_env,
            ..Default::default()
        };
        let op = pb::Op {
            op: Some(pb::op::Op::Exec(exec)),
            platform: Some(pb_platform(&state.platform)),
            ..Default::default()
        };
        let name = prefix.apply(&self.display_name(&display, &state.env));
        let metadata = self.metadata(&name, Some(&command.original));
        state.output = Some(self.add_op(op, &inputs, metadata, Some(command.span))?);

        // BuildKit's runCommandString: `|<n> K=V ... <args>` when the stage declared ARGs.
        let mut build_env: Vec<(String, String)> = Vec::new();
        for (key, value) in &state.build_args {
            let v = state
                .env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .or_else(|| value.clone())
                .unwrap_or_default();
            set_pair(&mut build_env, key, &v);
        }
        let mut words: Vec<String> = Vec::new();
        if !build_env.is_empty() {
            words.push(format!("|{}", build_env.len()));
            words.extend(build_env.iter().map(|(k, v)| format!("{k}={v}")));
        }
        words.extend(args);
        self.history(state, format!("RUN {} # buildkit", words.join(" ")), true);
        Ok(())
    }

    /// The source op of `ADD <git ref>` (BuildKit's `llb.Git`): identifier
    /// `git://<remote without scheme>[#<ref>[:<subdir>]]`, the full URL in `git.fullurl`,
    /// `git.keepgitdir`, `git.checksum` and the auth secret names BuildKit always sets.
    fn git_source(
        &mut self,
        src: &str,
        keep_git_dir: Option<bool>,
        checksum: &Option<String>,
        name: &str,
        line: usize,
    ) -> Result<OutputRef, CompileError> {
        let (url, fragment) = match src.split_once('#') {
            Some((url, fragment)) => (url, fragment),
            None => (src, ""),
        };
        if url.contains('?') {
            return Err(CompileError::UnsupportedSource {
                line,
                what: format!("query parameters in a git reference ({src})"),
            });
        }
        let (full_url, remote) = if let Some(rest) = url.strip_prefix("git@") {
            // scp-like `git@host:path` → `host/path`, like the http(s) form.
            (url.to_string(), rest.replacen(':', "/", 1))
        } else if let Some((_, rest)) = url.split_once("://") {
            (url.to_string(), rest.to_string())
        } else {
            (format!("https://{url}"), url.to_string())
        };
        let mut identifier = format!("git://{remote}");
        if !fragment.is_empty() {
            identifier.push('#');
            identifier.push_str(fragment);
        }
        let mut attrs = BTreeMap::from([
            ("git.fullurl".to_string(), full_url),
            (
                "git.authheadersecret".to_string(),
                "GIT_AUTH_HEADER".to_string(),
            ),
            (
                "git.authtokensecret".to_string(),
                "GIT_AUTH_TOKEN".to_string(),
            ),
        ]);
        if keep_git_dir == Some(true) {
            attrs.insert("git.keepgitdir".to_string(), "true".to_string());
        }
        if let Some(checksum) = checksum {
            attrs.insert("git.checksum".to_string(), checksum.clone());
        }
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp { identifier, attrs })),
            platform: None,
            ..Default::default()
        };
        let metadata = self.metadata(name, None);
        self.add_op(op, &[], metadata, None)
    }

    /// A `RUN --mount=type=bind` as BuildKit's `dispatchRunMounts` compiles it: the `from`
    /// stage or image (or the build context) as input, `source` as selector (none for the
    /// root), never an output; `rw` mounts are writable but their writes are discarded.
    /// Returns the input state (`None` = scratch) and the mount with `input` left to the caller.
    fn bind_mount(
        &mut self,
        from: &[(String, Option<OutputRef>)],
        from_name: &Option<String>,
        source: &str,
        target: &str,
        readonly: bool,
        line: usize,
    ) -> Result<(Option<OutputRef>, pb::Mount), CompileError> {
        if target == "/" {
            return Err(CompileError::Invalid {
                line,
                message: format!("invalid mount target {target:?}"),
            });
        }
        let input = match from_name {
            Some(name) => from
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, output)| output.clone())
                .ok_or_else(|| CompileError::Invalid {
                    line,
                    message: format!("mount source {name:?} was not resolved"),
                })?,
            None => Some(self.context()?),
        };
        let selector = clean_path(&format!("/{source}"));
        Ok((
            input,
            pb::Mount {
                selector: if selector == "/" {
                    String::new()
                } else {
                    selector
                },
                dest: target.to_string(),
                output: -1,
                readonly,
                mount_type: pb::MountType::Bind as i32,
                ..Default::default()
            },
        ))
    }

    /// A scratch snapshot holding one file `/<name>` (BuildKit's "preparing inline document"
    /// step for heredocs).
    fn inline_file(
        &mut self,
        state: &State,
        name: &str,
        data: Vec<u8>,
        mode: i32,
    ) -> Result<OutputRef, CompileError> {
        let action = pb::FileAction {
            input: -1,
            secondary_input: -1,
            output: 0,
            action: Some(pb::file_action::Action::Mkfile(pb::FileActionMkFile {
                path: clean_path(&format!("/{name}")),
                mode,
                data,
                owner: None,
                timestamp: -1,
            })),
        };
        let op = pb::Op {
            op: Some(pb::op::Op::File(pb::FileOp {
                actions: vec![action],
            })),
            platform: Some(pb_platform(&state.platform)),
            ..Default::default()
        };
        let metadata = self.metadata("[internal] preparing inline document", None);
        self.add_op(op, &[], metadata, None)
    }

    /// A scratch snapshot holding the directory `/cache` owned by `uid:gid` with `mode`
    /// (BuildKit's "[internal] settings cache mount permissions").
    fn cache_dir_state(
        &mut self,
        state: &State,
        uid: u32,
        gid: u32,
        mode: i32,
    ) -> Result<OutputRef, CompileError> {
        let id = |n: u32| pb::UserOpt {
            user: Some(pb::user_opt::User::ById(n)),
        };
        let action = pb::FileAction {
            input: -1,
            secondary_input: -1,
            output: 0,
            action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                path: "/cache".to_string(),
                mode,
                make_parents: false,
                owner: Some(pb::ChownOpt {
                    user: Some(id(uid)),
                    group: Some(id(gid)),
                }),
                timestamp: -1,
            })),
        };
        let op = pb::Op {
            op: Some(pb::op::Op::File(pb::FileOp {
                actions: vec![action],
            })),
            platform: Some(pb_platform(&state.platform)),
            ..Default::default()
        };
        let metadata = self.metadata("[internal] settings cache mount permissions", None);
        self.add_op(op, &[], metadata, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch_copy(
        &mut self,
        state: &mut State,
        command: &crate::parser::Command,
        copy: &CopyInstruction,
        is_add: bool,
        from: Option<Option<OutputRef>>,
        prefix: &mut Prefix,
    ) -> Result<(), CompileError> {
        let line = command.span.start;
        let keyword = if is_add { "ADD" } else { "COPY" };
        let sources = copy
            .sources
            .iter()
            .map(|s| self.expand(s, &state.env, line))
            .collect::<Result<Vec<_>, _>>()?;
        let dest_raw = self.expand(&copy.dest, &state.env, line)?;
        let chown = match &copy.chown {
            Some(c) => Some(self.expand(c, &state.env, line)?),
            None => None,
        };
        let chmod = match &copy.chmod {
            Some(c) => Some(self.expand(c, &state.env, line)?),
            None => None,
        };
        let excludes = copy
            .excludes
            .iter()
            .map(|e| self.expand(e, &state.env, line))
            .collect::<Result<Vec<_>, _>>()?;
        let mode = match &chmod {
            None => -1,
            Some(value) => match u32::from_str_radix(value, 8) {
                Ok(m) if m <= 0o7777 => m as i32,
                _ => {
                    return Err(CompileError::Chmod {
                        line,
                        value: value.clone(),
                    })
                }
            },
        };

        // What each source is: git and http(s) are ADD only; git is not supported yet.
        let mut kinds = Vec::new();
        for src in &sources {
            let kind = if is_git_source(src) {
                if !is_add {
                    return Err(CompileError::Invalid {
                        line,
                        message: "source can't be a git ref for COPY".to_string(),
                    });
                }
                SourceKind::Git
            } else if src.starts_with("http://") || src.starts_with("https://") {
                if !is_add {
                    return Err(CompileError::Invalid {
                        line,
                        message: "source can't be a URL for COPY".to_string(),
                    });
                }
                SourceKind::Http
            } else {
                SourceKind::Local
            };
            kinds.push(kind);
        }
        if copy.checksum.is_some() {
            if sources.len() != 1 || !copy.heredocs.is_empty() {
                return Err(CompileError::Invalid {
                    line,
                    message: "checksum can't be specified for multiple sources".to_string(),
                });
            }
            if kinds[0] == SourceKind::Local {
                return Err(CompileError::Invalid {
                    line,
                    message: "checksum requires HTTP(S) or Git sources".to_string(),
                });
            }
        }
        // `ADD --checksum=<digest>` of a URL: the daemon verifies the download against it.
        let checksum = match &copy.checksum {
            None => None,
            Some(raw) => {
                let value = self.expand(raw, &state.env, line)?;
                let hex = |h: &str| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit());
                // A URL takes a digest; a git source a (prefix of a) commit hash.
                let valid = if kinds[0] == SourceKind::Git {
                    hex(&value)
                } else {
                    value
                        .split_once(':')
                        .is_some_and(|(algorithm, h)| !algorithm.is_empty() && hex(h))
                };
                if !valid {
                    return Err(CompileError::Invalid {
                        line,
                        message: format!("invalid checksum digest format: {value:?}"),
                    });
                }
                Some(value)
            }
        };

        // The source for local paths: another stage/image, or the main build context.
        let local_source = if kinds.contains(&SourceKind::Local) {
            match from {
                Some(output) => output,
                None => Some(self.context()?),
            }
        } else {
            None
        };

        let name = prefix.apply(&self.display_name(&command.original, &state.env));
        let dest = dest_path(&state.dir, &dest_raw);
        let mut inputs: Vec<OutputRef> = Vec::new();
        let base_index = match &state.output {
            Some(output) => {
                inputs.push(output.clone());
                0
            }
            None => -1,
        };
        let input_of = |inputs: &mut Vec<OutputRef>, output: &Option<OutputRef>| match output {
            Some(output) => match inputs.iter().position(|i| i == output) {
                Some(p) => p as i64,
                None => {
                    inputs.push(output.clone());
                    (inputs.len() - 1) as i64
                }
            },
            None => -1,
        };
        let owner = match &chown {
            Some(c) => Some(chown_opt(c, base_index, line)?),
            None => None,
        };

        // (secondary input, action) per source; inputs are final once all are known.
        let mut copies: Vec<(i64, pb::FileActionCopy)> = Vec::new();
        for (src, kind) in sources.iter().zip(&kinds) {
            if *kind == SourceKind::Git {
                let output =
                    Some(self.git_source(src, copy.keep_git_dir, &checksum, &name, line)?);
                let secondary = input_of(&mut inputs, &output);
                copies.push((
                    secondary,
                    pb::FileActionCopy {
                        src: "/".to_string(),
                        dest: dest.clone(),
                        owner: owner.clone(),
                        mode,
                        create_dest_path: true,
                        timestamp: -1,
                        exclude_patterns: excludes.clone(),
                        ..Default::default()
                    },
                ));
            } else if *kind == SourceKind::Http {
                let filename = url_filename(src);
                let op = pb::Op {
                    op: Some(pb::op::Op::Source(pb::SourceOp {
                        identifier: src.clone(),
                        attrs: {
                            let mut attrs =
                                BTreeMap::from([("http.filename".to_string(), filename.clone())]);
                            if let Some(checksum) = &checksum {
                                attrs.insert("http.checksum".to_string(), checksum.clone());
                            }
                            attrs
                        },
                    })),
                    // Like BuildKit, only image sources carry a platform.
                    platform: None,
                    ..Default::default()
                };
                // BuildKit describes the http source with an empty dockerfile command.
                let metadata = self.metadata(&name, Some(""));
                let output = Some(self.add_op(op, &[], metadata, None)?);
                let secondary = input_of(&mut inputs, &output);
                copies.push((
                    secondary,
                    pb::FileActionCopy {
                        src: clean_path(&format!("/{filename}")),
                        dest: dest.clone(),
                        owner: owner.clone(),
                        mode,
                        attempt_unpack_docker_compatibility: copy.unpack.unwrap_or(false),
                        create_dest_path: true,
                        timestamp: -1,
                        exclude_patterns: excludes.clone(),
                        ..Default::default()
                    },
                ));
            } else {
                let secondary = input_of(&mut inputs, &local_source);
                let (src, include_patterns, required_paths) = if copy.parents {
                    parents_copy(src)
                } else {
                    (clean_path(&format!("/{src}")), Vec::new(), Vec::new())
                };
                copies.push((
                    secondary,
                    pb::FileActionCopy {
                        src,
                        include_patterns,
                        exclude_patterns: excludes.clone(),
                        required_paths,
                        dest: dest.clone(),
                        owner: owner.clone(),
                        mode,
                        follow_symlink: true,
                        dir_copy_contents: true,
                        attempt_unpack_docker_compatibility: is_add && copy.unpack.unwrap_or(true),
                        create_dest_path: true,
                        allow_wildcard: true,
                        allow_empty_wildcard: true,
                        timestamp: -1,
                        ..Default::default()
                    },
                ));
            }
        }
        for doc in &copy.heredocs {
            let mut data = doc.data();
            if doc.expand {
                let lexer = Lexer {
                    skip_quotes: true,
                    ..Lexer::new('\\')
                };
                data = lexer.process_word(&data, &state.env).map_err(|source| {
                    CompileError::Expand {
                        line,
                        word: doc.name.clone(),
                        source,
                    }
                })?;
            }
            let file = Some(self.inline_file(state, &doc.name, data.into_bytes(), 0o644)?);
            let secondary = input_of(&mut inputs, &file);
            copies.push((
                secondary,
                pb::FileActionCopy {
                    src: clean_path(&format!("/{}", doc.name)),
                    dest: dest.clone(),
                    owner: owner.clone(),
                    mode,
                    create_dest_path: true,
                    timestamp: -1,
                    exclude_patterns: excludes.clone(),
                    ..Default::default()
                },
            ));
        }

        let count = copies.len();
        let mut actions = Vec::new();
        for (i, (secondary, action)) in copies.into_iter().enumerate() {
            let input = if i == 0 {
                base_index
            } else {
                // The previous action's output: `number of inputs + action index`.
                (inputs.len() + i - 1) as i64
            };
            actions.push(pb::FileAction {
                input,
                secondary_input: secondary,
                output: if i + 1 == count { 0 } else { -1 },
                action: Some(pb::file_action::Action::Copy(action)),
            });
        }
        let op = pb::Op {
            op: Some(pb::op::Op::File(pb::FileOp { actions })),
            platform: Some(pb_platform(&state.platform)),
            ..Default::default()
        };
        let metadata = self.metadata(&name, None);
        state.output = Some(self.add_op(op, &inputs, metadata, Some(command.span))?);

        let mut message = String::from(keyword);
        if copy.parents {
            message.push_str(" --parents");
        }
        if let Some(c) = &chown {
            message.push_str(&format!(" --chown={c}"));
        }
        if let Some(c) = &chmod {
            message.push_str(&format!(" --chmod={c}"));
        }
        for src in &sources {
            message.push_str(&format!(" {src}"));
        }
        for doc in &copy.heredocs {
            message.push_str(&format!(" <<{}", doc.name));
        }
        message.push_str(&format!(" {dest_raw} # buildkit"));
        self.history(state, message, true);
        Ok(())
    }

    /// The main build context source op, added on first use.
    fn context(&mut self) -> Result<OutputRef, CompileError> {
        if let Some(context) = &self.context {
            return Ok(context.clone());
        }
        let mut attrs = BTreeMap::from([
            ("local.session".to_string(), self.options.session_id.clone()),
            (
                "local.sharedkeyhint".to_string(),
                self.options.context_name.clone(),
            ),
        ]);
        if !self.options.excludes.is_empty() {
            // Serialising a list of strings cannot fail.
            let json = serde_json::to_string(&self.options.excludes).unwrap_or_default();
            attrs.insert("local.excludepatterns".to_string(), json);
        }
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: format!("local://{}", self.options.context_name),
                attrs,
            })),
            // Like BuildKit, only image sources carry a platform.
            platform: None,
            ..Default::default()
        };
        // The context is shared by every stage; a stage ignoring the cache still reads it
        // incrementally.
        let metadata = pb::OpMetadata {
            ignore_cache: false,
            ..self.metadata("[internal] load build context", None)
        };
        let output = self.add_op(op, &[], metadata, None)?;
        self.context = Some(output.clone());
        Ok(output)
    }

    /// Target-level settings: platform fields, `--label`s, layers left to the exporter.
    fn finalize(&self, state: &mut State) {
        let platform = &self.options.platform;
        let same =
            state.image.os == platform.os && state.image.architecture == platform.architecture;
        state.image.os = platform.os.clone();
        state.image.architecture = platform.architecture.clone();
        if platform.variant.is_some() || !same {
            state.image.variant = platform.variant.clone();
        }
        if !self.options.labels.is_empty() {
            let labels = state.runtime().labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in &self.options.labels {
                labels.insert(k.clone(), v.clone());
            }
        }
        state.image.rootfs.diff_ids.clear();
    }
}

/// `RUN --network` and `RUN --security` as ExecOp fields.
///
/// The frontend only compiles them: `network=host` needs the `network.host` entitlement and
/// `security=insecure` the `security.insecure` one, both granted by the daemon's configuration
/// and the client's `--allow`. Checking them is the daemon's job before it solves.
#[derive(Debug, Clone)]
struct RunModes {
    network: pb::NetMode,
    security: pb::SecurityMode,
    mounts: Vec<RunMount>,
}

/// One `RUN --mount` the compiler supports (`type=cache`, `type=tmpfs`, `type=bind`, `type=secret`,
/// `type=ssh`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunMount {
    /// `type=cache`: a persistent directory keyed by `id` (empty = the target).
    Cache {
        target: String,
        id: String,
        sharing: pb::CacheSharingOpt,
        readonly: bool,
        uid: u32,
        gid: u32,
        mode: i32,
        /// `from`: a new cache dir starts as `source` of this stage or image (else an empty
        /// dir owned by uid/gid with `mode`).
        from: Option<String>,
        source: String,
    },
    /// `type=tmpfs`, with an optional size in bytes.
    Tmpfs { target: String, size: i64 },
    /// `type=bind`: `source` (default the root) of the `from` stage or image (default the build
    /// context) at `target`, read-only unless `rw`.
    Bind {
        target: String,
        from: Option<String>,
        source: String,
        readonly: bool,
    },
    /// `type=secret`: a file (and/or an environment variable) served by the client.
    Secret(SecretMount),
    /// `type=ssh`: an SSH agent socket forwarded from the client.
    Ssh(SshMount),
}

/// `RUN --mount=type=secret` (BuildKit's `parseMount` + `dispatchRunMounts`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SecretMount {
    /// The secret id (defaults to the target's base name).
    id: String,
    /// Where the file is mounted; `None` with `env` set = only the variable.
    target: Option<String>,
    /// `env=`: also (or only) expose the value as this environment variable.
    env: Option<String>,
    required: bool,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// `RUN --mount=type=ssh`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SshMount {
    /// The agent id (`default` unless given).
    id: String,
    /// The socket path; `None` = `/run/buildkit/ssh_agent.<n>` (n counts the RUN's ssh mounts).
    target: Option<String>,
    required: bool,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// Parses `--mount` values of `type=secret` and `type=ssh`; `None` for other types. The keys
/// are BuildKit's: `id`, `target|dst|destination`, `source|src` (the id, for secrets),
/// `required`, `mode` (octal), `uid`, `gid`, `env` (secrets); `ro|readonly` is accepted as
/// both are always read-only.
fn parse_session_mount(value: &str, line: usize) -> Result<Option<RunMount>, CompileError> {
    let invalid = |message: String| CompileError::Invalid { line, message };
    let fields: Vec<(String, Option<&str>, &str)> = value
        .split(',')
        .filter(|f| !f.is_empty())
        .map(|field| match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim()), field),
            None => (field.trim().to_ascii_lowercase(), None, field),
        })
        .collect();
    let kind = fields
        .iter()
        .rev()
        .find(|(k, _, _)| k == "type")
        .and_then(|(_, v, _)| *v)
        .map(str::to_ascii_lowercase);
    let secret = match kind.as_deref() {
        Some("secret") => true,
        Some("ssh") => false,
        _ => return Ok(None),
    };
    let (mut id, mut target, mut env) = (None::<String>, None::<String>, None::<String>);
    let mut required = false;
    let (mut uid, mut gid, mut mode) = (0u32, 0u32, None::<u32>);
    for (key, val, field) in &fields {
        let need = || val.ok_or_else(|| invalid(format!("invalid mount option {field:?}")));
        match key.as_str() {
            "type" => {}
            "id" => id = Some(need()?.to_string()),
            "source" | "src" if secret => id = Some(need()?.to_string()),
            "target" | "dst" | "destination" => target = Some(need()?.to_string()),
            "env" if secret => env = Some(need()?.to_string()),
            "required" => {
                required = match val {
                    None | Some("") => true,
                    Some(v) => parse_go_bool(v)
                        .ok_or_else(|| invalid(format!("invalid value for required: {v}")))?,
                }
            }
            "readonly" | "ro" => {}
            "uid" => {
                uid = need()?
                    .parse()
                    .map_err(|_| invalid(format!("invalid uid {field:?}")))?
            }
            "gid" => {
                gid = need()?
                    .parse()
                    .map_err(|_| invalid(format!("invalid gid {field:?}")))?
            }
            "mode" => {
                mode = Some(
                    u32::from_str_radix(need()?, 8)
                        .map_err(|_| invalid(format!("invalid mode {field:?}")))?,
                )
            }
            other => return Err(invalid(format!("unexpected key '{other}' in '{field}'"))),
        }
    }
    let target = target.filter(|t| !t.is_empty());
    if secret {
        let id = match (id.filter(|i| !i.is_empty()), &target) {
            (Some(id), _) => id,
            (None, Some(target)) => target
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            (None, None) => {
                return Err(invalid(
                    "one of source, target required for a secret mount".to_string(),
                ))
            }
        };
        if id.is_empty() {
            return Err(invalid(format!("invalid secret id in {value:?}")));
        }
        // Only an explicit target or no `env=` gives a file (BuildKit: `/run/secrets/<id>`).
        let target = match (target, &env) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => Some(format!(
                "/run/secrets/{}",
                id.rsplit('/').next().unwrap_or(&id)
            )),
        };
        Ok(Some(RunMount::Secret(SecretMount {
            id,
            target,
            env,
            required,
            uid,
            gid,
            mode: mode.unwrap_or(0o400),
        })))
    } else {
        Ok(Some(RunMount::Ssh(SshMount {
            id: id
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            target,
            required,
            uid,
            gid,
            mode: mode.unwrap_or(0o600),
        })))
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Parses the value of `--mount` (`type=cache,target=/root/.cache,sharing=locked`), as
/// BuildKit's `instructions.parseMount`: `target|dst|destination`, `id`, `sharing`,
/// `readonly|ro`, `rw|readwrite`, `uid`, `gid`, `mode` (octal), `size`, `from`, `source|src`;
/// `type=secret|ssh` go to [`parse_session_mount`].
fn parse_mount(value: &str, line: usize) -> Result<RunMount, CompileError> {
    if let Some(mount) = parse_session_mount(value, line)? {
        return Ok(mount);
    }
    let invalid = |message: String| CompileError::Invalid { line, message };
    let unsupported = |what: String| CompileError::UnsupportedSource { line, what };
    let mut kind = "bind".to_string();
    let mut target = None;
    let mut id = None;
    let mut sharing = pb::CacheSharingOpt::Shared;
    let mut readonly = None;
    let (mut uid, mut gid, mut mode) = (0u32, 0u32, 0o755i32);
    let mut size = 0i64;
    let (mut from, mut source) = (None, None);
    for field in value.split(',').filter(|f| !f.is_empty()) {
        let (key, val) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim())),
            None => (field.trim().to_ascii_lowercase(), None),
        };
        let need = || val.ok_or_else(|| invalid(format!("invalid mount option {field:?}")));
        let flag = |v: Option<&str>| match v {
            None | Some("true") | Some("1") => Ok(true),
            Some("false") | Some("0") => Ok(false),
            Some(other) => Err(invalid(format!("invalid value for {key}: {other}"))),
        };
        match key.as_str() {
            "type" => kind = need()?.to_ascii_lowercase(),
            "target" | "dst" | "destination" => target = Some(need()?.to_string()),
            "id" => id = Some(need()?.to_string()),
            "sharing" => {
                sharing = match need()? {
                    "shared" => pb::CacheSharingOpt::Shared,
                    "private" => pb::CacheSharingOpt::Private,
                    "locked" => pb::CacheSharingOpt::Locked,
                    other => return Err(invalid(format!("unsupported sharing value {other:?}"))),
                }
            }
            "readonly" | "ro" => readonly = Some(flag(val)?),
            "rw" | "readwrite" => readonly = Some(!flag(val)?),
            "uid" => {
                uid = need()?
                    .parse()
                    .map_err(|_| invalid(format!("invalid uid {field:?}")))?
            }
            "gid" => {
                gid = need()?
                    .parse()
                    .map_err(|_| invalid(format!("invalid gid {field:?}")))?
            }
            "mode" => {
                mode = i32::from_str_radix(need()?, 8)
                    .map_err(|_| invalid(format!("invalid mode {field:?}")))?
            }
            "size" => {
                size =
                    parse_size(need()?).ok_or_else(|| invalid(format!("invalid size {field:?}")))?
            }
            "from" => from = Some(need()?.to_string()),
            "source" | "src" => source = Some(need()?.to_string()),
            other => return Err(invalid(format!("unexpected key '{other}' in '{field}'"))),
        }
    }
    let target = target
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("mount destination (target) is required".to_string()))?;
    // A relative target is resolved against the working directory in `dispatch_run`.
    match kind.as_str() {
        "cache" if from.as_deref().is_none_or(str::is_empty) && source.is_some() => Err(invalid(
            "RUN --mount=type=cache: source needs from (the stage or image it is read from)"
                .to_string(),
        )),
        "cache" => Ok(RunMount::Cache {
            from: from.filter(|f| !f.is_empty()),
            source: source.unwrap_or_default(),
            // Empty = the (absolute) target, filled in by `dispatch_run`.
            id: id.unwrap_or_default(),
            target,
            sharing,
            readonly: readonly.unwrap_or(false),
            uid,
            gid,
            mode,
        }),
        "tmpfs" => Ok(RunMount::Tmpfs { target, size }),
        "bind" => Ok(RunMount::Bind {
            target,
            from: from.filter(|f| !f.is_empty()),
            source: source.unwrap_or_default(),
            // BuildKit: bind mounts are read-only unless `rw`.
            readonly: readonly.unwrap_or(true),
        }),
        "secret" | "ssh" => Err(unsupported(format!("RUN --mount=type={kind}"))),
        other => Err(invalid(format!("unsupported mount type {other:?}"))),
    }
}

/// The LLB mount of a `type=secret` file at `dest` (no input, no output: llb's `AddSecret`).
fn secret_mount(secret: &SecretMount, dest: String) -> pb::Mount {
    pb::Mount {
        input: -1,
        dest,
        output: -1,
        mount_type: pb::MountType::Secret as i32,
        secret_opt: Some(pb::SecretOpt {
            id: secret.id.clone(),
            uid: secret.uid,
            gid: secret.gid,
            mode: secret.mode,
            optional: !secret.required,
        }),
        ..Default::default()
    }
}

/// The LLB mount of a `type=ssh` socket at `dest` (llb's `AddSSHSocket`).
fn ssh_mount(ssh: &SshMount, dest: String) -> pb::Mount {
    pb::Mount {
        input: -1,
        dest,
        output: -1,
        mount_type: pb::MountType::Ssh as i32,
        ssh_opt: Some(pb::SshOpt {
            id: ssh.id.clone(),
            uid: ssh.uid,
            gid: ssh.gid,
            mode: ssh.mode,
            optional: !ssh.required,
        }),
        ..Default::default()
    }
}

/// `size=` of a tmpfs mount: bytes, or with a `k`/`m`/`g` suffix (docker's `RAMInBytes`).
fn parse_size(value: &str) -> Option<i64> {
    let lower = value.to_ascii_lowercase();
    let trimmed = lower.trim_end_matches('b');
    let (number, unit) = match trimmed.chars().last()? {
        'k' => (&trimmed[..trimmed.len() - 1], 1i64 << 10),
        'm' => (&trimmed[..trimmed.len() - 1], 1 << 20),
        'g' => (&trimmed[..trimmed.len() - 1], 1 << 30),
        _ => (trimmed, 1),
    };
    let n: f64 = number.trim().parse().ok()?;
    (n >= 0.0).then_some((n * unit as f64) as i64)
}

/// Parses `RUN` flags; `--mount` supports `type=cache|tmpfs|bind|secret|ssh`, `--device` nothing
/// yet.
fn run_modes(flags: &[String], line: usize) -> Result<RunModes, CompileError> {
    let mut modes = RunModes {
        network: pb::NetMode::Unset,
        security: pb::SecurityMode::Sandbox,
        mounts: Vec::new(),
    };
    for flag in flags {
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag.as_str(), None),
        };
        let missing = || CompileError::Invalid {
            line,
            message: format!("missing a value on flag: {name}"),
        };
        match name {
            "network" => {
                modes.network = match value.ok_or_else(missing)? {
                    "default" => pb::NetMode::Unset,
                    "none" => pb::NetMode::None,
                    "host" => pb::NetMode::Host,
                    other => {
                        return Err(CompileError::Invalid {
                            line,
                            message: format!("invalid network mode {other:?}"),
                        })
                    }
                }
            }
            "mount" => modes
                .mounts
                .push(parse_mount(value.ok_or_else(missing)?, line)?),
            "security" => {
                modes.security = match value.ok_or_else(missing)? {
                    "sandbox" => pb::SecurityMode::Sandbox,
                    "insecure" => pb::SecurityMode::Insecure,
                    other => {
                        return Err(CompileError::Invalid {
                            line,
                            message: format!("security {other:?} is not valid"),
                        })
                    }
                }
            }
            other => {
                return Err(CompileError::UnsupportedFlag {
                    line,
                    instruction: "RUN".to_string(),
                    flag: other.to_string(),
                })
            }
        }
    }
    Ok(modes)
}

/// What a `--from` (COPY) or `from=` (RUN --mount) value names: a stage index, a stage name
/// (case-insensitive), or else an image.
fn named_source(from: &str, stages: &[Stage], line: usize) -> Result<CopySource, CompileError> {
    if let Ok(index) = from.parse::<usize>() {
        if index >= stages.len() {
            return Err(CompileError::StageIndex { line, index });
        }
        return Ok(CopySource::Stage(index));
    }
    Ok(
        match stages
            .iter()
            .position(|s| s.name.as_deref() == Some(from.to_ascii_lowercase().as_str()))
        {
            Some(j) => CopySource::Stage(j),
            None => CopySource::Image(from.to_string()),
        },
    )
}

/// Parses an `ONBUILD` trigger as a single instruction placed at the `FROM` that runs it.
fn parse_trigger(trigger: &str, span: Span) -> Result<crate::parser::Command, CompileError> {
    let fail = |source: crate::parser::ParseError| CompileError::Trigger {
        line: span.start,
        trigger: trigger.to_string(),
        source: Box::new(source),
    };
    let parsed = crate::parser::parse(&format!("FROM scratch\n{trigger}\n")).map_err(fail)?;
    let mut commands = parsed
        .stages
        .into_iter()
        .next()
        .map(|s| s.commands)
        .unwrap_or_default();
    if commands.len() != 1 {
        return Err(fail(crate::parser::ParseError::new(
            1,
            "onbuild trigger should be a single expression",
        )));
    }
    let mut command = commands.remove(0);
    command.span = span;
    Ok(command)
}

/// BuildKit's `parsePortSpec` for `EXPOSE`: `[ip:][hostport:]port[-end][/proto]` → `port/proto`
/// for each port of the range (`tcp` by default).
fn parse_port_spec(raw: &str) -> Result<Vec<String>, String> {
    let parts: Vec<&str> = raw.split(':').collect();
    let (ip, host_port, container) = match parts.len() {
        1 => ("".to_string(), "", parts[0]),
        2 => ("".to_string(), parts[0], parts[1]),
        n => (parts[..n - 2].join(":"), parts[n - 2], parts[n - 1]),
    };
    let (port, proto) = container.split_once('/').unwrap_or((container, ""));
    if port.is_empty() {
        return Err(format!("no port specified: {raw}<empty>"));
    }
    let proto = match proto.to_ascii_lowercase().as_str() {
        "" => "tcp".to_string(),
        p @ ("tcp" | "udp" | "sctp") => p.to_string(),
        other => return Err(format!("invalid proto: {other}")),
    };
    let ip = ip
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .map(str::to_string)
        .unwrap_or(ip);
    if !ip.is_empty() && ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("invalid IP address: {ip}"));
    }
    let (start, end) =
        parse_port_range(port).ok_or_else(|| format!("invalid containerPort: {port}"))?;
    if !host_port.is_empty() {
        let (hs, he) =
            parse_port_range(host_port).ok_or_else(|| format!("invalid hostPort: {host_port}"))?;
        if end - start != he - hs && end != start {
            return Err(format!(
                "invalid ranges specified for container and host Ports: {port} and {host_port}"
            ));
        }
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

fn parse_port_range(ports: &str) -> Option<(u32, u32)> {
    let parse = |p: &str| p.parse::<u16>().ok().map(u32::from);
    match ports.split_once('-') {
        None => parse(ports).map(|p| (p, p)),
        Some((a, b)) => {
            let (start, end) = (parse(a)?, parse(b)?);
            (end >= start).then_some((start, end))
        }
    }
}

/// Signal names Linux knows (moby's `signal.SignalMap`), without the `SIG` prefix.
const SIGNALS: &[&str] = &[
    "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
    "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
    "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "RTMIN", "RTMAX",
];

/// moby's `signal.ParseSignal`: a non-zero number, or a known name with or without `SIG`.
fn valid_signal(raw: &str) -> bool {
    if let Ok(n) = raw.parse::<i64>() {
        return n != 0;
    }
    let upper = raw.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if SIGNALS.contains(&name) {
        return true;
    }
    // RTMIN+1..RTMIN+15 and RTMAX-14..RTMAX-1.
    let offset = |rest: &str| rest.parse::<u8>().is_ok_and(|n| (1..=15).contains(&n));
    if let Some(rest) = name.strip_prefix("RTMIN+") {
        return offset(rest);
    }
    if let Some(rest) = name.strip_prefix("RTMAX-") {
        return rest.parse::<u8>().is_ok_and(|n| (1..=14).contains(&n));
    }
    false
}

/// Go's `time.Duration.String()` (`1m30s`, `500ms`, `0s`).
fn go_duration(nanos: i64) -> String {
    if nanos == 0 {
        return "0s".to_string();
    }
    let sign = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    let frac = |value: u64, unit: u64| -> String {
        let whole = value / unit;
        let rest = value % unit;
        if rest == 0 {
            return whole.to_string();
        }
        let digits = unit.to_string().len() - 1;
        let text = format!("{rest:0digits$}");
        format!("{whole}.{}", text.trim_end_matches('0'))
    };
    if n < 1_000 {
        return format!("{sign}{n}ns");
    }
    if n < 1_000_000 {
        return format!("{sign}{}\u{b5}s", frac(n, 1_000));
    }
    if n < 1_000_000_000 {
        return format!("{sign}{}ms", frac(n, 1_000_000));
    }
    let hours = n / 3_600_000_000_000;
    let minutes = (n / 60_000_000_000) % 60;
    let seconds = frac(n % 60_000_000_000, 1_000_000_000);
    if hours > 0 {
        format!("{sign}{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{sign}{minutes}m{seconds}s")
    } else {
        format!("{sign}{seconds}s")
    }
}

/// First line of a heredoc body, with `...` when there are more (progress names).
fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim().replace("\r\n", "\n");
    let mut lines = doc.split('\n');
    let first = lines.next().unwrap_or_default().to_string();
    if lines.next().is_some() {
        format!("{first}...")
    } else {
        first
    }
}

/// `COPY --parents` of one local source, as dockerfile2llb compiles it: the part before a
/// `/./` pivot (default the root) is copied with its contents, filtered by an include pattern
/// made of the rest, so the matched paths keep their parent directories under the destination.
/// A source without wildcards must exist (`required_paths`). Returns (src, includes, required).
fn parents_copy(src: &str) -> (String, Vec<String>, Vec<String>) {
    let (root, pattern) = match src.split_once("/./") {
        Some((root, pattern)) => (root, pattern),
        None => ("/", src),
    };
    let pattern = clean_path(&format!("/{pattern}"));
    let root = clean_path(&format!("/{root}"));
    let wildcards = |p: &str| p.contains(['*', '?', '[']);
    let required = if wildcards(&root) || wildcards(&pattern) {
        Vec::new()
    } else {
        vec![clean_path(&format!("{root}/{pattern}"))]
    };
    (
        root,
        vec![pattern.trim_start_matches('/').to_string()],
        required,
    )
}

/// Whether an `ADD` source names a git repository (BuildKit's `dfgitutil.ParseGitRef` forms).
fn is_git_source(src: &str) -> bool {
    if src.starts_with("git://") || src.starts_with("git@") || src.starts_with("ssh://") {
        return true;
    }
    if src.starts_with("github.com/") {
        return true;
    }
    if src.starts_with("http://") || src.starts_with("https://") {
        let path = src.split(['#', '?']).next().unwrap_or(src);
        return path.ends_with(".git");
    }
    false
}

/// The file name BuildKit gives an http source: the last path element, `__unnamed__` if none.
fn url_filename(url: &str) -> String {
    let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = match after_scheme.find('/') {
        Some(i) => &after_scheme[i..],
        None => "",
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let base = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if base.is_empty() || base == "." {
        "__unnamed__".to_string()
    } else {
        base.to_string()
    }
}

/// The image `FROM scratch` starts from.
fn empty_image(platform: &Platform) -> ImageConfig {
    ImageConfig {
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone(),
        config: Some(RuntimeConfig {
            working_dir: Some("/".to_string()),
            env: Some(vec![format!("PATH={DEFAULT_PATH}")]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pb_platform(platform: &Platform) -> pb::Platform {
    pb::Platform {
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone().unwrap_or_default(),
        os_version: platform.os_version.clone().unwrap_or_default(),
        os_features: platform.os_features.clone().unwrap_or_default(),
    }
}

/// `http_proxy` & co. from build args (matched case-insensitively), as BuildKit passes them.
fn proxy_env(build_args: &BTreeMap<String, String>) -> Option<pb::ProxyEnv> {
    let mut proxy = pb::ProxyEnv::default();
    let mut set = false;
    for (key, value) in build_args {
        let slot = match key.to_ascii_lowercase().as_str() {
            "http_proxy" => &mut proxy.http_proxy,
            "https_proxy" => &mut proxy.https_proxy,
            "ftp_proxy" => &mut proxy.ftp_proxy,
            "no_proxy" => &mut proxy.no_proxy,
            "all_proxy" => &mut proxy.all_proxy,
            _ => continue,
        };
        *slot = value.clone();
        set = true;
    }
    set.then_some(proxy)
}

/// `--chown` / `USER` → `ChownOpt`: numeric ids by id, names by name (looked up in `input`).
fn chown_opt(value: &str, input: i64, line: usize) -> Result<pb::ChownOpt, CompileError> {
    let user_opt = |part: &str| -> Result<pb::UserOpt, CompileError> {
        if part.is_empty() {
            return Err(CompileError::Chown {
                line,
                value: value.to_string(),
            });
        }
        Ok(pb::UserOpt {
            user: Some(match part.parse::<u32>() {
                Ok(id) => pb::user_opt::User::ById(id),
                Err(_) => pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: part.to_string(),
                    input,
                }),
            }),
        })
    };
    let (user, group) = match value.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (value, None),
    };
    Ok(pb::ChownOpt {
        user: Some(user_opt(user)?),
        group: match group {
            Some(g) => Some(user_opt(g)?),
            None => None,
        },
    })
}

/// Lexical `path.Clean` for absolute paths.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// BuildKit's `NormalizeWorkdir`: relative paths are joined to the current directory.
fn normalize_workdir(current: &str, requested: &str) -> String {
    if requested.starts_with('/') {
        clean_path(requested)
    } else {
        clean_path(&format!("{current}/{requested}"))
    }
}

/// COPY destination relative to the working directory; a trailing `/` (or `.`) is kept, since it
/// means "into this directory".
fn dest_path(dir: &str, dest: &str) -> String {
    let dest = if dest.is_empty() || dest == "." {
        "./"
    } else {
        dest
    };
    let joined = if dest.starts_with('/') {
        clean_path(dest)
    } else {
        clean_path(&format!("{dir}/{dest}"))
    };
    let keep_slash = dest.ends_with('/') || dest.ends_with("/.") || dest == "./";
    if keep_slash && joined != "/" {
        format!("{joined}/")
    } else {
        joined
    }
}

/// Go's `fmt.Sprintf("%q", []string{...})`: `["a" "b"]`.
fn go_quote_list(args: &[String]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| go_quote(a)).collect();
    format!("[{}]", quoted.join(" "))
}

/// Go's `strconv.Quote`.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The name BuildKit gives a stage in dependency errors: its `AS` name or `stage-<index>`
/// (even in a single-stage Dockerfile, whose progress prefix is empty).
fn dependency_name(stage: &Stage, index: usize) -> String {
    stage
        .name
        .clone()
        .unwrap_or_else(|| format!("stage-{index}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_mount_options() {
        use super::{parse_mount, parse_size, RunMount};
        use kiln_proto::pb;
        assert_eq!(
            parse_mount("type=cache,target=/root/.cache", 1).unwrap(),
            RunMount::Cache {
                target: "/root/.cache".into(),
                id: String::new(),
                sharing: pb::CacheSharingOpt::Shared,
                readonly: false,
                uid: 0,
                gid: 0,
                mode: 0o755,
                from: None,
                source: String::new(),
            }
        );
        assert_eq!(
            parse_mount(
                "type=cache,dst=go,id=x,sharing=private,ro,uid=1,gid=2,mode=700",
                1
            )
            .unwrap(),
            RunMount::Cache {
                target: "go".into(),
                id: "x".into(),
                sharing: pb::CacheSharingOpt::Private,
                readonly: true,
                uid: 1,
                gid: 2,
                mode: 0o700,
                from: None,
                source: String::new(),
            }
        );
        assert!(matches!(
            parse_mount("type=cache,target=/c,from=build,source=/out", 1).unwrap(),
            RunMount::Cache { from: Some(f), source, .. } if f == "build" && source == "/out"
        ));
        assert!(parse_mount("type=cache,target=/c,source=/out", 1)
            .unwrap_err()
            .to_string()
            .contains("source needs from"));
        assert!(matches!(
            parse_mount("type=cache,destination=/c,readonly=true,rw", 1).unwrap(),
            RunMount::Cache {
                readonly: false,
                ..
            }
        ));
        assert_eq!(
            parse_mount("type=tmpfs,target=/t,size=64m", 1).unwrap(),
            RunMount::Tmpfs {
                target: "/t".into(),
                size: 64 << 20
            }
        );
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("2k"), Some(2048));
        assert_eq!(parse_size("1gb"), Some(1 << 30));
        assert!(parse_mount("type=cache", 3).is_err(), "target is required");
        assert!(parse_mount("type=cache,target=/c,bogus=1", 3).is_err());
        assert_eq!(
            parse_mount("type=bind,target=/c", 3).unwrap(),
            RunMount::Bind {
                target: "/c".into(),
                from: None,
                source: String::new(),
                readonly: true,
            }
        );
        assert_eq!(
            parse_mount("type=bind,from=build,src=/out,dst=o,rw", 3).unwrap(),
            RunMount::Bind {
                target: "o".into(),
                from: Some("build".into()),
                source: "/out".into(),
                readonly: false,
            }
        );
        assert!(parse_mount("type=cache,target=/c,from=builder", 3).is_ok());
    }

    use super::*;

    #[test]
    fn dest_rules() {
        assert_eq!(dest_path("/", "."), "/");
        assert_eq!(dest_path("/app", "."), "/app/");
        assert_eq!(dest_path("/app", "sub/"), "/app/sub/");
        assert_eq!(dest_path("/app", "file"), "/app/file");
        assert_eq!(dest_path("/app", "/abs/../x"), "/x");
        assert_eq!(dest_path("/app", "/"), "/");
    }

    #[test]
    fn parents_sources() {
        assert_eq!(
            parents_copy("a/b/c.txt"),
            (
                "/".into(),
                vec!["a/b/c.txt".into()],
                vec!["/a/b/c.txt".into()]
            )
        );
        assert_eq!(
            parents_copy("./src/./pkg/*/main.go"),
            ("/src".into(), vec!["pkg/*/main.go".into()], vec![])
        );
        assert_eq!(
            parents_copy("dir/"),
            ("/".into(), vec!["dir".into()], vec!["/dir".into()])
        );
    }

    #[test]
    fn workdir_rules() {
        assert_eq!(normalize_workdir("/", "app"), "/app");
        assert_eq!(normalize_workdir("/app", "sub/.."), "/app");
        assert_eq!(normalize_workdir("/app", "/x/"), "/x");
    }

    #[test]
    fn prefix_widths() {
        let mut p = Prefix {
            stage_name: String::new(),
            index: 0,
            total: 12,
            onbuild: false,
        };
        assert_eq!(p.apply("FROM x"), "[ 1/12] FROM x");
        let mut p = Prefix {
            stage_name: "build".into(),
            index: 0,
            total: 3,
            onbuild: false,
        };
        assert_eq!(p.apply("RUN a"), "[build 1/3] RUN a");
        p.onbuild = true;
        assert_eq!(p.apply("RUN b"), "[build 2/3] ONBUILD RUN b");
        let mut p = Prefix::default();
        assert_eq!(p.apply("FROM x"), "FROM x");
    }

    #[test]
    fn go_quoting() {
        assert_eq!(
            go_quote_list(&["/bin/sh".into(), "-c".into(), "echo \"hi\"\n".into()]),
            r#"["/bin/sh" "-c" "echo \"hi\"\n"]"#
        );
    }

    #[test]
    fn chown_forms() {
        let opt = chown_opt("1000:1001", 0, 1).unwrap();
        assert_eq!(opt.user.unwrap().user, Some(pb::user_opt::User::ById(1000)));
        assert_eq!(
            opt.group.unwrap().user,
            Some(pb::user_opt::User::ById(1001))
        );
        let opt = chown_opt("app", 0, 1).unwrap();
        assert!(opt.group.is_none());
        assert!(matches!(
            opt.user.unwrap().user,
            Some(pb::user_opt::User::ByName(ref n)) if n.name == "app"
        ));
        assert!(chown_opt(":1", 0, 1).is_err());
    }
}
