//! Where the Dockerfile comes from (`-f`, reference §1.6).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The `dockerfile` local directory and the file name inside it, as sent to
/// the frontend (`--local dockerfile=<dir>`, `filename=<file>`).
#[derive(Debug)]
pub struct DockerfileLocation {
    /// Absolute directory holding the Dockerfile.
    pub dir: PathBuf,
    /// File name inside `dir`.
    pub filename: String,
    /// Warnings for the user (printed on stderr by the caller).
    pub warnings: Vec<String>,
    /// Keeps the temporary directory of `-f -` alive; removed on drop.
    _stdin_dir: Option<tempfile::TempDir>,
}

const DOCKERFILE: &str = "Dockerfile";
const CONTAINERFILE: &str = "Containerfile";

/// Resolves `-f` against the working directory (not the context):
/// - absent: `<context>/Dockerfile`, falling back to `Containerfile`;
/// - `-`: stdin copied into `$TMPDIR/docker-build-tempdockerfile-XXXX/Dockerfile`;
/// - a path: split into directory and file name (empty directory = `.`).
pub fn locate(
    file: Option<&str>,
    context: &Path,
    stdin: &mut dyn Read,
) -> anyhow::Result<DockerfileLocation> {
    match file {
        None => buildkit_file(context, "", None),
        Some("-") => {
            let dir = tempfile::Builder::new()
                .prefix("docker-build-tempdockerfile-")
                .tempdir()
                .context("failed to create a temporary directory for the Dockerfile")?;
            let path = dir.path().join(DOCKERFILE);
            let mut out = std::fs::File::create(&path)
                .with_context(|| format!("failed to create {}", path.display()))?;
            std::io::copy(stdin, &mut out).context("failed to read the Dockerfile from stdin")?;
            let owned = dir.path().to_path_buf();
            buildkit_file(&owned, DOCKERFILE, Some(dir))
        }
        Some(path) => {
            let (dir, name) = split(path);
            buildkit_file(Path::new(dir), name, None)
        }
    }
}

/// Go's `filepath.Split`: everything up to and including the last `/`, and the rest;
/// an empty directory becomes `.`.
fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => (".", path),
    }
}

