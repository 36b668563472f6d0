//! `kiln compose build [SERVICE...]` (reference §1.10): reads the compose
//! file's `build:` sections, turns each into `kiln build` flags, and builds
//! the selected services concurrently in this process (nerdctl runs one
//! `nerdctl build` child after another).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_yaml::Value;

use crate::build::{self, Globals};
use crate::cli::{BuildArgs, ComposeArgs, ComposeBuildArgs};
use crate::settings::{self, Env};

/// Default compose file names, in the order they are looked for.
pub const DEFAULT_FILES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
];

/// `build:` keys kiln understands; others are ignored with a warning.
const KNOWN_BUILD_KEYS: [&str; 12] = [
    "context",
    "dockerfile",
    "dockerfile_inline",
    "args",
    "target",
    "labels",
    "cache_from",
    "platform",
    "platforms",
    "secrets",
    "additional_contexts",
    "tags",
];

/// One service to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBuild {
    /// Service name.
    pub service: String,
    /// Image name (`image:`, or `<project>-<service>`).
    pub image: String,
    /// Build context directory (absolute).
    pub context: PathBuf,
    /// `-f`: the Dockerfile path, if not the context's default.
    pub dockerfile: Option<PathBuf>,
    /// `dockerfile_inline` text, written to a temporary file at build time.
    pub dockerfile_inline: Option<String>,
    /// `--build-arg` values (`K=V` or bare `K`), in file order.
    pub args: Vec<String>,
    /// `--target`.
    pub target: Option<String>,
    /// `--label k=v`.
    pub labels: Vec<String>,
    /// `--cache-from`.
    pub cache_from: Vec<String>,
    /// `--build-context name=value` (`additional_contexts`; relative directories resolved
    /// against the project directory).
    pub additional_contexts: Vec<String>,
    /// `--platform`.
    pub platform: Option<String>,
    /// `--secret` values from `build.secrets` and the top-level `secrets:`.
    pub secrets: Vec<String>,
    /// Services this one waits for (`depends_on`, list or map form): built first when they are
    /// selected too, so their images exist for this build's `FROM`.
    pub depends_on: Vec<String>,
    /// Warnings found while reading the section.
    pub warnings: Vec<String>,
}

/// compose's project-name normalization: lower-case, only `[a-z0-9_-]`,
/// no leading `_` or `-`.
pub fn normalize_project_name(name: &str) -> String {
    let lowered: String = name
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-')
        .collect();
    lowered.trim_start_matches(['_', '-']).to_string()
}

/// The compose file: `-f` (one), else the first default name present in `dir`.
pub fn find_file(files: &[String], dir: &Path) -> anyhow::Result<PathBuf> {
    match files {
        [] => DEFAULT_FILES
            .iter()
            .map(|name| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "no compose file found in {} (looked for {})",
                    dir.display(),
                    DEFAULT_FILES.join(", ")
                )
            }),
        [one] => Ok(dir.join(one)),
        _ => bail!("kiln compose: several -f files (merging) are not supported yet"),
    }
}

fn string_of(value: &Value, what: &str) -> anyhow::Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => bail!("{what}: expected a string, got {other:?}"),
    }
}

/// A compose "map or list" (`args`, `labels`): a map of `K: V` (a null value
/// gives a bare `K`) or a list of `K=V` strings.
fn map_or_list(value: &Value, what: &str) -> anyhow::Result<Vec<String>> {
    match value {
        Value::Mapping(map) => map
            .iter()
            .map(|(k, v)| {
                let key = string_of(k, what)?;
                Ok(match v {
                    Value::Null => key,
                    v => format!("{key}={}", string_of(v, what)?),
                })
            })
            .collect(),
        Value::Sequence(list) => list.iter().map(|v| string_of(v, what)).collect(),
        Value::Null => Ok(Vec::new()),
        other => bail!("{what}: expected a map or a list, got {other:?}"),
    }
}

