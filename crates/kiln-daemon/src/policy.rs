//! Source policies (`SolveRequest.SourcePolicy`, `buildctl --source-policy-file`): rules that
//! allow, deny or convert LLB source ops by identifier (`docker-image://…`, `local://…`,
//! `https://…`) and attributes, as BuildKit's policy engine does.
//!
//! Rules are tried in order. A matching `ALLOW` or `DENY` sets whether the source is denied
//! (the last match wins); a matching `CONVERT` rewrites the identifier (wildcard and regex
//! captures expand in the new one: `$1`, `${1}`) and merges attributes, then the policy is
//! evaluated again on the result. The frontend applies the policy before it resolves a base
//! image, and the solver's definition is rewritten before solving (op digests change with
//! it; inputs, metadata and source locations follow).

use std::collections::{BTreeMap, HashMap};

use kiln_proto::moby::buildkit::v1::sourcepolicy::{
    AttrConstraint, AttrMatch, MatchType, Policy, PolicyAction,
};
use kiln_proto::pb;
use prost::Message as _;
use regex::Regex;

/// How many conversions one source may go through (a guard against rules that convert in a
/// cycle).
const MAX_CONVERSIONS: usize = 20;

/// Why a source may not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A `DENY` rule matched last.
    #[error("source {identifier:?} denied by policy")]
    Denied {
        /// The source identifier.
        identifier: String,
    },
    /// A rule cannot be compiled.
    #[error("invalid source policy rule {index}: {reason}")]
    InvalidRule {
        /// 0-based rule index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Conversions did not settle.
    #[error("source {identifier:?}: more than {MAX_CONVERSIONS} policy conversions (a cycle?)")]
    TooManyConversions {
        /// The first identifier.
        identifier: String,
    },
    /// The definition holds an op that cannot be decoded.
    #[error("invalid definition: {0}")]
    Definition(String),
}

struct Rule {
    action: PolicyAction,
    matcher: Matcher,
    constraints: Vec<(AttrConstraint, Option<Regex>)>,
    update_identifier: String,
    update_attrs: BTreeMap<String, String>,
}

enum Matcher {
    Exact(String),
    /// A wildcard (tried as an exact string first) or a regex, anchored.
    Pattern(Option<String>, Regex),
}

/// A compiled policy.
pub struct SourcePolicy {
    rules: Vec<Rule>,
}

impl SourcePolicy {
    /// Compiles `policy`; `None` when it has no rules.
    pub fn compile(policy: &Policy) -> Result<Option<Self>, PolicyError> {
        if policy.rules.is_empty() {
            return Ok(None);
        }
        let mut rules = Vec::new();
        for (index, rule) in policy.rules.iter().enumerate() {
            let invalid = |reason: String| PolicyError::InvalidRule { index, reason };
            let selector = rule
                .selector
                .as_ref()
                .ok_or_else(|| invalid("no selector".into()))?;
            let action = PolicyAction::try_from(rule.action)
                .map_err(|_| invalid(format!("unknown action {}", rule.action)))?;
            let match_type = MatchType::try_from(selector.match_type)
                .map_err(|_| invalid(format!("unknown match type {}", selector.match_type)))?;
            let matcher = match match_type {
                MatchType::Exact => Matcher::Exact(selector.identifier.clone()),
                MatchType::Wildcard => Matcher::Pattern(
                    Some(selector.identifier.clone()),
                    anchored(&wildcard_regex(&selector.identifier)).map_err(invalid)?,
                ),
                MatchType::Regex => {
                    Matcher::Pattern(None, anchored(&selector.identifier).map_err(invalid)?)
                }
            };
            let mut constraints = Vec::new();
            for constraint in &selector.constraints {
                let regex = match AttrMatch::try_from(constraint.condition) {
                    Ok(AttrMatch::Matches) => Some(anchored(&constraint.value).map_err(invalid)?),
                    Ok(_) => None,
                    Err(_) => {
                        return Err(invalid(format!(
                            "unknown attribute condition {}",
                            constraint.condition
                        )))
                    }
                };
                constraints.push((constraint.clone(), regex));
            }
            let update = rule.updates.clone().unwrap_or_default();
            if action == PolicyAction::Convert && update.identifier.is_empty() {
                return Err(invalid("CONVERT without updates.identifier".into()));
            }
            rules.push(Rule {
                action,
                matcher,
                constraints,
                update_identifier: update.identifier,
                update_attrs: update.attrs,
            });
        }
        Ok(Some(Self { rules }))
    }

