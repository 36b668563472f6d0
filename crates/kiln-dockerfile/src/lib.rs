//! Dockerfile frontend for kiln: parse a Dockerfile and compile it to LLB plus an image config,
//! the way BuildKit's `dockerfile.v0` frontend (`dockerfile2llb`) does. No I/O: base images are
//! resolved through the [`ImageMetaResolver`] the caller passes in.
//!
//! - [`parse`] → [`Dockerfile`] (directives, global `ARG`s, [`Stage`]s of [`Command`]s), or a
//!   [`ParseError`] with the instruction's lines and the offending word's [`Column`].
//! - [`compile`] → [`Compiled`] (`pb::Definition` of the target stage with progress names and
//!   source locations, and the [`ImageConfig`](kiln_image::oci::ImageConfig) with history), or a
//!   [`CompileError`] whose [`CompileError::location`] gives its place.
//! - [`excerpt`] renders a [`Location`] as BuildKit's client shows a failing instruction
//!   (`Dockerfile:3`, the lines marked `>>>`, a `^^^` under the offending word); unknown
//!   instructions and flags carry a "did you mean" hint.
//! - [`shell`] — word expansion (`$v`, `${v:-d}`, quotes, escapes) as BuildKit's lexer does it.
//!
//! Supported: every instruction — `FROM [--platform] image [AS name]`, `RUN [--network]
//! [--security] [--mount=type=cache|tmpfs|bind]` (shell and exec form, heredocs with and without
//! a shebang; bind mounts from a stage, an image or the build context, read-only unless `rw`,
//! writes discarded), `COPY [--from] [--chown] [--chmod] [--link] [--exclude] [--parents]`
//! (heredoc sources included), `ADD [--chown] [--chmod] [--link] [--unpack] [--exclude]
//! [--checksum]` (local archives extracted by the worker through
//! `attemptUnpackDockerCompatibility`, `http(s)://` URLs as `SourceOp`s with `http.checksum`,
//! git references as `git://` sources with `--keep-git-dir`),
//! `ENV`, `LABEL`, `WORKDIR`, `USER` (names kept as names: the worker resolves them), `CMD`,
//! `ENTRYPOINT`, `SHELL`, `ARG`, `EXPOSE`, `VOLUME`, `STOPSIGNAL`, `HEALTHCHECK`, `ONBUILD`
//! (stored in `OnBuild`; a base's triggers run first in a stage built on it) and `MAINTAINER`,
//! with image config and history as BuildKit writes them.
//!
//! Not supported yet (reported as `<line>: ... is not supported yet`): `RUN --mount=type=secret`,
//! `ssh`, `from`/`source` of a cache mount, `RUN --device`, query parameters in git references,
//! and `ONBUILD COPY --from` a stage the target does not otherwise need.
//!
//! `RUN --network=host` and `--security=insecure` are only compiled into the ExecOp; whether the
//! build may use them (the `network.host` / `security.insecure` entitlements) is for the daemon
//! to check.

mod compile;
mod diagnostic;
mod parser;
pub mod shell;

pub use compile::{
    compile, CompileError, CompileOptions, Compiled, ImageMetaResolver, NamedContext, ResolveError,
    DEFAULT_PATH,
};
pub use diagnostic::{excerpt, Column, Location};
pub use parser::{
    parse, ArgDef, Command, CommandLine, CopyInstruction, Dockerfile, HealthcheckInstruction,
    Heredoc, Instruction, KeyValue, ParseError, Span, Stage,
};
