//! Step two of argument handling: raw [`BuildArgs`] → validated [`BuildSettings`].
//!
//! Everything here is pure (the environment is passed in as a lookup
//! function), so the rules of reference §1.1–1.2 are unit-tested directly.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail};
use kiln_image::reference::Reference;

use crate::cli::BuildArgs;

/// Environment lookup (`std::env::var` in the binary, a map in tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// `auto`: currently always the plain renderer (also on a terminal).
    Auto,
    /// `plain`: buildctl's `--progress=plain` text on stderr.
    Plain,
    /// `quiet`: no progress.
    Quiet,
}

/// The validated build request.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// The build context directory as given.
    pub context: PathBuf,
    /// `-f` as given.
    pub file: Option<String>,
    /// Normalized, deduplicated tags; the first names the image.
    pub tags: Vec<String>,
    /// `--buildkit-host` if given.
    pub buildkit_host: Option<String>,
    /// Progress mode after `BUILDKIT_PROGRESS`.
    pub progress: ProgressMode,
    /// `-q`.
    pub quiet: bool,
    /// Frontend attributes from flags (`target`, `build-arg:*`); `filename` is added later.
    pub frontend_attrs: BTreeMap<String, String>,
    /// Warnings to print on stderr.
    pub warnings: Vec<String>,
}

