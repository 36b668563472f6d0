//! Step two of argument handling: raw [`BuildArgs`] → validated [`BuildSettings`].
//!
//! Everything here is pure (the environment is passed in as a lookup
//! function), so the rules of reference §1.1–1.2 are unit-tested directly.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use kiln_image::oci::Platform;
use kiln_image::reference::Reference;

use crate::cli::BuildArgs;

/// Environment lookup (`std::env::var` in the binary, a map in tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// `auto`: the live view when stderr is a terminal, else plain.
    Auto,
    /// `plain`: buildctl's `--progress=plain` text on stderr.
    Plain,
    /// `tty`: the live view redrawn in place (plain when stderr is not a
    /// terminal).
    Tty,
    /// `rawjson`: one JSON object per status message on stderr.
    RawJson,
    /// `quiet`: no progress, only errors.
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
    /// Start kilnd when discovery finds no daemon: not `--no-start-daemon`
    /// nor `KILN_NO_START_DAEMON` set (to anything but empty, `0` or `false`).
    pub start_daemon: bool,
    /// Progress mode after `BUILDKIT_PROGRESS`.
    pub progress: ProgressMode,
    /// `-q`.
    pub quiet: bool,
    /// Frontend attributes from flags (`target`, `build-arg:*`, `label:*`,
    /// `no-cache`, `platform`, `image-resolve-mode`, `force-network-mode`,
    /// `add-hosts`); `filename` is added later.
    pub frontend_attrs: BTreeMap<String, String>,
    /// `--output`, parsed; `None` = choose from the worker (§1.4).
    pub output: Option<ExplicitOutput>,
    /// `--platform` values (deduplicated, canonical: `linux/arm64`), in the order given;
    /// empty = the worker's platform. Several build a multi-platform image (an index).
    pub platforms: Vec<Platform>,
    /// Entitlements (`--network=host` adds `network.host` and `security.insecure`).
    pub entitlements: Vec<String>,
    /// `--cache-from`, normalized to `(type, attrs)`.
    pub cache_imports: Vec<CacheEntry>,
    /// `--cache-to`, normalized to `(type, attrs)` (`mode=min` made explicit).
    pub cache_exports: Vec<CacheEntry>,
    /// `--iidfile`.
    pub iidfile: Option<PathBuf>,
    /// `--metadata-file`.
    pub metadata_file: Option<PathBuf>,
    /// `--source-policy-file` (or `EXPERIMENTAL_BUILDKIT_SOURCE_POLICY`), parsed.
    pub source_policy: Option<kiln_proto::moby::buildkit::v1::sourcepolicy::Policy>,
    /// Directories of `--build-context name=DIR`, served in the session under `name`.
    pub named_locals: BTreeMap<String, PathBuf>,
    /// Warnings to print on stderr.
    pub warnings: Vec<String>,
    /// `--secret`, by id.
    pub secrets: BTreeMap<String, kiln_client::SecretSource>,
    /// `--ssh`: agent sockets by id.
    pub ssh_agents: BTreeMap<String, PathBuf>,
}

/// A cache import or export: `(type, attrs)`.
pub type CacheEntry = (String, BTreeMap<String, String>);

/// Where an explicit `--output` goes once the daemon has exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputDest {
    /// Nothing on the client (`type=image`: the daemon stores or pushes it).
    Daemon,
    /// `type=docker|oci` without `dest=`: the tar is loaded into containerd (nerdctl's needsLoading).
    Load,
    /// `dest=-` (or a `tar` exporter without `dest`): the tar goes to stdout.
    Stdout,
    /// `dest=<file>` of a tarball exporter.
    File(PathBuf),
    /// `dest=<dir>` of the `local` exporter.
    Directory(PathBuf),
}

/// A parsed `--output` (buildctl's CSV rules, reference §1.4 and §5.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplicitOutput {
    /// Exporter type (`image`, `docker`, `oci`, `local`, `tar`, ...).
    pub kind: String,
    /// Exporter attributes, keys lower-cased, without `type` and `dest`.
    pub attrs: BTreeMap<String, String>,
    /// Where the client puts the result.
    pub dest: OutputDest,
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

