//! Dockerfile frontend for kiln: parse a Dockerfile and compile it to LLB plus an image config,
//! the way BuildKit's `dockerfile.v0` frontend (`dockerfile2llb`) does. No I/O: base images are
//! resolved through the [`ImageMetaResolver`] the caller passes in.
//!
//! - [`parse`] → [`Dockerfile`] (directives, global `ARG`s, [`Stage`]s of [`Command`]s), or a
//!   [`ParseError`] with its line.
//! - [`compile`] → [`Compiled`] (`pb::Definition` of the target stage with progress names and
//!   source locations, and the [`ImageConfig`](kiln_image::oci::ImageConfig) with history), or a
//!   [`CompileError`] whose message starts with the line.
//! - [`shell`] — word expansion (`$v`, `${v:-d}`, quotes, escapes) as BuildKit's lexer does it.
//!
//! Supported: `FROM [--platform] image [AS name]`, `RUN`, `COPY [--from] [--chown] [--chmod]
//! [--link]`, `ENV`, `LABEL`, `WORKDIR`, `USER`, `CMD`, `ENTRYPOINT`, `SHELL`, `ARG`. Other
//! instructions parse but fail to compile with `<line>: instruction <X> is not supported yet`.

mod compile;
mod parser;
pub mod shell;

pub use compile::{
    compile, CompileError, CompileOptions, Compiled, ImageMetaResolver, ResolveError, DEFAULT_PATH,
};
pub use parser::{
    parse, ArgDef, Command, CommandLine, CopyInstruction, Dockerfile, Instruction, KeyValue,
    ParseError, Span, Stage,
};
