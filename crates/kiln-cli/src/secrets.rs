//! `--secret` and `--ssh`: what the build's session serves to `RUN --mount=type=secret|ssh`.
//!
//! The syntax is buildctl's (nerdctl passes both flags through verbatim):
//! - `--secret id=<id>[,type=file|env][,src|source=<path>][,env=<VAR>]`. Without `src` and
//!   `env`, the id names an environment variable when one is set, else a file. `type=env`
//!   with `src=` means the variable `src`.
//! - `--ssh default|<id>[=<socket>]`: without a path the agent is `$SSH_AUTH_SOCK`. Key files
//!   (buildctl's `<id>=<key>[,<key>]`) are not supported yet: only agent sockets are forwarded.
//!
//! Parsing is pure (the environment comes in as a lookup); [`check_sources`] then checks
//! that files and sockets exist so a typo fails before the build starts, not in its middle.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use anyhow::{bail, Context};
use kiln_client::SecretSource;

use crate::settings::Env;

/// Parses every `--secret` (deduplicated; a later id replaces an earlier one).
pub fn parse_secrets(
    values: &[String],
    env: Env<'_>,
) -> anyhow::Result<BTreeMap<String, SecretSource>> {
    let mut secrets = BTreeMap::new();
    for value in values {
        let (id, source) = parse_secret(value, env)?;
        secrets.insert(id, source);
    }
    Ok(secrets)
}

/// Parses one `--secret` value (buildctl's `parseSecret` and `NewStore` rules).
pub fn parse_secret(value: &str, env: Env<'_>) -> anyhow::Result<(String, SecretSource)> {
    let mut kind = "file".to_string();
    let (mut id, mut src, mut var) = (None::<String>, None::<String>, None::<String>);
    for field in value.split(',').filter(|f| !f.is_empty()) {
        let Some((key, val)) = field.split_once('=') else {
            bail!("invalid --secret {value:?}: field '{field}' must be a key=value pair");
        };
        match key.to_ascii_lowercase().as_str() {
            "type" => {
                if val != "file" && val != "env" {
                    bail!("invalid --secret {value:?}: unsupported secret type {val:?}");
                }
                kind = val.to_string();
            }
            "id" => id = Some(val.to_string()),
            "source" | "src" => src = Some(val.to_string()),
            "env" => var = Some(val.to_string()),
            other => bail!("invalid --secret {value:?}: unexpected key '{other}' in '{field}'"),
        }
    }
    if kind == "env" && var.is_none() {
        var = src.take();
    }
    let Some(id) = id.filter(|i| !i.is_empty()) else {
        bail!("invalid --secret {value:?}: secret missing id");
    };
    let source = match (src, var) {
        (_, Some(var)) => SecretSource::Env(var),
        (Some(path), None) => SecretSource::File(PathBuf::from(path)),
        (None, None) if env(&id).is_some() => SecretSource::Env(id.clone()),
        (None, None) => SecretSource::File(PathBuf::from(&id)),
    };
    Ok((id, source))
}

/// Parses every `--ssh` into agent sockets by id.
pub fn parse_ssh(values: &[String], env: Env<'_>) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut agents = BTreeMap::new();
    for value in values {
        let (id, paths) = match value.split_once('=') {
            Some((id, paths)) => (id, paths),
            None => (value.as_str(), ""),
        };
        if id.is_empty() {
            bail!("invalid --ssh {value:?}: missing id");
        }
        let paths: Vec<&str> = paths.split(',').filter(|p| !p.is_empty()).collect();
        let socket = match paths.as_slice() {
            [] => match env("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
                Some(sock) => PathBuf::from(sock),
                None => bail!(
                    "invalid --ssh {value:?}: no agent socket given and SSH_AUTH_SOCK is not set \
                     (start ssh-agent, or give --ssh {id}=<socket>)"
                ),
            },
            [one] => PathBuf::from(one),
            _ => bail!(
                "kiln build: --ssh {value:?}: key files are not supported yet (give one agent socket)"
            ),
        };
        agents.insert(id.to_string(), socket);
    }
    Ok(agents)
}

