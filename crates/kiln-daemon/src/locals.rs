//! Local sources served by the client's session (`local://<name>`), kept in
//! a per-(client, name) directory under `<root>/locals/` so a second build
//! of the same context only transfers what changed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_session::filesync::{self, Differ, ReceiveRequest};
use kiln_session::SessionManager;
use kiln_solver::{BoxError, LocalSources, VertexProgress};
use sha2::{Digest as _, Sha256};

/// How long to wait for the session a local source names.
pub const SESSION_WAIT: Duration = Duration::from_secs(15);

/// [`LocalSources`] over client sessions.
pub struct SessionLocals {
    sessions: SessionManager,
    default_session: String,
    dir: PathBuf,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl SessionLocals {
    /// Locals of a build whose main session is `default_session`, stored
    /// under `dir`.
    pub fn new(sessions: SessionManager, default_session: String, dir: &Path) -> Self {
        Self {
            sessions,
            default_session,
            dir: dir.to_path_buf(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        locks.entry(dir.to_path_buf()).or_default().clone()
    }
}

/// Parses a `local.*patterns` attr: a JSON array of strings.
pub fn json_list(attrs: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, BoxError> {
    match attrs.get(key) {
        None => Ok(Vec::new()),
        Some(v) if v.is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("invalid {key} {v:?}: {e}").into()),
    }
}

#[async_trait::async_trait]
impl LocalSources for SessionLocals {
    async fn sync(
        &self,
        name: &str,
        attrs: &BTreeMap<String, String>,
        progress: &VertexProgress,
    ) -> Result<PathBuf, BoxError> {
        let session_id = attrs
            .get("local.session")
            .cloned()
            .unwrap_or_else(|| self.default_session.clone());
        let session = self.sessions.get(&session_id, SESSION_WAIT).await?;
        let hint = attrs
            .get("local.sharedkeyhint")
            .map(String::as_str)
            .unwrap_or(name);
        let mut hasher = Sha256::new();
        for part in [session.shared_key(), name, hint] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        let dest = self.dir.join(hex::encode(hasher.finalize()));
        let lock = self.lock_for(&dest);
        let _guard = lock.lock().await;
        let differ = match attrs.get("local.differ").map(String::as_str) {
            Some("none") => Differ::None,
            _ => Differ::Metadata,
        };
        let request = ReceiveRequest {
            dir_name: name.to_string(),
            dest: dest.clone(),
            include_patterns: json_list(attrs, "local.includepattern")
                .or_else(|_| json_list(attrs, "local.includepatterns"))?,
            exclude_patterns: json_list(attrs, "local.excludepatterns")?,
            followpaths: json_list(attrs, "local.followpaths")?,
            differ,
        };
        let status_id = format!("transferring {name}:");
        progress.status(&status_id, &status_id, 0, None, false);
        let stats = filesync::receive(session.channel(), request).await?;
        progress.status(&status_id, &status_id, stats.bytes_received, None, true);
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_attrs_are_json_lists() {
        let mut attrs = BTreeMap::new();
        attrs.insert(
            "local.excludepatterns".to_string(),
            r#"["a","!b"]"#.to_string(),
        );
        assert_eq!(
            json_list(&attrs, "local.excludepatterns").unwrap(),
            vec!["a", "!b"]
        );
        assert!(json_list(&attrs, "local.followpaths").unwrap().is_empty());
        attrs.insert("local.followpaths".to_string(), "not json".to_string());
        assert!(json_list(&attrs, "local.followpaths").is_err());
    }
}