/// Reads every service's build from compose YAML `text`, with `project_dir`
/// as the base of relative contexts and `project` the project name.
pub fn parse_services(
    text: &str,
    project_dir: &Path,
    project: &str,
) -> anyhow::Result<Vec<ServiceBuild>> {
    let doc: Value = serde_yaml::from_str(text).context("invalid compose file")?;
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .ok_or_else(|| anyhow!("the compose file has no services"))?;
    let mut out = Vec::new();
    for (name, service) in services {
        let name = string_of(name, "service name")?;
        let Some(build) = service.get("build") else {
            continue;
        };
        let what = |key: &str| format!("service {name:?}: build.{key}");
        let image = match service.get("image") {
            Some(image) => string_of(image, &format!("service {name:?}: image"))?,
            None => format!("{project}-{name}"),
        };
        let mut spec = ServiceBuild {
            service: name.clone(),
            image,
            context: project_dir.to_path_buf(),
            dockerfile: None,
            dockerfile_inline: None,
            args: Vec::new(),
            target: None,
            labels: Vec::new(),
            cache_from: Vec::new(),
            additional_contexts: Vec::new(),
            platform: service
                .get("platform")
                .map(|p| string_of(p, &format!("service {name:?}: platform")))
                .transpose()?,
            secrets: Vec::new(),
            depends_on: match service.get("depends_on") {
                // The map form's values (`condition`, `restart`) matter to `up`, not to builds.
                Some(Value::Mapping(map)) => map
                    .keys()
                    .map(|k| string_of(k, &format!("service {name:?}: depends_on")))
                    .collect::<anyhow::Result<_>>()?,
                Some(value) => map_or_list(value, &format!("service {name:?}: depends_on"))?,
                None => Vec::new(),
            },
            warnings: Vec::new(),
        };
        let context_text = match build {
            Value::String(context) => Some(context.clone()),
            Value::Mapping(map) => {
                let ignored: Vec<String> = map
                    .keys()
                    .filter_map(|k| k.as_str())
                    .filter(|k| !KNOWN_BUILD_KEYS.contains(k))
                    .map(str::to_string)
                    .collect();
                if !ignored.is_empty() {
                    spec.warnings.push(format!("Ignoring: build: {ignored:?}"));
                }
                if let Some(v) = build.get("additional_contexts") {
                    for entry in map_or_list(v, &what("additional_contexts"))? {
                        let Some((key, value)) = entry.split_once('=') else {
                            bail!("service {name:?}: build.additional_contexts: invalid entry {entry:?}, expected name=value");
                        };
                        let value = if value.contains("://") || value.starts_with("target:") {
                            value.to_string()
                        } else {
                            project_dir.join(value).display().to_string()
                        };
                        spec.additional_contexts.push(format!("{key}={value}"));
                    }
                }
                if map.contains_key("tags") {
                    bail!("service {name:?}: build.tags is not supported yet");
                }
                if let Some(v) = build.get("dockerfile") {
                    spec.dockerfile = Some(PathBuf::from(string_of(v, &what("dockerfile"))?));
                }
                if let Some(v) = build.get("dockerfile_inline") {
                    spec.dockerfile_inline = Some(string_of(v, &what("dockerfile_inline"))?);
                }
                if let Some(v) = build.get("args") {
                    spec.args = map_or_list(v, &what("args"))?;
                }
                if let Some(v) = build.get("labels") {
                    spec.labels = map_or_list(v, &what("labels"))?;
                }
                if let Some(v) = build.get("cache_from") {
                    spec.cache_from = map_or_list(v, &what("cache_from"))?;
                }
                if let Some(v) = build.get("target") {
                    spec.target = Some(string_of(v, &what("target"))?);
                }
                if let Some(v) = build.get("platform") {
                    spec.platform = Some(string_of(v, &what("platform"))?);
                }
                if let Some(v) = build.get("platforms") {
                    let list = map_or_list(v, &what("platforms"))?;
                    if !list.is_empty() {
                        spec.platform = Some(list.join(","));
                    }
                }
                build
                    .get("context")
                    .map(|v| string_of(v, &what("context")))
                    .transpose()?
            }
            other => bail!("service {name:?}: build: expected a string or a map, got {other:?}"),
        };
        if let Some(context) = context_text {
            if context.contains("://") {
                bail!("service {name:?}: build context {context:?} is not supported yet (only directories)");
            }
            spec.context = project_dir.join(context);
        }
        if let Some(list) = build.get("secrets") {
            spec.secrets = build_secrets(list, doc.get("secrets"), &spec.context, &name)?;
        }
        if let Some(file) = spec.dockerfile.take() {
            if file.is_absolute() {
                spec.warnings.push(format!(
                    "build.dockerfile {} is absolute: the compose file is not portable",
                    file.display()
                ));
            }
            spec.dockerfile = Some(spec.context.join(file));
        }
        out.push(spec);
    }
    Ok(out)
}