/// A switch-like environment variable: set to anything but empty, `0` or `false`.
fn env_flag(value: Option<String>) -> bool {
    value.is_some_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
}

/// `--build-context name=value` (§1.7): the frontend attrs `context:<name>` and the local
/// directories to serve. Remote sources (`docker-image://`, `http(s)://`, `target:`) pass
/// through to the frontend as nerdctl passes them; a directory is served as local `name`;
/// `oci-layout://` needs a client-side content store kiln does not serve yet and is refused.
pub fn resolve_build_contexts(
    values: &[String],
) -> anyhow::Result<(BTreeMap<String, String>, BTreeMap<String, PathBuf>)> {
    let mut attrs = BTreeMap::new();
    let mut locals = BTreeMap::new();
    for value in values {
        let Some((name, source)) = value.split_once('=') else {
            bail!("invalid context value: {value}, expected key=value");
        };
        locals.remove(name);
        let remote = ["https://", "http://", "docker-image://", "target:"];
        if remote.iter().any(|prefix| source.starts_with(prefix)) {
            attrs.insert(format!("context:{name}"), source.to_string());
        } else if source.starts_with("oci-layout://") {
            bail!("kiln build: --build-context {name}={source}: oci-layout contexts are not supported yet");
        } else {
            let dir = std::path::absolute(source)
                .with_context(|| format!("invalid build context {name}={source}"))?;
            if !dir.is_dir() {
                bail!(
                    "kiln build: --build-context {name}={source}: {} is not a directory",
                    dir.display()
                );
            }
            attrs.insert(format!("context:{name}"), format!("local:{name}"));
            locals.insert(name.to_string(), dir);
        }
    }
    Ok((attrs, locals))
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
        // BUILDKIT_INLINE_CACHE=1 travels as a build arg; kilnd (like
        // buildkitd) turns it into an inline cache export.
        if key == "BUILDKIT_INLINE_CACHE" && parse_go_bool(&value).is_none() {
            tracing::warn!(value, "invalid BUILDKIT_INLINE_CACHE value");
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
        "tty" => Ok(ProgressMode::Tty),
        "rawjson" => Ok(ProgressMode::RawJson),
        other => {
            bail!("invalid progress mode {other:?} (expected auto, plain, tty, rawjson or quiet)")
        }
    }
}

/// Splits buildctl's CSV `k=v,k=v` (keys lower-cased; a field without `=`
/// is an error naming `what`).
fn parse_csv(value: &str, what: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut fields = Vec::new();
    for field in value.split(',').filter(|f| !f.is_empty()) {
        let Some((key, val)) = field.split_once('=') else {
            bail!("invalid value {field:?} in {what} {value:?}: expected key=value");
        };
        fields.push((key.trim().to_lowercase(), val.to_string()));
    }
    Ok(fields)
}

/// `-o/--output` (§1.4): a value without `type=` is `type=local,dest=<value>`;
/// otherwise buildctl's CSV: `type` required, `output=` rejected, `dest`
/// handled here. Tarball exporters (`docker`, `oci`) without `dest` are
/// loaded into containerd (nerdctl); `dest=-` means stdout.
pub fn parse_output(value: &str) -> anyhow::Result<ExplicitOutput> {
    if !value.contains("type=") {
        return Ok(ExplicitOutput {
            kind: "local".to_string(),
            attrs: BTreeMap::new(),
            dest: OutputDest::Directory(PathBuf::from(value)),
        });
    }
    let mut kind = None;
    let mut dest = None;
    let mut attrs = BTreeMap::new();
    for (key, val) in parse_csv(value, "--output")? {
        match key.as_str() {
            "type" => kind = Some(val),
            "dest" => dest = Some(val),
            "output" => bail!("output= is not supported for --output, use dest= instead"),
            _ => {
                attrs.insert(key, val);
            }
        }
    }
    let kind = kind
        .filter(|k| !k.is_empty())
        .ok_or_else(|| anyhow!("type is required for --output {value:?}"))?;
    let dest = match (kind.as_str(), dest.as_deref()) {
        ("image", None) => OutputDest::Daemon,
        ("image", Some(_)) => bail!("dest= is not supported by the image exporter"),
        ("local", Some(dir)) if !dir.is_empty() && dir != "-" => {
            OutputDest::Directory(PathBuf::from(dir))
        }
        ("local", _) => bail!("output directory is required for the local exporter (dest=<dir>)"),
        ("docker" | "oci", None) => OutputDest::Load,
        (_, None | Some("-")) => OutputDest::Stdout,
        (_, Some("")) => bail!("empty dest= in --output {value:?}"),
        (_, Some(file)) => OutputDest::File(PathBuf::from(file)),
    };
    Ok(ExplicitOutput { kind, attrs, dest })
}

