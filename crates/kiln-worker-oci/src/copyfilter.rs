//! `include_patterns` and `exclude_patterns` of a `FileActionCopy`, with fsutil's copier
//! semantics: both are matched against an entry's path relative to the copied source (the source
//! itself is never filtered); patterns are `.dockerignore`-style (`**`, `!` exceptions, a
//! pattern matching a directory matches everything below it).
//!
//! An include pattern may match a directory only partially (`a` for `a/*/c.txt`): the walk then
//! descends without creating the directory, and directories on the way are created (with their
//! source metadata) only once something inside them is included. That is what keeps
//! `COPY --parents` from leaving empty parent directories behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_session::patterns::{Pattern, PatternMatcher};

use crate::fsx::{copy_metadata, copy_tree, glob_match, CopyOptions};

/// The compiled include and exclude patterns of one copy.
#[derive(Debug)]
pub(crate) struct CopyFilter {
    /// Each include pattern with its components (for partial matches of directories).
    includes: Vec<(Pattern, Vec<String>)>,
    excludes: PatternMatcher,
}

/// How an include pattern matches an entry.
#[derive(Debug, PartialEq, Eq)]
enum Include {
    /// Not included.
    Skip,
    /// A directory on the way to possible matches: descend, create it only when needed.
    Partial,
    /// Included with everything below it.
    Full,
}

