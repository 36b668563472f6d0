//! Image references with docker's normalisation (`foo` → `docker.io/library/foo:latest`).

use std::fmt;
use std::str::FromStr;

use crate::{Digest, DigestError};

/// The default registry domain.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// The namespace of official images on the default domain.
pub const OFFICIAL_NAMESPACE: &str = "library";
/// The tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LENGTH: usize = 255;
const MAX_TAG_LENGTH: usize = 128;

/// A reference that could not be parsed. Every message starts with `invalid reference format`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The input is empty.
    #[error("invalid reference format: empty reference")]
    Empty,
    /// The repository name has uppercase letters.
    #[error("invalid reference format: repository name ({name}) must be lowercase")]
    Uppercase {
        /// The offending repository name.
        name: String,
    },
    /// The name is a 64-hex-digit string (an image id, not a name).
    #[error(
        "invalid reference format: repository name ({name}) cannot be a 64-byte hexadecimal string"
    )]
    HexName {
        /// The offending name.
        name: String,
    },
    /// The domain/path part is malformed.
    #[error("invalid reference format: invalid repository name {name:?} in {input:?}")]
    Name {
        /// The whole input.
        input: String,
        /// The offending name.
        name: String,
    },
    /// The name is longer than 255 characters.
    #[error("invalid reference format: repository name {name:?} is longer than 255 characters")]
    NameTooLong {
        /// The offending name.
        name: String,
    },
    /// The tag is malformed.
    #[error("invalid reference format: invalid tag {tag:?} in {input:?}")]
    Tag {
        /// The whole input.
        input: String,
        /// The offending tag.
        tag: String,
    },
    /// The digest is malformed.
    #[error("invalid reference format: invalid digest in {input:?}")]
    Digest {
        /// The whole input.
        input: String,
        /// Why the digest is invalid.
        #[source]
        source: DigestError,
    },
}

/// A normalized image reference: domain, repository path, optional tag and digest.
///
/// A reference parsed without tag or digest gets the tag `latest`; a digest-only reference keeps no
/// tag.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses `input` the way docker does (`ParseNormalizedNamed` + `TagNameOnly`).
    ///
    /// `foo` → `docker.io/library/foo:latest`, `user/foo` → `docker.io/user/foo:latest`,
    /// `127.0.0.1:5000/busybox` → `127.0.0.1:5000/busybox:latest`; `name:tag@sha256:...` keeps both.
    pub fn parse_normalized(input: &str) -> Result<Self, ParseError> {
        if input.is_empty() {
            return Err(ParseError::Empty);
        }
        if is_hex64(input) {
            return Err(ParseError::HexName {
                name: input.to_owned(),
            });
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                let digest = d.parse::<Digest>().map_err(|source| ParseError::Digest {
                    input: input.to_owned(),
                    source,
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // A tag is the part after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(&rest[at + 1..]))
            }
            None => (rest, None),
        };
        if let Some(tag) = tag {
            if !is_valid_tag(tag) {
                return Err(ParseError::Tag {
                    input: input.to_owned(),
                    tag: tag.to_owned(),
                });
            }
        }
        let (domain, path) = split_domain(name);
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ParseError::Uppercase {
                name: path.to_owned(),
            });
        }
        let bad_name = || ParseError::Name {
            input: input.to_owned(),
            name: name.to_owned(),
        };
        if !is_valid_domain(domain) || !path.split('/').all(is_valid_path_component) {
            return Err(bad_name());
        }
        let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
            format!("{OFFICIAL_NAMESPACE}/{path}")
        } else {
            path.to_owned()
        };
        if domain.len() + 1 + path.len() > MAX_NAME_LENGTH {
            return Err(ParseError::NameTooLong {
                name: name.to_owned(),
            });
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Self {
            domain: domain.to_owned(),
            path,
            tag,
            digest,
        })
    }

    /// The registry domain (`docker.io`, `127.0.0.1:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path without domain (`library/busybox`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `domain/path`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The same reference pinned to `digest` (the tag is kept).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same reference with `tag` instead of its tag, and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ParseError> {
        if !is_valid_tag(tag) {
            return Err(ParseError::Tag {
                input: self.to_string(),
                tag: tag.to_owned(),
            });
        }
        Ok(Self {
            tag: Some(tag.to_owned()),
            digest: None,
            ..self.clone()
        })
    }

    /// The short form docker shows: `docker.io/library/foo:latest` → `foo:latest`,
    /// `docker.io/user/foo:1` → `user/foo:1`; other domains are kept.
    pub fn familiar(&self) -> String {
        let mut out = if self.domain == DEFAULT_DOMAIN {
            match self.path.strip_prefix("library/") {
                Some(rest) if !rest.contains('/') => rest.to_owned(),
                _ => self.path.clone(),
            }
        } else {
            self.name()
        };
        self.push_suffix(&mut out);
        out
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
    }
}