/// `--platform` (commas already split): each parsed and made canonical (`linux/aarch64` →
/// `linux/arm64`), duplicates dropped, order kept.
pub fn resolve_platforms(platforms: &[String]) -> anyhow::Result<Vec<Platform>> {
    let mut out: Vec<Platform> = Vec::new();
    for text in platforms.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let platform = Platform::parse(text)
            .map(|p| p.canonical())
            .ok_or_else(|| anyhow!("invalid platform {text:?} (expected os/arch[/variant])"))?;
        if !out.contains(&platform) {
            out.push(platform);
        }
    }
    Ok(out)
}

/// The frontend attribute and entitlements of a `--network` mode.
pub type NetworkAttrs = (Option<(String, String)>, Vec<String>);

/// `--network` (§1.2): `none` → `force-network-mode=none`; `host` →
/// `force-network-mode=host` plus the `network.host` and `security.insecure`
/// entitlements (as nerdctl); `default`/empty → nothing. nerdctl ignores
/// other values silently; kiln refuses them.
pub fn resolve_network(network: Option<&str>) -> anyhow::Result<NetworkAttrs> {
    match network.unwrap_or("") {
        "" | "default" => Ok((None, Vec::new())),
        "none" => Ok((
            Some(("force-network-mode".to_string(), "none".to_string())),
            Vec::new(),
        )),
        "host" => Ok((
            Some(("force-network-mode".to_string(), "host".to_string())),
            vec!["network.host".to_string(), "security.insecure".to_string()],
        )),
        other => bail!("invalid network mode {other:?} (expected default, none or host)"),
    }
}

/// `--add-host host:ip` (also `host=ip`) → the `add-hosts` attribute
/// `h1=ip1,h2=ip2`. The IP must parse; `host-gateway` needs
/// `--host-gateway-ip`, which kiln does not have yet.
pub fn resolve_add_hosts(hosts: &[String]) -> anyhow::Result<Option<String>> {
    let mut out = Vec::new();
    for entry in dedupe(hosts) {
        // `host=ip` first: an IPv6 address contains `:` but never `=`.
        let (host, ip) = entry
            .split_once('=')
            .or_else(|| entry.split_once(':'))
            .ok_or_else(|| anyhow!("bad format for add-host: {entry:?}"))?;
        if host.is_empty() {
            bail!("bad format for add-host: {entry:?}");
        }
        if ip == "host-gateway" {
            bail!("kiln build: --add-host {host}:host-gateway (needs --host-gateway-ip) is not supported yet");
        }
        let bare = ip.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<std::net::IpAddr>().is_err() {
            bail!("invalid IP address in add-host: {ip:?}");
        }
        out.push(format!("{host}={bare}"));
    }
    Ok((!out.is_empty()).then(|| out.join(",")))
}

/// `--cache-from`/`--cache-to` (§1.2): a value without `type=` means
/// `type=registry,ref=<value>`; the rest is buildctl's CSV.
pub fn normalize_cache(value: &str) -> anyhow::Result<CacheEntry> {
    let normalized = if value.contains("type=") {
        value.to_string()
    } else {
        format!("type=registry,ref={value}")
    };
    let mut kind = None;
    let mut attrs = BTreeMap::new();
    for (key, val) in parse_csv(&normalized, "cache option")? {
        if key == "type" {
            kind = Some(val);
        } else {
            attrs.insert(key, val);
        }
    }
    let kind = kind
        .filter(|k| !k.is_empty())
        .ok_or_else(|| anyhow!("type is required for cache option {value:?}"))?;
    Ok((kind, attrs))
}

