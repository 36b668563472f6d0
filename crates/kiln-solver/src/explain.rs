//! Why a vertex ran: the cache-key parts of the last run of each vertex
//! identity, and the comparison that names what changed on a miss.
//!
//! Kept in `<state_dir>/cache/explain/`, one small JSON file per identity,
//! written atomically. A vertex that runs is recorded under two identities:
//! its *exact* identity (its name and its op with inputs cleared, i.e. the
//! instruction) and its *step* identity (the bracketed step label of its
//! name, `[2/3]`, or the whole name). On a miss the exact identity is looked
//! up first (same instruction: an input changed), then the step identity
//! (the instruction itself or its environment changed).
//!
//! The reason goes out as a stderr log line of the vertex prefixed
//! [`MISS_PREFIX`], so plain progress shows
//! `#5 0.000 kiln: cache miss: file changed: app.txt` and rawjson carries it
//! in `logs`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Prefix of the log line that explains a cache miss.
pub const MISS_PREFIX: &str = "kiln: cache miss: ";

/// The key parts of one run of a vertex.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyParts {
    /// Digest of the op bytes with inputs cleared.
    pub op: String,
    /// An exec op's environment (`NAME` → value), where build args land.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Each input's key (the input's cache key or the COPY content key).
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Per input, per COPY source path, its content checksum (empty when
    /// the input is not read through COPY selectors).
    #[serde(default)]
    pub files: Vec<BTreeMap<String, String>>,
    /// A source's identity: image manifest digest, local checksum.
    #[serde(default)]
    pub source: String,
}

/// The persisted index of last key parts per vertex identity.
#[derive(Clone, Debug)]
pub struct ExplainIndex {
    dir: PathBuf,
}

/// The exact identity of a vertex: its name and its instruction.
pub fn exact_identity(name: &str, op_digest: &str) -> String {
    format!("exact\0{name}\0{op_digest}")
}

/// The step identity of a vertex: the `[...]` label its name starts with,
/// or the whole name.
pub fn step_identity(name: &str) -> String {
    let label = match (name.starts_with('['), name.find(']')) {
        (true, Some(end)) => &name[..=end],
        _ => name,
    };
    format!("step\0{label}")
}

impl ExplainIndex {
    /// Opens (creating) the index in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, identity: &str) -> PathBuf {
        self.dir
            .join(hex::encode(Sha256::digest(identity.as_bytes())))
            .with_extension("json")
    }

    /// The parts last recorded for `identity`.
    pub fn get(&self, identity: &str) -> Option<KeyParts> {
        serde_json::from_slice(&fs::read(self.path(identity)).ok()?).ok()
    }

    /// Records `parts` under `identity` (atomically: write then rename).
    pub fn put(&self, identity: &str, parts: &KeyParts) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(parts).map_err(std::io::Error::other)?;
        crate::cache::write_atomically(&self.path(identity), &bytes)
    }

    /// Why a vertex with `current` parts missed the cache, given its
    /// identities; `input_names` names each input's vertex.
    pub fn explain(&self, name: &str, current: &KeyParts, input_names: &[String]) -> String {
        if let Some(previous) = self.get(&exact_identity(name, &current.op)) {
            return compare_inputs(&previous, current, input_names);
        }
        if let Some(previous) = self.get(&step_identity(name)) {
            if previous.op != current.op && previous.env != current.env {
                let mut names: Vec<&str> = previous
                    .env
                    .iter()
                    .filter(|(k, v)| current.env.get(*k) != Some(v))
                    .map(|(k, _)| k.as_str())
                    .collect();
                for k in current.env.keys() {
                    if !previous.env.contains_key(k) && !names.contains(&k.as_str()) {
                        names.push(k);
                    }
                }
                names.sort_unstable();
                return format!("build arg changed: {}", names.join(", "));
            }
            return "instruction changed".to_string();
        }
        "first build".to_string()
    }

    /// Why an image source missed: its digest moved, or it is new here.
    pub fn explain_source(&self, identity: &str, source: &str) -> String {
        match self.get(identity) {
            Some(previous) if !previous.source.is_empty() && previous.source != source => {
                format!("base image changed: {} → {source}", previous.source)
            }
            Some(_) => "cache record removed".to_string(),
            None => "first build".to_string(),
        }
    }
}