impl FromStr for Reference {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_normalized(s)
    }
}

impl fmt::Display for Reference {
    /// The full normalized form `domain/path[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name();
        self.push_suffix(&mut out);
        f.write_str(&out)
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

/// Docker's `splitDockerDomain`: the first component is a domain when it has a `.` or `:`, is
/// `localhost`, or has uppercase letters (which paths cannot have).
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            if first == "index.docker.io" {
                (DEFAULT_DOMAIN, rest)
            } else {
                (first, rest)
            }
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `[\w][\w.-]{0,127}`.
fn is_valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LENGTH
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        // One run of alphanumerics.
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        // One separator.
        let sep_start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[sep_start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
}

/// `host[:port]` where host is dot-separated `[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?` labels or a
/// bracketed IPv6 address.
fn is_valid_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.is_empty()
            || !ip
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match domain.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    match host {
        None => true,
        Some(host) => {
            !host.is_empty()
                && host.split('.').all(|label| {
                    let b = label.as_bytes();
                    !b.is_empty()
                        && b[0].is_ascii_alphanumeric()
                        && b[b.len() - 1].is_ascii_alphanumeric()
                        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn norm(s: &str) -> String {
        Reference::parse_normalized(s).unwrap().to_string()
    }

    #[test]
    fn normalisation_table() {
        let cases = [
            ("foo", "docker.io/library/foo:latest"),
            ("foo:1.2", "docker.io/library/foo:1.2"),
            ("user/foo", "docker.io/user/foo:latest"),
            ("docker.io/foo", "docker.io/library/foo:latest"),
            ("index.docker.io/user/foo:x", "docker.io/user/foo:x"),
            ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
            ("localhost/x", "localhost/x:latest"),
            ("localhost:5000/a/b/c:t", "localhost:5000/a/b/c:t"),
            ("[::1]:5000/img", "[::1]:5000/img:latest"),
            ("ghcr.io/o/r", "ghcr.io/o/r:latest"),
            ("docker.io/a-b__c.d/e", "docker.io/a-b__c.d/e:latest"),
            ("u/a-b__c.d---e", "docker.io/u/a-b__c.d---e:latest"),
            (
                "my-reg.example.com:443/x/y",
                "my-reg.example.com:443/x/y:latest",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), want, "{input}");
        }
    }

    #[test]
    fn tags_and_digests() {
        let r = Reference::parse_normalized(&format!("foo@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/foo@{D}"));
        let r = Reference::parse_normalized(&format!("127.0.0.1:5000/busybox:1@{D}")).unwrap();
        assert_eq!(r.domain(), "127.0.0.1:5000");
        assert_eq!(r.path(), "busybox");
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.name(), "127.0.0.1:5000/busybox");
        let r = Reference::parse_normalized("foo").unwrap();
        let pinned = r.with_digest(D.parse().unwrap());
        assert_eq!(
            pinned.to_string(),
            format!("docker.io/library/foo:latest@{D}")
        );
        assert_eq!(
            pinned.with_tag("2").unwrap().to_string(),
            "docker.io/library/foo:2"
        );
    }

    #[test]
    fn familiar_names() {
        let f = |s: &str| Reference::parse_normalized(s).unwrap().familiar();
        assert_eq!(f("foo"), "foo:latest");
        assert_eq!(f("docker.io/library/foo:1"), "foo:1");
        assert_eq!(f("user/foo"), "user/foo:latest");
        assert_eq!(f("docker.io/library/a/b"), "library/a/b:latest");
        assert_eq!(f("127.0.0.1:5000/busybox"), "127.0.0.1:5000/busybox:latest");
    }

    #[test]
    fn invalid_references_have_clear_errors() {
        let bad = [
            "",
            "Foo",
            "foo:",
            "foo:-x",
            "foo::1",
            "foo@sha256:abc",
            "foo@md5:abc",
            "foo/",
            "/foo",
            "foo//bar",
            "foo..bar",
            "-foo",
            "foo_",
            "host:port/x",
            "a:b:c/d",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "foo bar",
            "a_b.c/d",
        ];
        for input in bad {
            let err = Reference::parse_normalized(input).expect_err(input);
            assert!(
                err.to_string().starts_with("invalid reference format"),
                "{input}: {err}"
            );
        }
        let err = Reference::parse_normalized("docker.io/Foo").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid reference format: repository name (Foo) must be lowercase"
        );
        let long = format!("a/{}", "b".repeat(260));
        assert!(matches!(
            Reference::parse_normalized(&long),
            Err(ParseError::NameTooLong { .. })
        ));
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(Reference::parse_normalized(&long_tag).is_err());
    }
}