impl CopyFilter {
    /// The filter of a copy, or `None` when it has no patterns. Errors name the bad pattern.
    pub(crate) fn new(includes: &[String], excludes: &[String]) -> Result<Option<Self>, String> {
        let includes: Vec<&String> = includes.iter().filter(|p| !p.trim().is_empty()).collect();
        if includes.is_empty() && excludes.iter().all(|p| p.trim().is_empty()) {
            return Ok(None);
        }
        let includes = includes
            .into_iter()
            .map(|raw| {
                let pattern = Pattern::new(raw).map_err(|e| e.to_string())?;
                let components = pattern.text().split('/').map(str::to_string).collect();
                Ok((pattern, components))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let excludes = PatternMatcher::new(excludes).map_err(|e| e.to_string())?;
        Ok(Some(Self { includes, excludes }))
    }

    fn include(&self, rel: &str, is_dir: bool) -> Include {
        let mut partial = false;
        for (pattern, components) in &self.includes {
            if pattern.matches(rel) {
                return Include::Full;
            }
            if is_dir && prefix_match(components, rel) {
                partial = true;
            }
        }
        if partial {
            Include::Partial
        } else {
            Include::Skip
        }
    }

    fn exclude(&self, rel: &str, is_dir: bool) -> bool {
        if self.excludes.is_empty() || !self.excludes.matches(rel) {
            return false;
        }
        // An excluded directory is still walked when an exception may re-include something
        // inside it.
        !(is_dir && self.excludes.may_match_inside(rel, true))
    }
}

/// Whether directory `rel` lies on the way to a path `components` could match.
fn prefix_match(components: &[String], rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        match components.get(i) {
            None => return false,
            Some(c) if c.starts_with("**") => return true,
            Some(c) if !glob_match(c, part) => return false,
            Some(_) => {}
        }
    }
    parts.len() < components.len()
}

/// Copies directory `src` to `dst` through `filter`: `dst` is created with `src`'s metadata
/// unless it is already a directory (then it keeps its own).
pub(crate) fn copy_dir_filtered(
    src: &Path,
    dst: &Path,
    filter: &CopyFilter,
    opts: &CopyOptions,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let existed = match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            fs::remove_file(dst)?;
            false
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if !existed {
        fs::create_dir(dst)?;
    }
    let included = filter.includes.is_empty();
    walk(src, dst, "", filter, opts, included, &mut Vec::new())?;
    if !existed {
        copy_metadata(src, dst, &meta, opts)?;
    }
    Ok(())
}

/// Copies the entries of `src_dir` into `dst_dir`. `pending` holds the destination directories
/// entered through partial include matches and not created yet (outermost first).
fn walk(
    src_dir: &Path,
    dst_dir: &Path,
    rel_dir: &str,
    filter: &CopyFilter,
    opts: &CopyOptions,
    included: bool,
    pending: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(src_dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let src = src_dir.join(&name);
        let dst = dst_dir.join(&name);
        let name = name.to_string_lossy();
        let rel = if rel_dir.is_empty() {
            name.into_owned()
        } else {
            format!("{rel_dir}/{name}")
        };
        let meta = fs::symlink_metadata(&src)?;
        let is_dir = meta.is_dir();
        let mode = if included {
            Include::Full
        } else {
            filter.include(&rel, is_dir)
        };
        if mode == Include::Skip || filter.exclude(&rel, is_dir) {
            continue;
        }
        let existed = fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir());
        if mode == Include::Partial {
            if !existed {
                pending.push(dst.clone());
            }
            walk(&src, &dst, &rel, filter, opts, false, pending)?;
            if !existed {
                pending.pop();
                // Created because something inside was included: now its metadata.
                if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                    copy_metadata(&src, &dst, &meta, opts)?;
                }
            }
            continue;
        }
        // Included: the parents entered through partial matches come first.
        for dir in pending.iter() {
            if fs::symlink_metadata(dir).is_err() {
                fs::create_dir(dir)?;
            }
        }
        if is_dir {
            if !existed {
                if fs::symlink_metadata(&dst).is_ok() {
                    fs::remove_file(&dst)?;
                }
                fs::create_dir(&dst)?;
            }
            walk(&src, &dst, &rel, filter, opts, true, &mut Vec::new())?;
            if !existed {
                copy_metadata(&src, &dst, &meta, opts)?;
            }
        } else {
            copy_tree(&src, &dst, opts)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, f.as_bytes()).unwrap();
        }
    }

    fn listing(root: &Path) -> Vec<String> {
        fn visit(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                if p.is_dir() {
                    out.push(format!("{rel}/"));
                    visit(root, &p, out);
                } else {
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        visit(root, root, &mut out);
        out.sort();
        out
    }

    fn copy(includes: &[&str], excludes: &[&str]) -> Vec<String> {
        let src = tempfile::tempdir().unwrap();
        tree(
            src.path(),
            &[
                "a/b/c.txt",
                "a/b/d.md",
                "a/x/c.txt",
                "keep.md",
                "notes.txt",
                "tmp/junk",
                "pkg/one/main.go",
                "pkg/one/main_test.go",
                "pkg/two/other.go",
            ],
        );
        let dst = tempfile::tempdir().unwrap();
        let out = dst.path().join("out");
        let s = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let filter = CopyFilter::new(&s(includes), &s(excludes))
            .unwrap()
            .unwrap();
        copy_dir_filtered(src.path(), &out, &filter, &CopyOptions::default()).unwrap();
        listing(&out)
    }

    #[test]
    fn excludes_with_globs_and_exceptions() {
        assert_eq!(
            copy(&[], &["*.md", "tmp", "pkg/**/*_test.go", "a/b"]),
            [
                "a/",
                "a/x/",
                "a/x/c.txt",
                "notes.txt",
                "pkg/",
                "pkg/one/",
                "pkg/one/main.go",
                "pkg/two/",
                "pkg/two/other.go"
            ]
        );
        // `!` re-includes inside an excluded directory.
        assert_eq!(
            copy(&[], &["a", "!a/b/c.txt", "pkg", "tmp", "*.md", "*.txt"]),
            ["a/", "a/b/", "a/b/c.txt"]
        );
    }

    #[test]
    fn includes_keep_only_the_parents_of_matches() {
        assert_eq!(copy(&["a/b/c.txt"], &[]), ["a/", "a/b/", "a/b/c.txt"]);
        assert_eq!(
            copy(&["pkg/*/main.go"], &[]),
            ["pkg/", "pkg/one/", "pkg/one/main.go"]
        );
        assert_eq!(
            copy(&["a"], &["**/*.md"]),
            ["a/", "a/b/", "a/b/c.txt", "a/x/", "a/x/c.txt"]
        );
        assert_eq!(
            copy(&["**/c.txt"], &[]),
            ["a/", "a/b/", "a/b/c.txt", "a/x/", "a/x/c.txt"]
        );
    }
}