    /// The source `identifier` with `attrs` after the policy: unchanged, converted, or denied.
    pub fn evaluate(
        &self,
        identifier: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(String, BTreeMap<String, String>), PolicyError> {
        let mut current = (identifier.to_string(), attrs.clone());
        for _ in 0..MAX_CONVERSIONS {
            match self.evaluate_once(&current.0, &current.1)? {
                Some(converted) => current = converted,
                None => return Ok(current),
            }
        }
        Err(PolicyError::TooManyConversions {
            identifier: identifier.to_string(),
        })
    }

    /// One pass over the rules: `Some` when a CONVERT rule applied.
    #[allow(clippy::type_complexity)]
    fn evaluate_once(
        &self,
        identifier: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<Option<(String, BTreeMap<String, String>)>, PolicyError> {
        let mut denied = false;
        for rule in &self.rules {
            let Some(converted) = rule.matches(identifier, attrs) else {
                continue;
            };
            match rule.action {
                PolicyAction::Allow => denied = false,
                PolicyAction::Deny => denied = true,
                PolicyAction::Convert => {
                    if converted == identifier
                        && rule
                            .update_attrs
                            .iter()
                            .all(|(k, v)| attrs.get(k) == Some(v))
                    {
                        // Converting to itself changes nothing: keep evaluating.
                        continue;
                    }
                    let mut new_attrs = attrs.clone();
                    new_attrs.extend(rule.update_attrs.clone());
                    return Ok(Some((converted, new_attrs)));
                }
            }
        }
        if denied {
            return Err(PolicyError::Denied {
                identifier: identifier.to_string(),
            });
        }
        Ok(None)
    }

    /// `definition` with every source op passed through the policy.
    pub fn apply(&self, definition: &pb::Definition) -> Result<pb::Definition, PolicyError> {
        let mut renamed: HashMap<String, String> = HashMap::new();
        let mut out = definition.clone();
        out.def.clear();
        for bytes in &definition.def {
            let old = kiln_llb::op_digest(bytes);
            let mut op = pb::Op::decode(bytes.as_slice())
                .map_err(|e| PolicyError::Definition(e.to_string()))?;
            let mut changed = false;
            for input in &mut op.inputs {
                if let Some(new) = renamed.get(&input.digest) {
                    input.digest = new.clone();
                    changed = true;
                }
            }
            if let Some(pb::op::Op::Source(source)) = &mut op.op {
                let (identifier, attrs) = self.evaluate(&source.identifier, &source.attrs)?;
                if identifier != source.identifier || attrs != source.attrs {
                    tracing::info!(from = %source.identifier, to = %identifier, "source converted by policy");
                    source.identifier = identifier;
                    source.attrs = attrs;
                    changed = true;
                }
            }
            if !changed {
                out.def.push(bytes.clone());
                continue;
            }
            let bytes = kiln_llb::marshal_op(&op);
            let new = kiln_llb::op_digest(&bytes);
            out.def.push(bytes);
            if let Some(metadata) = out.metadata.remove(&old) {
                out.metadata.insert(new.clone(), metadata);
            }
            if let Some(locations) = out
                .source
                .as_mut()
                .and_then(|source| source.locations.remove(&old))
            {
                if let Some(source) = out.source.as_mut() {
                    source.locations.insert(new.clone(), locations);
                }
            }
            renamed.insert(old, new);
        }
        Ok(out)
    }
}

impl Rule {
    /// The converted identifier when the rule matches (the update identifier with captures
    /// expanded; the identifier itself for ALLOW/DENY), `None` when it does not match.
    fn matches(&self, identifier: &str, attrs: &BTreeMap<String, String>) -> Option<String> {
        let converted = match &self.matcher {
            Matcher::Exact(expected) => {
                (expected == identifier).then(|| self.update_identifier.clone())?
            }
            Matcher::Pattern(Some(literal), _) if literal == identifier => {
                self.update_identifier.clone()
            }
            Matcher::Pattern(_, regex) => {
                let captures = regex.captures(identifier)?;
                let mut expanded = String::new();
                captures.expand(&self.update_identifier, &mut expanded);
                expanded
            }
        };
        for (constraint, regex) in &self.constraints {
            let value = attrs.get(&constraint.key);
            let ok = match AttrMatch::try_from(constraint.condition) {
                Ok(AttrMatch::Equal) => value == Some(&constraint.value),
                Ok(AttrMatch::Notequal) => value != Some(&constraint.value),
                Ok(AttrMatch::Matches) => {
                    value.is_some_and(|v| regex.as_ref().is_some_and(|r| r.is_match(v)))
                }
                Err(_) => false,
            };
            if !ok {
                return None;
            }
        }
        Some(match self.action {
            PolicyAction::Convert => converted,
            _ => identifier.to_string(),
        })
    }
}

/// `*` → any run of characters, `?` → one character, each a capture group; the rest literal.
fn wildcard_regex(pattern: &str) -> String {
    let mut out = String::new();
    for c in pattern.chars() {
        match c {
            '*' => out.push_str("(.*)"),
            '?' => out.push_str("(.)"),
            c => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    out
}

fn anchored(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid pattern {pattern:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::moby::buildkit::v1::sourcepolicy::{Rule as PbRule, Selector, Update};

    fn rule(action: PolicyAction, match_type: MatchType, selector: &str, update: &str) -> PbRule {
        PbRule {
            action: action as i32,
            selector: Some(Selector {
                identifier: selector.into(),
                match_type: match_type as i32,
                constraints: Vec::new(),
            }),
            updates: (!update.is_empty()).then(|| Update {
                identifier: update.into(),
                attrs: BTreeMap::new(),
            }),
        }
    }

    fn policy(rules: Vec<PbRule>) -> SourcePolicy {
        SourcePolicy::compile(&Policy { version: 1, rules })
            .unwrap()
            .unwrap()
    }

    fn eval(policy: &SourcePolicy, identifier: &str) -> Result<String, String> {
        policy
            .evaluate(identifier, &BTreeMap::new())
            .map(|(id, _)| id)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn deny_allow_and_convert_in_order() {
        let p = policy(vec![
            rule(
                PolicyAction::Deny,
                MatchType::Wildcard,
                "docker-image://*",
                "",
            ),
            rule(
                PolicyAction::Allow,
                MatchType::Wildcard,
                "docker-image://127.0.0.1:5000/*",
                "",
            ),
            rule(
                PolicyAction::Convert,
                MatchType::Regex,
                r"docker-image://127\.0\.0\.1:5000/old/(.*)",
                "docker-image://127.0.0.1:5000/new/${1}",
            ),
        ]);
        assert_eq!(
            eval(&p, "docker-image://docker.io/library/alpine:latest").unwrap_err(),
            "source \"docker-image://docker.io/library/alpine:latest\" denied by policy"
        );
        assert_eq!(
            eval(&p, "docker-image://127.0.0.1:5000/busybox:latest").unwrap(),
            "docker-image://127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(
            eval(&p, "docker-image://127.0.0.1:5000/old/app:1").unwrap(),
            "docker-image://127.0.0.1:5000/new/app:1"
        );
        assert_eq!(eval(&p, "local://context").unwrap(), "local://context");
    }

    #[test]
    fn wildcard_captures_exact_and_cycles() {
        let p = policy(vec![rule(
            PolicyAction::Convert,
            MatchType::Wildcard,
            "docker-image://docker.io/library/*:latest",
            "docker-image://127.0.0.1:5000/mirror/$1:latest",
        )]);
        assert_eq!(
            eval(&p, "docker-image://docker.io/library/alpine:latest").unwrap(),
            "docker-image://127.0.0.1:5000/mirror/alpine:latest"
        );
        let exact = policy(vec![rule(
            PolicyAction::Deny,
            MatchType::Exact,
            "docker-image://a*",
            "",
        )]);
        assert!(eval(&exact, "docker-image://a*").is_err());
        assert!(eval(&exact, "docker-image://ab").is_ok());
        let cycle = policy(vec![
            rule(PolicyAction::Convert, MatchType::Exact, "a://x", "a://y"),
            rule(PolicyAction::Convert, MatchType::Exact, "a://y", "a://x"),
        ]);
        assert!(eval(&cycle, "a://x")
            .unwrap_err()
            .contains("policy conversions"));
    }

    #[test]
    fn constraints_on_attributes() {
        let mut r = rule(PolicyAction::Deny, MatchType::Wildcard, "local://*", "");
        r.selector
            .as_mut()
            .unwrap()
            .constraints
            .push(AttrConstraint {
                key: "local.sharedkeyhint".into(),
                value: "sec.*".into(),
                condition: AttrMatch::Matches as i32,
            });
        let p = policy(vec![r]);
        let attrs = |v: &str| BTreeMap::from([("local.sharedkeyhint".to_string(), v.to_string())]);
        assert!(p.evaluate("local://x", &attrs("secret")).is_err());
        assert!(p.evaluate("local://x", &attrs("context")).is_ok());
    }

    #[test]
    fn definitions_are_rewritten_with_their_inputs() {
        let mut builder = kiln_llb::DefinitionBuilder::new();
        let source = builder
            .add(
                pb::Op {
                    op: Some(pb::op::Op::Source(pb::SourceOp {
                        identifier: "docker-image://127.0.0.1:5000/old/app:1".into(),
                        attrs: BTreeMap::new(),
                    })),
                    ..Default::default()
                },
                &[],
            )
            .unwrap();
        let definition = builder.build(Some(kiln_llb::OutputRef::new(source.clone(), 0)));
        let p = policy(vec![rule(
            PolicyAction::Convert,
            MatchType::Wildcard,
            "docker-image://127.0.0.1:5000/old/*",
            "docker-image://127.0.0.1:5000/new/$1",
        )]);
        let rewritten = p.apply(&definition).unwrap();
        let graph = kiln_llb::Graph::from_definition(&rewritten).unwrap();
        let ops: Vec<pb::Op> = rewritten
            .def
            .iter()
            .map(|b| pb::Op::decode(b.as_slice()).unwrap())
            .collect();
        let Some(pb::op::Op::Source(new_source)) = &ops[0].op else {
            panic!("first op is the source");
        };
        assert_eq!(
            new_source.identifier,
            "docker-image://127.0.0.1:5000/new/app:1"
        );
        // The result op now points at the new source digest.
        let new_digest = kiln_llb::op_digest(&rewritten.def[0]);
        assert_ne!(new_digest, source);
        assert_eq!(ops[1].inputs[0].digest, new_digest);
        assert!(graph.op(&new_digest).is_some());
    }
}
