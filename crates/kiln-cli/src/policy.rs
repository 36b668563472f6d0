//! `--source-policy-file`: BuildKit's source policy JSON, read into the wire `Policy` that
//! `SolveRequest.SourcePolicy` carries. The file is what `buildctl --source-policy-file` takes:
//!
//! ```json
//! {"rules": [{"action": "CONVERT",
//!             "selector": {"identifier": "docker-image://docker.io/library/alpine:latest"},
//!             "updates": {"identifier": "docker-image://127.0.0.1:5000/alpine:latest"}}]}
//! ```
//!
//! Enums are accepted by name (any case) or number; `match_type` also as `matchType`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context as _};
use kiln_proto::moby::buildkit::v1::sourcepolicy as spb;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    version: i64,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    action: Option<EnumValue>,
    selector: Option<SelectorFile>,
    #[serde(default)]
    updates: Option<UpdateFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorFile {
    #[serde(default)]
    identifier: String,
    #[serde(default, alias = "matchType")]
    match_type: Option<EnumValue>,
    #[serde(default)]
    constraints: Vec<ConstraintFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateFile {
    #[serde(default)]
    identifier: String,
    #[serde(default)]
    attrs: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintFile {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    condition: Option<EnumValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EnumValue {
    Number(i32),
    Name(String),
}

impl EnumValue {
    fn resolve(&self, what: &str, names: &[&str]) -> anyhow::Result<i32> {
        match self {
            EnumValue::Number(n) if (0..names.len() as i32).contains(n) => Ok(*n),
            EnumValue::Number(n) => bail!("invalid {what} {n}: expected one of {names:?}"),
            EnumValue::Name(name) => names
                .iter()
                .position(|known| known.eq_ignore_ascii_case(name))
                .map(|i| i as i32)
                .ok_or_else(|| {
                    anyhow::anyhow!("invalid {what} {name:?}: expected one of {names:?}")
                }),
        }
    }
}

fn resolve(value: &Option<EnumValue>, what: &str, names: &[&str]) -> anyhow::Result<i32> {
    value.as_ref().map_or(Ok(0), |v| v.resolve(what, names))
}

/// Parses a source policy file's JSON.
pub fn parse(text: &str) -> anyhow::Result<spb::Policy> {
    let file: PolicyFile = serde_json::from_str(text)?;
    let mut rules = Vec::new();
    for (index, rule) in file.rules.into_iter().enumerate() {
        let context = || format!("rule {index}");
        let selector = rule
            .selector
            .with_context(|| format!("rule {index}: no selector"))?;
        let mut constraints = Vec::new();
        for constraint in selector.constraints {
            constraints.push(spb::AttrConstraint {
                key: constraint.key,
                value: constraint.value,
                condition: resolve(
                    &constraint.condition,
                    "condition",
                    &["EQUAL", "NOTEQUAL", "MATCHES"],
                )
                .with_context(context)?,
            });
        }
        rules.push(spb::Rule {
            action: resolve(&rule.action, "action", &["ALLOW", "DENY", "CONVERT"])
                .with_context(context)?,
            selector: Some(spb::Selector {
                identifier: selector.identifier,
                match_type: resolve(
                    &selector.match_type,
                    "match_type",
                    &["WILDCARD", "EXACT", "REGEX"],
                )
                .with_context(context)?,
                constraints,
            }),
            updates: rule.updates.map(|u| spb::Update {
                identifier: u.identifier,
                attrs: u.attrs,
            }),
        });
    }
    Ok(spb::Policy {
        version: file.version,
        rules,
    })
}

/// Reads `--source-policy-file` (or, without it, `EXPERIMENTAL_BUILDKIT_SOURCE_POLICY` as
/// buildctl does).
pub fn load(
    flag: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<spb::Policy>> {
    let Some(path) = flag
        .map(str::to_string)
        .or_else(|| env("EXPERIMENTAL_BUILDKIT_SOURCE_POLICY"))
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(Path::new(&path))
        .with_context(|| format!("failed to read source policy file {path}"))?;
    parse(&text)
        .with_context(|| format!("invalid source policy file {path}"))
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildctl_policy_files_parse() {
        let policy = parse(
            r#"{"rules": [
                {"action": "CONVERT",
                 "selector": {"identifier": "docker-image://docker.io/library/alpine:latest"},
                 "updates": {"identifier": "docker-image://127.0.0.1:5000/alpine:latest",
                             "attrs": {"a": "b"}}},
                {"action": 1, "selector": {"identifier": "local://*", "matchType": "wildcard",
                 "constraints": [{"key": "k", "value": "v", "condition": "NOTEQUAL"}]}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(policy.rules.len(), 2);
        assert_eq!(policy.rules[0].action, spb::PolicyAction::Convert as i32);
        assert_eq!(
            policy.rules[0].updates.as_ref().unwrap().identifier,
            "docker-image://127.0.0.1:5000/alpine:latest"
        );
        assert_eq!(policy.rules[1].action, spb::PolicyAction::Deny as i32);
        let selector = policy.rules[1].selector.as_ref().unwrap();
        assert_eq!(selector.match_type, spb::MatchType::Wildcard as i32);
        assert_eq!(
            selector.constraints[0].condition,
            spb::AttrMatch::Notequal as i32
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = parse(r#"{"rules": [{"action": "EXPLODE", "selector": {"identifier": "x"}}]}"#)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid action \"EXPLODE\""),
            "{err:#}"
        );
        assert!(parse(r#"{"rulez": []}"#).is_err());
        let env = |_: &str| None;
        let missing = load(Some("/nonexistent/policy.json"), &env).unwrap_err();
        assert!(format!("{missing:#}").contains("failed to read source policy file"));
        assert!(load(None, &env).unwrap().is_none());
    }
}