/// Refuses cache backends kiln does not implement (rather than letting a
/// build pass without the cache the user asked for) and `local` without its
/// directory attr (`src` for imports, `dest` for exports).
fn check_cache_entry(
    kind: &str,
    attrs: &BTreeMap<String, String>,
    dir_attr: &str,
    flag: &str,
) -> anyhow::Result<()> {
    match kind {
        "registry" => {
            if attrs.get("ref").is_none_or(|r| r.is_empty()) {
                bail!("kiln build: {flag} type=registry needs ref=<image reference>");
            }
            Ok(())
        }
        "local" => {
            if attrs.get(dir_attr).is_none_or(|d| d.is_empty()) {
                bail!("kiln build: {flag} type=local needs {dir_attr}=<directory>");
            }
            Ok(())
        }
        "inline" if flag == "--cache-to" => Ok(()),
        "inline" => bail!(
            "kiln build: {flag} type=inline does not exist; read an inline cache with {flag} <image>"
        ),
        other => bail!("kiln build: cache type {other} ({flag}) is not supported yet"),
    }
}

/// `--attest`, `--sbom`, `--provenance` (§1.2) → `attest:<type>=<attrs>`
/// frontend attributes. `disabled=true` drops the entry.
pub fn resolve_attestations(
    attest: &[String],
    sbom: Option<&str>,
    provenance: Option<&str>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let shorthand = |kind: &str, value: &str| match parse_go_bool(value) {
        Some(enabled) => format!("type={kind},disabled={}", !enabled),
        None if value.is_empty() => format!("type={kind}"),
        None => format!("type={kind},{value}"),
    };
    let mut specs = dedupe(attest);
    if let Some(value) = sbom {
        specs.push(shorthand("sbom", value));
    }
    if let Some(value) = provenance {
        specs.push(shorthand("provenance", value));
    }
    let mut attrs = BTreeMap::new();
    for spec in specs {
        let fields = parse_csv(&spec, "--attest")?;
        let Some(kind) = fields
            .iter()
            .find(|(k, _)| k == "type")
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
        else {
            bail!("attestation type not specified");
        };
        let mut rest = Vec::new();
        let mut disabled = false;
        for (key, value) in fields.iter().filter(|(k, _)| k != "type") {
            if key == "disabled" {
                disabled = parse_go_bool(value).ok_or_else(|| {
                    anyhow!("invalid value for attribute \"disabled\": {value:?}")
                })?;
                if disabled {
                    break;
                }
            }
            rest.push(format!("{key}={value}"));
        }
        if !disabled {
            attrs.insert(format!("attest:{kind}"), rest.join(","));
        }
    }
    Ok(attrs)
}

/// `--label k=v` → `label:k` = `v` (deduplicated; last wins per key).
pub fn resolve_labels(labels: &[String]) -> BTreeMap<String, String> {
    dedupe(labels)
        .into_iter()
        .map(|label| match label.split_once('=') {
            Some((key, value)) => (format!("label:{key}"), value.to_string()),
            None => (format!("label:{label}"), String::new()),
        })
        .collect()
}