/// `build.secrets` of service `service` as `--secret` values (nerdctl's rules): each entry is
/// a name or `{source, target}`; the secret's id is the target when given, else the source;
/// the source names a top-level secret with `file:` (relative paths are resolved inside the
/// build context and cannot leave it) or `environment:` (a variable of kiln's environment).
fn build_secrets(
    list: &Value,
    top_level: Option<&Value>,
    context: &Path,
    service: &str,
) -> anyhow::Result<Vec<String>> {
    let what = format!("service {service:?}: build.secrets");
    let Value::Sequence(entries) = list else {
        bail!("{what}: expected a list, got {list:?}");
    };
    let mut out = Vec::new();
    for entry in entries {
        let (source, target) = match entry {
            Value::String(name) => (name.clone(), None),
            Value::Mapping(_) => (
                string_of(
                    entry
                        .get("source")
                        .ok_or_else(|| anyhow!("{what}: an entry has no source"))?,
                    &what,
                )?,
                entry
                    .get("target")
                    .map(|t| string_of(t, &what))
                    .transpose()?,
            ),
            other => bail!("{what}: expected a name or a map, got {other:?}"),
        };
        let defined = top_level
            .and_then(|t| t.get(source.as_str()))
            .ok_or_else(|| {
                anyhow!("{what}: secret {source:?} is not defined in the top-level secrets")
            })?;
        let id = target.unwrap_or_else(|| source.clone());
        if let Some(file) = defined.get("file") {
            let file = string_of(file, &format!("secrets.{source}.file"))?;
            out.push(format!(
                "id={id},src={}",
                join_inside(context, &file).display()
            ));
        } else if let Some(var) = defined.get("environment") {
            let var = string_of(var, &format!("secrets.{source}.environment"))?;
            out.push(format!("id={id},env={var}"));
        } else {
            bail!("secrets.{source}: only file: and environment: secrets are supported");
        }
    }
    Ok(out)
}

/// `path` joined to `base` without leaving it (securejoin's rule, lexically): `..` stops at
/// `base`, an absolute path is taken relative to `base`.
fn join_inside(base: &Path, path: &str) -> PathBuf {
    let mut inside = PathBuf::new();
    for part in Path::new(path).components() {
        match part {
            std::path::Component::Normal(p) => inside.push(p),
            std::path::Component::ParentDir => {
                inside.pop();
            }
            _ => {}
        }
    }
    base.join(inside)
}

/// `selected` with every service after the selected services it depends on (`depends_on`);
/// dependencies that are not selected are not waited for. A cycle is an error.
fn build_order<'a>(selected: &[&'a ServiceBuild]) -> anyhow::Result<Vec<&'a ServiceBuild>> {
    let mut order: Vec<&ServiceBuild> = Vec::new();
    let mut remaining: Vec<&ServiceBuild> = selected.to_vec();
    while !remaining.is_empty() {
        let ready = remaining.iter().position(|spec| {
            spec.depends_on.iter().all(|dep| {
                order.iter().any(|s| &s.service == dep)
                    || !selected.iter().any(|s| &s.service == dep)
            })
        });
        match ready {
            Some(index) => order.push(remaining.remove(index)),
            None => {
                let names: Vec<&str> = remaining.iter().map(|s| s.service.as_str()).collect();
                bail!("dependency cycle between services {names:?}");
            }
        }
    }
    Ok(order)
}

/// Picks the services to build: the named ones (each must exist and have
/// `build:`... those without are skipped, as nerdctl), else all.
pub fn select<'a>(
    all: &'a [ServiceBuild],
    names: &[String],
    known: &[String],
) -> anyhow::Result<Vec<&'a ServiceBuild>> {
    if names.is_empty() {
        return Ok(all.iter().collect());
    }
    let mut out = Vec::new();
    for name in names {
        if !known.contains(name) {
            bail!("no such service: {name}");
        }
        if let Some(spec) = all.iter().find(|s| &s.service == name) {
            out.push(spec);
        }
    }
    Ok(out)
}