/// Checks that secret files and agent sockets exist, as buildctl does before it builds.
pub fn check_sources(
    secrets: &BTreeMap<String, SecretSource>,
    agents: &BTreeMap<String, PathBuf>,
) -> anyhow::Result<()> {
    for (id, source) in secrets {
        if let SecretSource::File(path) = source {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("--secret id={id}: failed to stat {}", path.display()))?;
            if meta.len() > kiln_client::MAX_SECRET_SIZE {
                bail!(
                    "--secret id={id}: {} is too big ({} bytes, at most {})",
                    path.display(),
                    meta.len(),
                    kiln_client::MAX_SECRET_SIZE
                );
            }
        }
    }
    for (id, socket) in agents {
        let meta = std::fs::metadata(socket).with_context(|| {
            format!(
                "--ssh {id}: failed to stat agent socket {}",
                socket.display()
            )
        })?;
        if !meta.file_type().is_socket() {
            bail!(
                "kiln build: --ssh {id}={}: not a socket; key files are not supported yet (give an ssh-agent socket)",
                socket.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn secret_forms() {
        let env = env_with(&[("TOKEN", "t")]);
        let parse = |v: &str| parse_secret(v, &env);
        assert_eq!(
            parse("id=a,src=/f").unwrap(),
            ("a".into(), SecretSource::File("/f".into()))
        );
        assert_eq!(
            parse("id=a,source=/f").unwrap(),
            ("a".into(), SecretSource::File("/f".into()))
        );
        assert_eq!(
            parse("id=a,env=VAR").unwrap(),
            ("a".into(), SecretSource::Env("VAR".into()))
        );
        assert_eq!(
            parse("type=env,id=a,src=VAR").unwrap(),
            ("a".into(), SecretSource::Env("VAR".into()))
        );
        // A bare id: the variable of that name when set, else the file of that name.
        assert_eq!(
            parse("id=TOKEN").unwrap(),
            ("TOKEN".into(), SecretSource::Env("TOKEN".into()))
        );
        assert_eq!(
            parse("id=token.txt").unwrap(),
            ("token.txt".into(), SecretSource::File("token.txt".into()))
        );
        assert!(parse("src=/f")
            .unwrap_err()
            .to_string()
            .contains("missing id"));
        assert!(parse("id=a,type=ssh")
            .unwrap_err()
            .to_string()
            .contains("unsupported secret type"));
        assert!(parse("id=a,bogus=1")
            .unwrap_err()
            .to_string()
            .contains("unexpected key 'bogus'"));
        assert!(parse("id=a,novalue")
            .unwrap_err()
            .to_string()
            .contains("key=value"));
    }

    #[test]
    fn ssh_forms() {
        let env = env_with(&[("SSH_AUTH_SOCK", "/tmp/agent.sock")]);
        let agents = parse_ssh(
            &["default".to_string(), "other=/run/other.sock".to_string()],
            &env,
        )
        .unwrap();
        assert_eq!(agents["default"], PathBuf::from("/tmp/agent.sock"));
        assert_eq!(agents["other"], PathBuf::from("/run/other.sock"));
        let none = env_with(&[]);
        let err = parse_ssh(&["default".to_string()], &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SSH_AUTH_SOCK is not set"), "{err}");
        let err = parse_ssh(&["k=/a,/b".to_string()], &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not supported yet"), "{err}");
    }

    #[test]
    fn check_rejects_missing_files_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "v").unwrap();
        let ok = BTreeMap::from([("s".to_string(), SecretSource::File(file.clone()))]);
        check_sources(&ok, &BTreeMap::new()).unwrap();
        let missing =
            BTreeMap::from([("m".to_string(), SecretSource::File(dir.path().join("no")))]);
        let err = format!(
            "{:#}",
            check_sources(&missing, &BTreeMap::new()).unwrap_err()
        );
        assert!(err.contains("--secret id=m: failed to stat"), "{err}");
        let key = BTreeMap::from([("default".to_string(), file)]);
        let err = check_sources(&BTreeMap::new(), &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key files are not supported yet"), "{err}");
        let gone = BTreeMap::from([("default".to_string(), dir.path().join("agent.sock"))]);
        let err = format!("{:#}", check_sources(&BTreeMap::new(), &gone).unwrap_err());
        assert!(err.contains("failed to stat agent socket"), "{err}");
        let sock = dir.path().join("real.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        check_sources(
            &BTreeMap::new(),
            &BTreeMap::from([("default".to_string(), sock)]),
        )
        .unwrap();
    }
}