/// nerdctl's `BuildKitFile(dir, file)`.
fn buildkit_file(
    dir: &Path,
    file: &str,
    stdin_dir: Option<tempfile::TempDir>,
) -> anyhow::Result<DockerfileLocation> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dir = std::path::absolute(dir)
        .with_context(|| format!("failed to make {} absolute", dir.display()))?;
    let mut filename = match file {
        "" | "." => DOCKERFILE.to_string(),
        other => other.to_string(),
    };
    let mut warnings = Vec::new();
    if filename != DOCKERFILE {
        let path = dir.join(&filename);
        std::fs::symlink_metadata(&path).with_context(|| format!("lstat {}", path.display()))?;
    } else {
        let dockerfile = dir.join(DOCKERFILE);
        let containerfile = dir.join(CONTAINERFILE);
        let d = std::fs::symlink_metadata(&dockerfile);
        let c = std::fs::symlink_metadata(&containerfile);
        match (d, c) {
            (Ok(_), Ok(_)) => {
                let differ = match (std::fs::read(&dockerfile), std::fs::read(&containerfile)) {
                    (Ok(a), Ok(b)) => a != b,
                    _ => false,
                };
                if differ {
                    warnings.push(
                        "Dockerfile and Containerfile have different contents, building with Dockerfile"
                            .to_string(),
                    );
                }
            }
            (Ok(_), Err(_)) => {}
            (Err(e), c) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("Dockerfile not found, trying Containerfile");
                if let Err(e) = c {
                    return Err(e).with_context(|| format!("lstat {}", containerfile.display()));
                }
                filename = CONTAINERFILE.to_string();
            }
            (Err(e), _) => {
                return Err(e).with_context(|| format!("lstat {}", dockerfile.display()));
            }
        }
    }
    if filename.contains('/') {
        bail!("invalid Dockerfile name {filename:?}");
    }
    Ok(DockerfileLocation {
        dir,
        filename,
        warnings,
        _stdin_dir: stdin_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn empty() -> std::io::Empty {
        std::io::empty()
    }

    #[test]
    fn default_is_context_dockerfile() {
        let ctx = tempfile::tempdir().unwrap();
        fs::write(ctx.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let loc = locate(None, ctx.path(), &mut empty()).unwrap();
        assert_eq!(loc.dir, ctx.path());
        assert_eq!(loc.filename, "Dockerfile");
        assert!(loc.warnings.is_empty());
    }

    #[test]
    fn containerfile_fallback() {
        let ctx = tempfile::tempdir().unwrap();
        fs::write(ctx.path().join("Containerfile"), "FROM scratch\n").unwrap();
        let loc = locate(None, ctx.path(), &mut empty()).unwrap();
        assert_eq!(loc.filename, "Containerfile");
    }

    #[test]
    fn both_differ_warns_and_uses_dockerfile() {
        let ctx = tempfile::tempdir().unwrap();
        fs::write(ctx.path().join("Dockerfile"), "FROM a\n").unwrap();
        fs::write(ctx.path().join("Containerfile"), "FROM b\n").unwrap();
        let loc = locate(None, ctx.path(), &mut empty()).unwrap();
        assert_eq!(loc.filename, "Dockerfile");
        assert_eq!(
            loc.warnings,
            vec!["Dockerfile and Containerfile have different contents, building with Dockerfile"]
        );
        fs::write(ctx.path().join("Containerfile"), "FROM a\n").unwrap();
        assert!(locate(None, ctx.path(), &mut empty())
            .unwrap()
            .warnings
            .is_empty());
    }

    #[test]
    fn neither_exists_is_an_error_naming_containerfile() {
        let ctx = tempfile::tempdir().unwrap();
        let err = locate(None, ctx.path(), &mut empty()).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.starts_with("lstat "), "{text}");
        assert!(text.contains("Containerfile"), "{text}");
    }

    #[test]
    fn explicit_file_is_relative_to_cwd_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/app.Dockerfile"), "FROM scratch\n").unwrap();
        let path = format!("{}/sub/app.Dockerfile", dir.path().display());
        let loc = locate(Some(&path), Path::new("/nonexistent-context"), &mut empty()).unwrap();
        assert_eq!(loc.dir, dir.path().join("sub/"));
        assert_eq!(loc.filename, "app.Dockerfile");

        let missing = format!("{}/sub/missing.Dockerfile", dir.path().display());
        let err = locate(Some(&missing), Path::new("."), &mut empty()).unwrap_err();
        assert!(format!("{err:#}").contains("missing.Dockerfile"));
    }

    #[test]
    fn explicit_directory_means_its_dockerfile_with_fallback() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("Containerfile"), "FROM scratch\n").unwrap();
        let path = format!("{}/", dir.path().display());
        let loc = locate(Some(&path), Path::new("."), &mut empty()).unwrap();
        assert_eq!(loc.filename, "Containerfile");
    }

    #[test]
    fn bare_name_is_in_cwd() {
        assert_eq!(split("Dockerfile.dev"), (".", "Dockerfile.dev"));
        assert_eq!(split("a/b/c"), ("a/b/", "c"));
    }

    #[test]
    fn stdin_goes_to_a_temp_dir_removed_on_drop() {
        let mut input: &[u8] = b"FROM scratch\n";
        let loc = locate(Some("-"), Path::new("."), &mut input).unwrap();
        assert_eq!(loc.filename, "Dockerfile");
        let name = loc.dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("docker-build-tempdockerfile-"), "{name}");
        assert_eq!(
            fs::read_to_string(loc.dir.join("Dockerfile")).unwrap(),
            "FROM scratch\n"
        );
        let dir = loc.dir.clone();
        drop(loc);
        assert!(!dir.exists());
    }
}