/// Order-preserving dedupe (nerdctl's `strutil.DedupeStrSlice`).
fn dedupe(values: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    values
        .iter()
        .filter(|v| seen.insert(v.as_str()))
        .cloned()
        .collect()
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Flags of `nerdctl build` that are parsed but not implemented yet, with
/// whether each was given.
fn unsupported_flags(args: &BuildArgs) -> Vec<(&'static str, bool)> {
    let network_given = match args.network.as_deref() {
        None | Some("") | Some("default") => false,
        Some(_) => true,
    };
    vec![
        ("no-cache", args.no_cache.is_some()),
        ("output", args.output.is_some()),
        ("provenance", args.provenance.is_some()),
        ("pull", args.pull.is_some()),
        ("secret", !args.secret.is_empty()),
        ("allow", !args.allow.is_empty()),
        ("attest", !args.attest.is_empty()),
        ("ssh", !args.ssh.is_empty()),
        ("sbom", args.sbom.is_some()),
        ("cache-from", !args.cache_from.is_empty()),
        ("cache-to", !args.cache_to.is_empty()),
        ("network", network_given),
        ("platform", !args.platform.is_empty()),
        ("build-context", !args.build_context.is_empty()),
        ("iidfile", args.iidfile.is_some()),
        ("label", !args.label.is_empty()),
        ("add-host", !args.add_host.is_empty()),
        ("source-policy-file", args.source_policy_file.is_some()),
    ]
}

/// The context argument (§1.1).
pub fn resolve_context(context: &[String]) -> anyhow::Result<PathBuf> {
    let ctx = match context {
        [] => bail!("context needs to be specified"),
        [one] => one,
        more => bail!("accepts 1 arg(s), received {}", more.len()),
    };
    if ctx == "-" || ctx.contains("://") {
        bail!("unsupported build context: {ctx:?}");
    }
    Ok(PathBuf::from(ctx))
}

/// Tags: each normalized (`foo` → `docker.io/library/foo:latest`), then deduplicated.
pub fn resolve_tags(tags: &[String]) -> anyhow::Result<Vec<String>> {
    let mut normalized = Vec::new();
    for tag in dedupe(tags) {
        let reference = Reference::parse_normalized(&tag)
            .map_err(|e| anyhow!(e).context(format!("invalid tag {tag:?}")))?;
        normalized.push(reference.to_string());
    }
    Ok(dedupe(&normalized))
}

/// `--build-arg` (§1.2): deduped; `K=V` → `build-arg:K=V`; bare `K` takes
/// its value from the environment and is skipped when unset; an empty key is
/// an error. `SOURCE_DATE_EPOCH` from the environment is added unless given.
pub fn resolve_build_args(
    build_args: &[String],
    env: Env<'_>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut attrs = BTreeMap::new();
    for arg in dedupe(build_args) {
        let (key, value) = match arg.split_once('=') {
            Some((key, value)) => (key.to_string(), value.to_string()),
            None => match env(&arg) {
                Some(value) if !arg.is_empty() => (arg.clone(), value),
                _ if arg.is_empty() => bail!("invalid build arg {arg:?}"),
                _ => {
                    tracing::debug!(arg, "build arg not set in the environment, skipping");
                    continue;
                }
            },
        };
        if key.is_empty() {
            bail!("invalid build arg {arg:?}");
        }
        if key == "BUILDKIT_INLINE_CACHE" {
            match parse_go_bool(&value) {
                Some(true) => {
                    bail!("kiln build: build-arg BUILDKIT_INLINE_CACHE (inline cache export) is not supported yet")
                }
                Some(false) => {}
                None => tracing::warn!(value, "invalid BUILDKIT_INLINE_CACHE value"),
            }
        }
        // buildctl's --opt map: last wins for a repeated key.
        attrs.insert(format!("build-arg:{key}"), value);
    }
    if let Some(epoch) = env("SOURCE_DATE_EPOCH") {
        attrs
            .entry("build-arg:SOURCE_DATE_EPOCH".to_string())
            .or_insert(epoch);
    }
    Ok(attrs)
}

/// `--progress`, with `BUILDKIT_PROGRESS` overriding `auto`.
pub fn resolve_progress(flag: &str, env: Env<'_>) -> anyhow::Result<ProgressMode> {
    let mut mode = flag.to_string();
    if mode == "auto" {
        if let Some(from_env) = env("BUILDKIT_PROGRESS").filter(|v| !v.is_empty()) {
            mode = from_env;
        }
    }
    match mode.as_str() {
        "auto" => Ok(ProgressMode::Auto),
        "plain" => Ok(ProgressMode::Plain),
        "quiet" => Ok(ProgressMode::Quiet),
        "tty" | "rawjson" => bail!("kiln build: progress mode {mode:?} is not supported yet"),
        other => bail!("invalid progress mode {other:?} (expected auto, plain or quiet)"),
    }
}

/// Resolves and validates every build flag.
pub fn resolve_build(args: &BuildArgs, env: Env<'_>) -> anyhow::Result<BuildSettings> {
    for (name, given) in unsupported_flags(args) {
        if given {
            bail!("kiln build: flag --{name} is not supported yet");
        }
    }
    let mut warnings = Vec::new();
    if args.rm == Some(false) {
        warnings.push("ignoring deprecated flag: '--rm=false'".to_string());
    }
    let context = resolve_context(&args.context)?;
    let tags = resolve_tags(&args.tag)?;
    let mut frontend_attrs = BTreeMap::new();
    if let Some(target) = args.target.as_deref().filter(|t| !t.is_empty()) {
        frontend_attrs.insert("target".to_string(), target.to_string());
    }
    frontend_attrs.extend(resolve_build_args(&args.build_arg, env)?);
    let progress = resolve_progress(&args.progress, env)?;
    Ok(BuildSettings {
        context,
        file: args.file.clone(),
        tags,
        buildkit_host: args.buildkit_host.clone(),
        progress,
        quiet: args.quiet,
        frontend_attrs,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn args(argv: &[&str]) -> BuildArgs {
        let cli = Cli::try_parse_from(["kiln", "build"].iter().chain(argv.iter())).unwrap();
        cli.build_args().clone()
    }

    fn resolve(argv: &[&str], env: &[(&str, &str)]) -> anyhow::Result<BuildSettings> {
        resolve_build(&args(argv), &env_of(env))
    }

    fn err(argv: &[&str]) -> String {
        format!("{:#}", resolve(argv, &[]).unwrap_err())
    }

    #[test]
    fn context_rules() {
        assert_eq!(err(&[]), "context needs to be specified");
        assert_eq!(err(&["-"]), "unsupported build context: \"-\"");
        assert_eq!(
            err(&["https://example.invalid/repo.git"]),
            "unsupported build context: \"https://example.invalid/repo.git\""
        );
        assert_eq!(err(&["a", "b"]), "accepts 1 arg(s), received 2");
        assert_eq!(
            resolve(&["ctx"], &[]).unwrap().context,
            PathBuf::from("ctx")
        );
    }

    #[test]
    fn tags_are_normalized_and_deduped() {
        let s = resolve(
            &[
                "-t",
                "foo",
                "-t",
                "foo",
                "-t",
                "docker.io/library/foo:latest",
                "-t",
                "127.0.0.1:5000/x:1",
                ".",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            s.tags,
            vec!["docker.io/library/foo:latest", "127.0.0.1:5000/x:1"]
        );
        assert!(err(&["-t", "Bad Name", "."]).starts_with("invalid tag \"Bad Name\""));
    }

    #[test]
    fn build_arg_rules() {
        let env = env_of(&[("FROM_ENV", "e"), ("EMPTY", "")]);
        let attrs = resolve_build_args(
            &[
                "A=1".into(),
                "A=1".into(),
                "B=x=y".into(),
                "FROM_ENV".into(),
                "EMPTY".into(),
                "UNSET".into(),
                "C=".into(),
            ],
            &env,
        )
        .unwrap();
        let expected: BTreeMap<String, String> = [
            ("build-arg:A", "1"),
            ("build-arg:B", "x=y"),
            ("build-arg:FROM_ENV", "e"),
            ("build-arg:EMPTY", ""),
            ("build-arg:C", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(attrs, expected);

        let e = resolve_build_args(&["=v".into()], &env).unwrap_err();
        assert_eq!(e.to_string(), "invalid build arg \"=v\"");
        // Later values win for a repeated key.
        let attrs = resolve_build_args(&["K=1".into(), "K=2".into()], &env).unwrap();
        assert_eq!(attrs["build-arg:K"], "2");
    }

    #[test]
    fn source_date_epoch_from_env_unless_given() {
        let env = env_of(&[("SOURCE_DATE_EPOCH", "100")]);
        let attrs = resolve_build_args(&[], &env).unwrap();
        assert_eq!(attrs["build-arg:SOURCE_DATE_EPOCH"], "100");
        let attrs = resolve_build_args(&["SOURCE_DATE_EPOCH=5".into()], &env).unwrap();
        assert_eq!(attrs["build-arg:SOURCE_DATE_EPOCH"], "5");
    }

    #[test]
    fn inline_cache_is_refused_not_ignored() {
        let env = env_of(&[]);
        assert!(resolve_build_args(&["BUILDKIT_INLINE_CACHE=1".into()], &env).is_err());
        assert!(resolve_build_args(&["BUILDKIT_INLINE_CACHE=0".into()], &env).is_ok());
    }

    #[test]
    fn target_and_progress() {
        let s = resolve(&["--target", "build", "."], &[]).unwrap();
        assert_eq!(s.frontend_attrs["target"], "build");
        assert_eq!(s.progress, ProgressMode::Auto);
        let s = resolve(&["."], &[("BUILDKIT_PROGRESS", "plain")]).unwrap();
        assert_eq!(s.progress, ProgressMode::Plain);
        // The env var only overrides auto.
        let s = resolve(
            &["--progress=quiet", "."],
            &[("BUILDKIT_PROGRESS", "plain")],
        )
        .unwrap();
        assert_eq!(s.progress, ProgressMode::Quiet);
        assert!(err(&["--progress=fancy", "."]).starts_with("invalid progress mode \"fancy\""));
        assert_eq!(
            err(&["--progress=tty", "."]),
            "kiln build: progress mode \"tty\" is not supported yet"
        );
    }

    #[test]
    fn unsupported_flags_fail_by_name() {
        for (argv, name) in [
            (&["--no-cache", "."][..], "no-cache"),
            (&["--no-cache=false", "."][..], "no-cache"),
            (&["-o", "type=local,dest=out", "."][..], "output"),
            (&["--secret", "id=a,src=b", "."][..], "secret"),
            (&["--platform=linux/arm64", "."][..], "platform"),
            (&["--network=host", "."][..], "network"),
            (&["--cache-from", "r/x", "."][..], "cache-from"),
            (&["--iidfile", "f", "."][..], "iidfile"),
            (&["--label", "a=b", "."][..], "label"),
            (&["--pull", "."][..], "pull"),
            (&["--add-host", "h:1.2.3.4", "."][..], "add-host"),
            (&["--build-context", "a=b", "."][..], "build-context"),
            (
                &["--source-policy-file", "p", "."][..],
                "source-policy-file",
            ),
            (&["--attest", "type=sbom", "."][..], "attest"),
            (&["--sbom", "true", "."][..], "sbom"),
            (&["--provenance", "true", "."][..], "provenance"),
            (&["--ssh", "default", "."][..], "ssh"),
            (&["--allow", "network.host", "."][..], "allow"),
            (&["--cache-to", "type=inline", "."][..], "cache-to"),
        ] {
            assert_eq!(
                err(argv),
                format!("kiln build: flag --{name} is not supported yet"),
                "{argv:?}"
            );
        }
        // --network=default is what nerdctl does by default: accepted.
        assert!(resolve(&["--network=default", "."], &[]).is_ok());
    }

    #[test]
    fn rm_false_warns() {
        let s = resolve(&["--rm=false", "."], &[]).unwrap();
        assert_eq!(s.warnings, vec!["ignoring deprecated flag: '--rm=false'"]);
        assert!(resolve(&["--rm", "."], &[]).unwrap().warnings.is_empty());
    }
}