/// Whether `path` lies inside directory `dir` (`.` holds everything).
fn is_under(path: &str, dir: &str) -> bool {
    dir == "."
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `file changed: a, b` — at most five names, then how many more.
fn describe_files(paths: &[&str]) -> String {
    const SHOWN: usize = 5;
    let label = if paths.len() == 1 {
        "file changed"
    } else {
        "files changed"
    };
    let mut text = format!("{label}: {}", paths[..paths.len().min(SHOWN)].join(", "));
    if paths.len() > SHOWN {
        text.push_str(&format!(" and {} more", paths.len() - SHOWN));
    }
    text
}

fn compare_inputs(previous: &KeyParts, current: &KeyParts, input_names: &[String]) -> String {
    if previous.inputs.len() != current.inputs.len() {
        return "instruction changed".to_string();
    }
    for (index, (old, new)) in previous.inputs.iter().zip(&current.inputs).enumerate() {
        if old == new {
            continue;
        }
        let empty = BTreeMap::new();
        let old_files = previous.files.get(index).unwrap_or(&empty);
        let new_files = current.files.get(index).unwrap_or(&empty);
        if !old_files.is_empty() || !new_files.is_empty() {
            let mut changed: Vec<&str> = new_files
                .iter()
                .filter(|(path, sum)| old_files.get(*path) != Some(sum))
                .map(|(path, _)| path.as_str())
                .collect();
            changed.extend(
                old_files
                    .keys()
                    .filter(|p| !new_files.contains_key(*p))
                    .map(|p| p.as_str()),
            );
            // The most specific names: a directory is dropped when a file under it is listed.
            let specific: Vec<&str> = changed
                .iter()
                .copied()
                .filter(|path| {
                    !changed
                        .iter()
                        .any(|other| other.len() > path.len() && is_under(other, path))
                })
                .collect();
            if !specific.is_empty() {
                return describe_files(&specific);
            }
        }
        return match input_names.get(index) {
            Some(input) if !input.is_empty() => format!("input {index} changed ({input})"),
            _ => format!("input {index} changed"),
        };
    }
    "cache record removed".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(op: &str, env: &[(&str, &str)], inputs: &[&str]) -> KeyParts {
        KeyParts {
            op: op.into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn record(index: &ExplainIndex, name: &str, p: &KeyParts) {
        index.put(&exact_identity(name, &p.op), p).unwrap();
        index.put(&step_identity(name), p).unwrap();
    }

    #[test]
    fn reasons_table() {
        let dir = tempfile::tempdir().unwrap();
        let index = ExplainIndex::open(dir.path()).unwrap();
        let name = "[2/3] RUN make";
        let base = parts("op1", &[("V", "1"), ("PATH", "/bin")], &["in-a"]);
        assert_eq!(index.explain(name, &base, &[]), "first build");
        record(&index, name, &base);
        let input = parts("op1", &[("V", "1"), ("PATH", "/bin")], &["in-b"]);
        assert_eq!(
            index.explain(name, &input, &["[1/3] FROM x".into()]),
            "input 0 changed ([1/3] FROM x)"
        );
        let arg = parts("op2", &[("V", "2"), ("PATH", "/bin")], &["in-a"]);
        assert_eq!(index.explain(name, &arg, &[]), "build arg changed: V");
        let text = parts("op3", &[("V", "1"), ("PATH", "/bin")], &["in-a"]);
        assert_eq!(
            index.explain("[2/3] RUN make all", &text, &[]),
            "instruction changed"
        );
        let mut copy = parts("cp", &[], &["c1"]);
        copy.files = vec![BTreeMap::from([
            ("app.txt".to_string(), "s1".to_string()),
            ("lib".to_string(), "s2".to_string()),
        ])];
        record(&index, "[3/3] COPY app.txt lib /", &copy);
        let mut changed = copy.clone();
        changed.inputs = vec!["c2".into()];
        changed.files[0].insert("app.txt".into(), "s3".into());
        assert_eq!(
            index.explain("[3/3] COPY app.txt lib /", &changed, &[]),
            "file changed: app.txt"
        );
        // A directory and the files under it: the files are named, not the directory.
        let mut tree = parts("cp2", &[], &["t1"]);
        tree.files = vec![BTreeMap::from([
            ("lib".to_string(), "d1".to_string()),
            ("lib/a.rs".to_string(), "a1".to_string()),
            ("lib/b.rs".to_string(), "b1".to_string()),
            ("library.txt".to_string(), "l1".to_string()),
        ])];
        record(&index, "[2/2] COPY lib library.txt /", &tree);
        let mut edited = tree.clone();
        edited.inputs = vec!["t2".into()];
        edited.files[0].insert("lib".into(), "d2".into());
        edited.files[0].insert("lib/b.rs".into(), "b2".into());
        edited.files[0].insert("lib/c.rs".into(), "c1".into());
        assert_eq!(
            index.explain("[2/2] COPY lib library.txt /", &edited, &[]),
            "files changed: lib/b.rs, lib/c.rs"
        );
        index
            .put(
                "image\0x",
                &KeyParts {
                    source: "sha256:a".into(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            index.explain_source("image\0x", "sha256:b"),
            "base image changed: sha256:a → sha256:b"
        );
        assert_eq!(index.explain_source("image\0y", "sha256:b"), "first build");
    }
}