/// Resolves and validates every build flag.
pub fn resolve_build(args: &BuildArgs, env: Env<'_>) -> anyhow::Result<BuildSettings> {
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
    let platforms = resolve_platforms(&args.platform)?;
    if !platforms.is_empty() {
        let list: Vec<String> = platforms.iter().map(Platform::id).collect();
        frontend_attrs.insert("platform".to_string(), list.join(","));
    }
    let (context_attrs, named_locals) = resolve_build_contexts(&args.build_context)?;
    frontend_attrs.extend(context_attrs);
    frontend_attrs.extend(resolve_build_args(&args.build_arg, env)?);
    frontend_attrs.extend(resolve_labels(&args.label));
    let no_cache_stages: Vec<&str> = args
        .no_cache_filter
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|stage| !stage.is_empty())
        .collect();
    if args.no_cache == Some(true) {
        frontend_attrs.insert("no-cache".to_string(), String::new());
    } else if !no_cache_stages.is_empty() {
        // BuildKit's Dockerfile frontend: `no-cache=<stage>,…` ignores the cache for those
        // stages only.
        frontend_attrs.insert("no-cache".to_string(), no_cache_stages.join(","));
    }
    match args.pull {
        Some(true) => frontend_attrs.insert("image-resolve-mode".into(), "pull".into()),
        Some(false) => frontend_attrs.insert("image-resolve-mode".into(), "local".into()),
        None => None,
    };
    let (network_attr, mut entitlements) = resolve_network(args.network.as_deref())?;
    frontend_attrs.extend(network_attr);
    // `--allow` (deduped), as buildctl passes it: the daemon checks each
    // privileged step against both these and its own allowed set.
    for entitlement in &args.allow {
        match entitlement.as_str() {
            "network.host" | "security.insecure" | "device" => {}
            other => anyhow::bail!("invalid value {other:?} for --allow: expected network.host, security.insecure or device"),
        }
        if !entitlements.contains(entitlement) {
            entitlements.push(entitlement.clone());
        }
    }
    if let Some(hosts) = resolve_add_hosts(&args.add_host)? {
        frontend_attrs.insert("add-hosts".to_string(), hosts);
    }
    // kilnd attests provenance only; any other kind is refused here rather than sent (an
    // older kilnd would drop unknown attributes silently).
    let attestations = resolve_attestations(
        &args.attest,
        args.sbom.as_deref(),
        args.provenance.as_deref(),
    )?;
    for kind in attestations.keys() {
        match kind.trim_start_matches("attest:") {
            "provenance" => {}
            "sbom" => bail!(
                "kiln build: sbom attestations (--sbom, --attest type=sbom) are not supported: \
                 BuildKit generates them by running a scanner image (docker/buildkit-syft-scanner), \
                 which kiln does not run"
            ),
            other => bail!(
                "kiln build: {other} attestations are not supported (only type=provenance is)"
            ),
        }
    }
    frontend_attrs.extend(attestations);
    let cache_imports = dedupe(&args.cache_from)
        .iter()
        .map(|v| normalize_cache(v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (kind, attrs) in &cache_imports {
        check_cache_entry(kind, attrs, "src", "--cache-from")?;
    }
    let mut cache_exports: Vec<CacheEntry> = Vec::new();
    for value in dedupe(&args.cache_to) {
        let (kind, mut attrs) = normalize_cache(&value)?;
        check_cache_entry(&kind, &attrs, "dest", "--cache-to")?;
        // As buildctl: one export per type.
        if cache_exports.iter().any(|(k, _)| *k == kind) {
            bail!("duplicate cache exports");
        }
        attrs
            .entry("mode".to_string())
            .or_insert_with(|| "min".to_string());
        cache_exports.push((kind, attrs));
    }
    let output = args.output.as_deref().map(parse_output).transpose()?;
    let progress = resolve_progress(&args.progress, env)?;
    Ok(BuildSettings {
        context,
        file: args.file.clone(),
        tags,
        buildkit_host: args.buildkit_host.clone(),
        start_daemon: !args.no_start_daemon && !env_flag(env("KILN_NO_START_DAEMON")),
        progress,
        quiet: args.quiet,
        frontend_attrs,
        output,
        platforms,
        entitlements,
        cache_imports,
        cache_exports,
        iidfile: args.iidfile.as_ref().map(PathBuf::from),
        metadata_file: args.metadata_file.as_ref().map(PathBuf::from),
        named_locals,
        source_policy: crate::policy::load(args.source_policy_file.as_deref(), &env)?,
        warnings,
        secrets: crate::secrets::parse_secrets(&dedupe(&args.secret), env)?,
        ssh_agents: crate::secrets::parse_ssh(&dedupe(&args.ssh), env)?,
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
        cli.build_args().unwrap().clone()
    }

    fn resolve(argv: &[&str], env: &[(&str, &str)]) -> anyhow::Result<BuildSettings> {
        resolve_build(&args(argv), &env_of(env))
    }

    fn err(argv: &[&str]) -> String {
        format!("{:#}", resolve(argv, &[]).unwrap_err())
    }

    #[test]
    fn start_daemon_switch() {
        assert!(resolve(&["."], &[]).unwrap().start_daemon);
        assert!(
            !resolve(&["--no-start-daemon", "."], &[])
                .unwrap()
                .start_daemon
        );
        assert!(
            !resolve(&["."], &[("KILN_NO_START_DAEMON", "1")])
                .unwrap()
                .start_daemon
        );
        assert!(
            resolve(&["."], &[("KILN_NO_START_DAEMON", "0")])
                .unwrap()
                .start_daemon
        );
        assert!(
            resolve(&["."], &[("KILN_NO_START_DAEMON", "")])
                .unwrap()
                .start_daemon
        );
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
    fn inline_cache_build_arg_and_type_pass_to_the_daemon() {
        let env = env_of(&[]);
        let attrs = resolve_build_args(&["BUILDKIT_INLINE_CACHE=1".into()], &env).unwrap();
        assert_eq!(attrs["build-arg:BUILDKIT_INLINE_CACHE"], "1");
        let s = resolve(&["--cache-to", "type=inline", "."], &[]).unwrap();
        assert_eq!(s.cache_exports[0].0, "inline");
        assert!(err(&["--cache-from", "type=inline", "."]).contains("does not exist"));
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
            resolve(&["--progress=tty", "."], &[]).unwrap().progress,
            ProgressMode::Tty
        );
        assert_eq!(
            resolve(&["--progress=rawjson", "."], &[]).unwrap().progress,
            ProgressMode::RawJson
        );
    }

    #[test]
    fn build_contexts_become_attrs_and_locals() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().display().to_string();
        let (attrs, locals) = resolve_build_contexts(&[
            format!("src={local}"),
            "base=docker-image://127.0.0.1:5000/busybox:latest".into(),
            "web=https://example.invalid/ctx.tar".into(),
        ])
        .unwrap();
        assert_eq!(attrs["context:src"], "local:src");
        assert_eq!(locals["src"], dir.path());
        assert_eq!(
            attrs["context:base"],
            "docker-image://127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(attrs["context:web"], "https://example.invalid/ctx.tar");
        assert_eq!(locals.len(), 1);
        // The last value of a name wins, as nerdctl's map.
        let (attrs, locals) = resolve_build_contexts(&[
            format!("src={local}"),
            "src=docker-image://127.0.0.1:5000/x".into(),
        ])
        .unwrap();
        assert_eq!(attrs["context:src"], "docker-image://127.0.0.1:5000/x");
        assert!(locals.is_empty());
        assert_eq!(
            resolve_build_contexts(&["src".into()])
                .unwrap_err()
                .to_string(),
            "invalid context value: src, expected key=value"
        );
    }

    #[test]
    fn network_and_allow_flags() {
        assert!(resolve(&["--network=default", "."], &[]).is_ok());
        let allowed = resolve(
            &[
                "--allow",
                "security.insecure",
                "--allow",
                "security.insecure",
                ".",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(allowed.entitlements, vec!["security.insecure"]);
        assert!(resolve(&["--allow", "root", "."], &[]).is_err());
    }

    #[test]
    fn output_forms() {
        let o = parse_output("out").unwrap();
        assert_eq!(o.kind, "local");
        assert_eq!(o.dest, OutputDest::Directory("out".into()));
        let o = parse_output("type=docker").unwrap();
        assert_eq!((o.kind.as_str(), &o.dest), ("docker", &OutputDest::Load));
        let o = parse_output("type=oci,dest=-").unwrap();
        assert_eq!(o.dest, OutputDest::Stdout);
        let o = parse_output("type=docker,Dest=x.tar,compression=zstd").unwrap();
        assert_eq!(o.dest, OutputDest::File("x.tar".into()));
        assert_eq!(o.attrs["compression"], "zstd");
        assert!(!o.attrs.contains_key("dest"));
        let o = parse_output("type=image,name=a,push=true").unwrap();
        assert_eq!(o.dest, OutputDest::Daemon);
        assert_eq!(o.attrs["push"], "true");
        let o = parse_output("type=tar").unwrap();
        assert_eq!(o.dest, OutputDest::Stdout);
        let o = parse_output("type=local,dest=d").unwrap();
        assert_eq!(o.dest, OutputDest::Directory("d".into()));
        assert!(parse_output("type=local").is_err());
        assert!(parse_output("type=,dest=x").is_err());
        assert!(parse_output("type=docker,output=x")
            .unwrap_err()
            .to_string()
            .starts_with("output= is not supported"));
        assert!(parse_output("type=docker,junk").is_err());
        assert!(parse_output("type=image,dest=x").is_err());
        let s = resolve(&["-o", "type=oci,dest=o.tar", "."], &[]).unwrap();
        assert_eq!(s.output.unwrap().kind, "oci");
    }

    #[test]
    fn attrs_from_flags() {
        let s = resolve(
            &[
                "--no-cache",
                "--pull",
                "--label",
                "a=1",
                "--label=b",
                "--network=none",
                "--add-host",
                "h1:10.0.0.1",
                "--add-host=h2=::1",
                "--platform",
                "linux/arm64",
                ".",
            ],
            &[],
        )
        .unwrap();
        let a = &s.frontend_attrs;
        assert_eq!(a["no-cache"], "");
        assert_eq!(a["image-resolve-mode"], "pull");
        assert_eq!(a["label:a"], "1");
        assert_eq!(a["label:b"], "");
        assert_eq!(a["force-network-mode"], "none");
        assert_eq!(a["add-hosts"], "h1=10.0.0.1,h2=::1");
        assert_eq!(a["platform"], "linux/arm64");
        assert_eq!(s.platforms[0].architecture, "arm64");
        assert!(s.entitlements.is_empty());

        let s = resolve(&["--no-cache=false", "--pull=false", "."], &[]).unwrap();
        assert!(!s.frontend_attrs.contains_key("no-cache"));
        assert_eq!(s.frontend_attrs["image-resolve-mode"], "local");
        let filter = [
            "--no-cache-filter",
            "build,test",
            "--no-cache-filter=lint",
            ".",
        ];
        let s = resolve(&filter, &[]).unwrap();
        assert_eq!(s.frontend_attrs["no-cache"], "build,test,lint");
        let s = resolve(&["--no-cache", "--no-cache-filter=build", "."], &[]).unwrap();
        assert_eq!(s.frontend_attrs["no-cache"], "");
        let s = resolve(&["."], &[]).unwrap();
        assert!(!s.frontend_attrs.contains_key("image-resolve-mode"));

        let s = resolve(&["--network=host", "."], &[]).unwrap();
        assert_eq!(s.frontend_attrs["force-network-mode"], "host");
        assert_eq!(s.entitlements, vec!["network.host", "security.insecure"]);
        assert!(err(&["--network=bridge", "."]).starts_with("invalid network mode"));
        assert!(err(&["--add-host", "h:notanip", "."]).starts_with("invalid IP address"));
        assert!(err(&["--add-host", "nohost", "."]).starts_with("bad format for add-host"));
        assert!(err(&["--add-host", "h:host-gateway", "."]).contains("not supported yet"));
        // Several platforms (comma lists and repeated flags) are one canonical, ordered list.
        let s = resolve(
            &[
                "--platform",
                "linux/arm64/v8,linux/amd64",
                "--platform=linux/aarch64",
                ".",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.frontend_attrs["platform"], "linux/arm64,linux/amd64");
        assert_eq!(s.platforms.len(), 2);
        assert!(err(&["--platform", "nonsense", "."]).starts_with("invalid platform"));
        // The same platform twice is one platform.
        let s = resolve(&["--platform", "linux/amd64,linux/amd64", "."], &[]).unwrap();
        assert_eq!(s.frontend_attrs["platform"], "linux/amd64");
    }

    #[test]
    fn cache_options() {
        assert_eq!(
            normalize_cache("127.0.0.1:5000/cache").unwrap(),
            (
                "registry".to_string(),
                [("ref".to_string(), "127.0.0.1:5000/cache".to_string())]
                    .into_iter()
                    .collect()
            )
        );
        let (kind, attrs) = normalize_cache("type=local,src=/c").unwrap();
        assert_eq!((kind.as_str(), attrs["src"].as_str()), ("local", "/c"));
        let s = resolve(&["--cache-from", "r/x", "--cache-from=r/x", "."], &[]).unwrap();
        assert_eq!(s.cache_imports.len(), 1);
        let s = resolve(
            &[
                "--cache-to",
                "r/x",
                "--cache-to=type=local,dest=/d,mode=max",
                ".",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.cache_exports.len(), 2);
        assert_eq!(s.cache_exports[0].0, "registry");
        assert_eq!(s.cache_exports[0].1["mode"], "min");
        assert_eq!(s.cache_exports[1].1["mode"], "max");
        assert_eq!(
            err(&[
                "--cache-to",
                "r/x",
                "--cache-to",
                "type=registry,ref=r/y",
                "."
            ]),
            "duplicate cache exports"
        );
        assert_eq!(
            err(&["--cache-to", "type=gha", "."]),
            "kiln build: cache type gha (--cache-to) is not supported yet"
        );
        assert_eq!(
            err(&["--cache-to", "type=local", "."]),
            "kiln build: --cache-to type=local needs dest=<directory>"
        );
        assert_eq!(
            err(&["--cache-from", "type=gha", "."]),
            "kiln build: cache type gha (--cache-from) is not supported yet"
        );
    }

    #[test]
    fn attestation_rules() {
        let attrs = resolve_attestations(
            &[
                "type=sbom,generator=g".into(),
                "type=provenance,disabled=true".into(),
            ],
            None,
            None,
        )
        .unwrap();
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs["attest:sbom"], "generator=g");
        let attrs = resolve_attestations(&[], Some("false"), Some("mode=max")).unwrap();
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs["attest:provenance"], "mode=max");
        let attrs = resolve_attestations(&[], None, Some("true")).unwrap();
        assert_eq!(attrs["attest:provenance"], "disabled=false");
        assert_eq!(
            resolve_attestations(&["generator=g".into()], None, None)
                .unwrap_err()
                .to_string(),
            "attestation type not specified"
        );
        assert!(
            resolve_attestations(&["type=sbom,disabled=maybe".into()], None, None)
                .unwrap_err()
                .to_string()
                .starts_with("invalid value for attribute \"disabled\"")
        );
        // SBOMs need a scanner image: refused client-side unless disabled.
        assert!(err(&["--sbom=true", "."]).contains("docker/buildkit-syft-scanner"));
        assert_eq!(
            err(&["--attest=type=spdx", "."]),
            "kiln build: spdx attestations are not supported (only type=provenance is)"
        );
        let s = resolve(&["--provenance=mode=max", "."], &[]).unwrap();
        assert_eq!(s.frontend_attrs["attest:provenance"], "mode=max");
        let s = resolve(&["--attest=type=provenance", "."], &[]).unwrap();
        assert_eq!(s.frontend_attrs["attest:provenance"], "");
        let s = resolve(&["--provenance=false", "."], &[]).unwrap();
        assert!(!s.frontend_attrs.contains_key("attest:provenance"));
        assert!(resolve(
            &[
                "--provenance=false",
                "--attest=type=sbom,disabled=true",
                "."
            ],
            &[]
        )
        .is_ok());
    }

    #[test]
    fn result_files_and_env() {
        let s = resolve(
            &["--iidfile", "i", "--metadata-file=m", "."],
            &[("SOURCE_DATE_EPOCH", "7")],
        )
        .unwrap();
        assert_eq!(s.iidfile.as_deref(), Some(std::path::Path::new("i")));
        assert_eq!(s.metadata_file.as_deref(), Some(std::path::Path::new("m")));
        assert_eq!(s.frontend_attrs["build-arg:SOURCE_DATE_EPOCH"], "7");
    }

    #[test]
    fn rm_false_warns() {
        let s = resolve(&["--rm=false", "."], &[]).unwrap();
        assert_eq!(s.warnings, vec!["ignoring deprecated flag: '--rm=false'"]);
        assert!(resolve(&["--rm", "."], &[]).unwrap().warnings.is_empty());
    }
}
