//! `git://` sources (`ADD <git ref>`): the daemon clones the repository with the `git` binary and
//! snapshots the checked-out tree.
//!
//! Identifier `git://<remote>[#<ref>[:<subdir>]]`; attributes `git.fullurl` (the URL to clone,
//! default `https://<remote>`), `git.keepgitdir` (`true` keeps `.git`), `git.checksum` (the
//! commit must start with it). The ref (branch, tag or commit; default `HEAD`) is resolved with
//! `git ls-remote` first, so the cache key — commit, subdir, keep-git-dir — is known before any
//! clone: an unchanged ref is a cache hit without fetching. Submodules are checked out when the
//! repository has them. Not supported: authentication secrets and ssh agent forwarding.

use std::path::Path;
use std::sync::Arc;

use kiln_proto::pb;

use crate::cache::CacheKey;
use crate::progress::VertexProgress;
use crate::{hold, lookup, now_secs, record, Context, Error, Resolved, SourceFailure};

fn failure(url: &str, reason: impl Into<String>) -> SourceFailure {
    SourceFailure::Other(Arc::new(Error::Git {
        url: url.to_string(),
        reason: reason.into(),
    }))
}

/// Runs `git args...` (in `dir` when given) without prompts; stdout on success.
async fn git(url: &str, dir: Option<&Path>, args: &[&str]) -> Result<String, SourceFailure> {
    let mut command = tokio::process::Command::new("git");
    if let Some(dir) = dir {
        command.arg("-C").arg(dir);
    }
    let output = command
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", "/nonexistent")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| failure(url, format!("failed to run git: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failure(
            url,
            format!("git {} failed: {}", args[0], stderr.trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn is_commit(reference: &str) -> bool {
    (reference.len() == 40 || reference.len() == 64)
        && reference.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit `reference` names on the remote (`HEAD` when empty), from `git ls-remote`.
async fn resolve_commit(url: &str, reference: &str) -> Result<String, SourceFailure> {
    if is_commit(reference) {
        return Ok(reference.to_ascii_lowercase());
    }
    let wanted = if reference.is_empty() {
        "HEAD"
    } else {
        reference
    };
    let listing = git(url, None, &["ls-remote", "--", url]).await?;
    let refs: Vec<(&str, &str)> = listing.lines().filter_map(|l| l.split_once('\t')).collect();
    // An annotated tag's peeled commit (`^{}`) first, then the exact names git would try.
    let candidates = [
        format!("refs/tags/{wanted}^{{}}"),
        wanted.to_string(),
        format!("refs/heads/{wanted}"),
        format!("refs/tags/{wanted}"),
        format!("{wanted}^{{}}"),
    ];
    for candidate in &candidates {
        if let Some((sha, _)) = refs.iter().find(|(_, name)| name == candidate) {
            return Ok(sha.to_string());
        }
    }
    Err(failure(url, format!("ref {wanted:?} not found")))
}

/// Runs a git source; see the module docs.
pub(crate) async fn run_git_source(
    context: &Context,
    source: &pb::SourceOp,
    ignore_cache: bool,
    progress: &VertexProgress,
    name: &str,
) -> Result<Resolved, SourceFailure> {
    let identifier = source.identifier.as_str();
    let rest = identifier.strip_prefix("git://").unwrap_or(identifier);
    let (remote, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
    let url = source
        .attrs
        .get("git.fullurl")
        .filter(|u| !u.is_empty())
        .cloned()
        .unwrap_or_else(|| format!("https://{remote}"));
    let keep = source
        .attrs
        .get("git.keepgitdir")
        .is_some_and(|v| v == "true");
    let subdir = subdir.trim_matches('/');
    if subdir.split('/').any(|c| c == "..") {
        return Err(failure(&url, format!("invalid subdirectory {subdir:?}")));
    }

    progress.log(2, format!("resolving {url} {reference}\n").as_bytes());
    let commit = resolve_commit(&url, reference).await?;
    if let Some(checksum) = source.attrs.get("git.checksum").filter(|c| !c.is_empty()) {
        if !commit.starts_with(&checksum.to_ascii_lowercase()) {
            return Err(failure(
                &url,
                format!("expected checksum to match {checksum}, got {commit}"),
            ));
        }
    }
    let parts = format!("{commit}\0{subdir}\0{keep}");
    let key = CacheKey::from_parts([("git", parts.as_bytes())]);
    if !ignore_cache {
        if let Some(resolved) = lookup(context, &key) {
            return Ok(resolved);
        }
    }

    let dir = context
        .state_dir
        .join("git")
        .join(format!("clone-{}", crate::http::unique_suffix()));
    let result = clone_and_snapshot(context, &url, &commit, subdir, keep, &dir, progress).await;
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "failed to remove git checkout");
        }
    }
    let snapshot = result?;
    let outputs = vec![Some(snapshot)];
    hold(context, &outputs);
    let created = now_secs();
    record(context, &key, &outputs, name, created)?;
    Ok(Resolved::ready(key, false, outputs, created))
}

async fn clone_and_snapshot(
    context: &Context,
    url: &str,
    commit: &str,
    subdir: &str,
    keep: bool,
    dir: &Path,
    progress: &VertexProgress,
) -> Result<kiln_worker::SnapshotId, SourceFailure> {
    let repo = dir.join("repo");
    tokio::fs::create_dir_all(&repo).await.map_err(|e| {
        SourceFailure::Other(Arc::new(Error::Io {
            path: repo.clone(),
            source: e,
        }))
    })?;
    progress.log(2, format!("fetching {url} {commit}\n").as_bytes());
    git(url, Some(&repo), &["init", "-q"]).await?;
    git(url, Some(&repo), &["remote", "add", "origin", url]).await?;
    // Fetching a commit by id needs the server's consent; fetch everything then.
    if git(
        url,
        Some(&repo),
        &["fetch", "-q", "--depth=1", "origin", commit],
    )
    .await
    .is_err()
    {
        git(
            url,
            Some(&repo),
            &[
                "fetch",
                "-q",
                "--tags",
                "origin",
                "+refs/heads/*:refs/remotes/origin/*",
            ],
        )
        .await?;
    }
    git(url, Some(&repo), &["checkout", "-q", "--detach", commit]).await?;
    if repo.join(".gitmodules").exists() {
        git(
            url,
            Some(&repo),
            &[
                "submodule",
                "update",
                "-q",
                "--init",
                "--recursive",
                "--depth=1",
            ],
        )
        .await?;
    }
    if !keep {
        let git_dir = repo.join(".git");
        tokio::fs::remove_dir_all(&git_dir).await.map_err(|e| {
            SourceFailure::Other(Arc::new(Error::Io {
                path: git_dir,
                source: e,
            }))
        })?;
    }
    let root = if subdir.is_empty() {
        repo.clone()
    } else {
        repo.join(subdir)
    };
    if !root.is_dir() {
        return Err(failure(
            url,
            format!("subdirectory {subdir:?} not found at {commit}"),
        ));
    }
    context
        .worker
        .snapshot_from_dir(&root)
        .await
        .map_err(SourceFailure::Worker)
}

#[cfg(test)]
mod tests {
    #[test]
    fn commit_ids() {
        assert!(super::is_commit(&"a".repeat(40)));
        assert!(!super::is_commit("main"));
        assert!(!super::is_commit("abc123"));
    }
}