/// The `kiln build` flags for one service, in nerdctl's order: CLI values
/// first, so that the compose file's args win for the same key.
pub fn build_args(
    spec: &ServiceBuild,
    cli: &ComposeBuildArgs,
    inline_file: Option<&Path>,
) -> BuildArgs {
    let mut args = BuildArgs {
        context: vec![spec.context.display().to_string()],
        buildkit_host: cli.buildkit_host.clone(),
        tag: vec![spec.image.clone()],
        progress: if cli.progress.is_empty() {
            "auto".to_string()
        } else {
            cli.progress.clone()
        },
        ..Default::default()
    };
    args.platform = spec
        .platform
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::to_string)
        .collect();
    args.build_arg = cli.build_arg.clone();
    args.build_arg.extend(spec.args.iter().cloned());
    if cli.no_cache {
        args.no_cache = Some(true);
    }
    args.file = match inline_file {
        Some(path) => Some(path.display().to_string()),
        None => spec.dockerfile.as_ref().map(|p| p.display().to_string()),
    };
    args.cache_from = spec.cache_from.clone();
    args.build_context = spec.additional_contexts.clone();
    args.target = spec.target.clone();
    args.label = spec.labels.clone();
    args.secret = spec.secrets.clone();
    args
}

/// `kiln compose [-f FILE] [-p NAME] build [SERVICE...]`.
pub async fn build(
    globals: &Globals,
    compose: &ComposeArgs,
    cli: &ComposeBuildArgs,
    env: Env<'_>,
) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("failed to read the working directory")?;
    let file = find_file(&compose.file, &cwd)?;
    let file = std::path::absolute(&file).unwrap_or(file);
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("failed to read {}", file.display()))?;
    let project_dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cwd.clone());
    let project = match compose
        .project_name
        .clone()
        .or_else(|| env("COMPOSE_PROJECT_NAME").filter(|n| !n.is_empty()))
    {
        Some(name) => normalize_project_name(&name),
        None => normalize_project_name(
            &project_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    };
    if project.is_empty() {
        bail!("project name must not be empty (use -p)");
    }
    let all = parse_services(&text, &project_dir, &project)
        .with_context(|| format!("failed to load {}", file.display()))?;
    let doc: Value = serde_yaml::from_str(&text).context("invalid compose file")?;
    let known: Vec<String> = doc
        .get("services")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let selected = select(&all, &cli.services, &known)?;

    let scratch = tempfile::Builder::new()
        .prefix("kiln-compose-")
        .tempdir()
        .context("failed to create a temporary directory")?;
    // Each build waits for the selected services it depends on; the others run at once.
    let order = build_order(&selected)?;
    let mut done: std::collections::HashMap<String, tokio::sync::watch::Receiver<Option<bool>>> =
        std::collections::HashMap::new();
    let mut tasks = Vec::new();
    for spec in order {
        for warning in &spec.warnings {
            eprintln!("warning: service {}: {warning}", spec.service);
        }
        let inline = match &spec.dockerfile_inline {
            Some(text) => {
                let path = scratch
                    .path()
                    .join(format!("inline-dockerfile-{}.Dockerfile", spec.service));
                std::fs::write(&path, text)
                    .with_context(|| format!("failed to write {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let args = build_args(spec, cli, inline.as_deref());
        let image = spec.image.clone();
        let settings = match settings::resolve_build(&args, env) {
            Ok(settings) => settings,
            Err(err) => bail!("error while building image {image}: {err:#}"),
        };
        let globals = globals.clone();
        let waits: Vec<(String, tokio::sync::watch::Receiver<Option<bool>>)> = spec
            .depends_on
            .iter()
            .filter_map(|dep| done.get(dep).map(|rx| (dep.clone(), rx.clone())))
            .collect();
        let (finished, receiver) = tokio::sync::watch::channel(None);
        done.insert(spec.service.clone(), receiver);
        tasks.push((
            image,
            tokio::spawn(async move {
                for (dep, mut rx) in waits {
                    let ok = match rx.wait_for(Option::is_some).await {
                        Ok(state) => *state == Some(true),
                        Err(_) => false,
                    };
                    if !ok {
                        let _ = finished.send(Some(false));
                        bail!("service {dep:?}, which it depends on, failed to build");
                    }
                }
                let result = build::run(&globals, settings).await;
                let _ = finished.send(Some(result.is_ok()));
                result
            }),
        ));
    }
    let mut failures = Vec::new();
    for (image, task) in tasks {
        let result = match task.await {
            Ok(result) => result,
            Err(join) => Err(anyhow!("build task failed: {join}")),
        };
        if let Err(err) = result {
            failures.push(format!("error while building image {image}: {err:#}"));
        }
    }
    drop(scratch);
    match failures.len() {
        0 => Ok(()),
        _ => bail!("{}", failures.join("\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
services:
  web:
    build: ./web
  api:
    image: 127.0.0.1:5000/api:1
    platform: linux/amd64
    build:
      context: api
      dockerfile: Containerfile.dev
      args:
        A: "1"
        B:
      labels:
        - org.example=x
      target: prod
      cache_from: [127.0.0.1:5000/cache]
      network: host
  inline:
    build:
      dockerfile_inline: |
        FROM scratch
  db:
    image: 127.0.0.1:5000/db:1
"#;

    #[test]
    fn project_names_are_normalized() {
        assert_eq!(normalize_project_name("My_App.v2"), "my_appv2");
        assert_eq!(normalize_project_name("-_x"), "x");
    }

    #[test]
    fn build_sections_in_both_forms() {
        let dir = Path::new("/p");
        let services = parse_services(FILE, dir, "proj").unwrap();
        assert_eq!(services.len(), 3, "db has no build section");
        let web = services.iter().find(|s| s.service == "web").unwrap();
        assert_eq!(web.image, "proj-web");
        assert_eq!(web.context, Path::new("/p/./web"));
        assert_eq!(web.dockerfile, None);
        let api = services.iter().find(|s| s.service == "api").unwrap();
        assert_eq!(api.image, "127.0.0.1:5000/api:1");
        assert_eq!(api.context, Path::new("/p/api"));
        assert_eq!(
            api.dockerfile.as_deref(),
            Some(Path::new("/p/api/Containerfile.dev"))
        );
        assert_eq!(api.args, vec!["A=1", "B"]);
        assert_eq!(api.labels, vec!["org.example=x"]);
        assert_eq!(api.target.as_deref(), Some("prod"));
        assert_eq!(api.cache_from, vec!["127.0.0.1:5000/cache"]);
        assert_eq!(api.platform.as_deref(), Some("linux/amd64"));
        assert_eq!(api.warnings, vec!["Ignoring: build: [\"network\"]"]);
        let inline = services.iter().find(|s| s.service == "inline").unwrap();
        assert_eq!(inline.dockerfile_inline.as_deref(), Some("FROM scratch\n"));
    }

    #[test]
    fn build_secrets_become_secret_flags() {
        let text = "services:\n  a:\n    build:\n      context: app\n      secrets:\n        - token\n        - source: npm\n          target: npmrc\n        - source: escape\n\
                    secrets:\n  token:\n    file: ./token.txt\n  npm:\n    environment: NPM_TOKEN\n  escape:\n    file: ../../etc/x\n";
        let services = parse_services(text, Path::new("/p"), "p").unwrap();
        assert_eq!(
            services[0].secrets,
            vec![
                "id=token,src=/p/app/token.txt",
                "id=npmrc,env=NPM_TOKEN",
                "id=escape,src=/p/app/etc/x",
            ]
        );
        let args = build_args(&services[0], &ComposeBuildArgs::default(), None);
        assert_eq!(args.secret, services[0].secrets);
        let undefined = "services:\n  a:\n    build:\n      context: .\n      secrets: [s]\n";
        let err = parse_services(undefined, Path::new("/p"), "p").unwrap_err();
        assert!(
            err.to_string().contains("secret \"s\" is not defined"),
            "{err}"
        );
    }

    #[test]
    fn additional_contexts_become_build_contexts() {
        let extra = "services:\n  a:\n    build:\n      additional_contexts:\n        x: ../x\n        y: docker-image://127.0.0.1:5000/y\n";
        let specs = parse_services(extra, Path::new("/p"), "p").unwrap();
        assert_eq!(
            specs[0].additional_contexts,
            vec!["x=/p/../x", "y=docker-image://127.0.0.1:5000/y"]
        );
    }

    #[test]
    fn dependencies_come_first_and_cycles_fail() {
        let text = "services:\n  c:\n    build: ./c\n    depends_on: [a]\n  a:\n    build: ./a\n  b:\n    build: ./b\n    depends_on:\n      c:\n        condition: service_started\n";
        let all = parse_services(text, Path::new("/p"), "p").unwrap();
        let selected: Vec<&ServiceBuild> = all.iter().collect();
        let order: Vec<&str> = build_order(&selected)
            .unwrap()
            .iter()
            .map(|s| s.service.as_str())
            .collect();
        let position = |name: &str| order.iter().position(|s| *s == name).unwrap();
        assert!(position("a") < position("c"), "{order:?}");
        assert!(position("c") < position("b"), "{order:?}");
        let cycle = "services:\n  a:\n    build: ./a\n    depends_on: [b]\n  b:\n    build: ./b\n    depends_on: [a]\n";
        let all = parse_services(cycle, Path::new("/p"), "p").unwrap();
        let selected: Vec<&ServiceBuild> = all.iter().collect();
        assert!(build_order(&selected)
            .unwrap_err()
            .to_string()
            .contains("dependency cycle"));
    }

    #[test]
    fn unsupported_keys_fail() {
        let git = "services:\n  a:\n    build: https://example.invalid/r.git\n";
        assert!(parse_services(git, Path::new("/p"), "p").is_err());
    }

    #[test]
    fn selection_and_flags() {
        let services = parse_services(FILE, Path::new("/p"), "proj").unwrap();
        let known: Vec<String> = ["web", "api", "inline", "db"].map(String::from).to_vec();
        assert_eq!(select(&services, &[], &known).unwrap().len(), 3);
        let only = select(&services, &["api".into(), "db".into()], &known).unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(
            select(&services, &["nope".into()], &known)
                .unwrap_err()
                .to_string(),
            "no such service: nope"
        );

        let cli = ComposeBuildArgs {
            build_arg: vec!["A=cli".into(), "C=3".into()],
            no_cache: true,
            progress: "plain".into(),
            ..Default::default()
        };
        let api = services.iter().find(|s| s.service == "api").unwrap();
        let args = build_args(api, &cli, None);
        assert_eq!(args.tag, vec!["127.0.0.1:5000/api:1"]);
        assert_eq!(args.build_arg, vec!["A=cli", "C=3", "A=1", "B"]);
        assert_eq!(args.no_cache, Some(true));
        assert_eq!(args.progress, "plain");
        assert_eq!(args.platform, vec!["linux/amd64"]);
        assert_eq!(args.file.as_deref(), Some("/p/api/Containerfile.dev"));
        // The compose file's value wins over the CLI's for the same key.
        let env = |_: &str| None;
        let settings = crate::settings::resolve_build(&args, &env).unwrap();
        assert_eq!(settings.frontend_attrs["build-arg:A"], "1");
        assert_eq!(settings.frontend_attrs["build-arg:C"], "3");
        assert_eq!(settings.frontend_attrs["label:org.example"], "x");
        assert_eq!(settings.cache_imports[0].1["ref"], "127.0.0.1:5000/cache");

        let inline = services.iter().find(|s| s.service == "inline").unwrap();
        let args = build_args(
            inline,
            &ComposeBuildArgs::default(),
            Some(Path::new("/t/f")),
        );
        assert_eq!(args.file.as_deref(), Some("/t/f"));
        assert_eq!(args.progress, "auto");
    }

    #[test]
    fn default_file_order() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_file(&[], dir.path()).is_err());
        std::fs::write(dir.path().join("docker-compose.yml"), "").unwrap();
        assert_eq!(
            find_file(&[], dir.path()).unwrap(),
            dir.path().join("docker-compose.yml")
        );
        std::fs::write(dir.path().join("compose.yaml"), "").unwrap();
        assert_eq!(
            find_file(&[], dir.path()).unwrap(),
            dir.path().join("compose.yaml")
        );
        assert_eq!(
            find_file(&["x.yml".into()], dir.path()).unwrap(),
            dir.path().join("x.yml")
        );
    }
}
