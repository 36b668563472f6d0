//! Pulling images from an OCI distribution registry: manifests (with platform selection in
//! indexes), configs and blobs, and pushing them. Authentication: anonymous bearer tokens, and
//! within an [`auth::scope`] basic credentials and tokens from the build's [`auth::RegistryAuth`].
//!
//! Hosts are reached over https unless [`RegistryHosts`] says otherwise; `localhost`, `127.0.0.1`
//! and `[::1]` without configuration try https first and fall back to plain http, like BuildKit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};
use serde::Deserialize;

use crate::content::{self, ContentStore};
use crate::oci::{media_types, Descriptor, ImageConfig, ImageIndex, ImageManifest, Platform};
use crate::reference::{Reference, DEFAULT_DOMAIN};
use crate::Digest;

pub mod auth;

/// Manifests and configs above this size are refused (they are read into memory).
const MAX_DOCUMENT_SIZE: usize = 16 << 20;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// A registry failure. Every variant names the image reference involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP client could not be built.
    #[error("failed to create http client")]
    Client {
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A CA certificate configured for a registry host is not valid PEM.
    #[error("invalid CA certificate for registry {host}")]
    Certificate {
        /// The registry host the certificate was configured for.
        host: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The request failed before an HTTP status was received.
    #[error("failed to fetch {url} for {reference}")]
    Request {
        /// The image (full normalized reference).
        reference: String,
        /// The URL requested.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("failed to fetch {url} for {reference}: {status}")]
    Status {
        /// The image (full normalized reference).
        reference: String,
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: StatusCode,
    },
    /// The registry refused the request for lack of (valid) credentials.
    #[error("failed to fetch {url} for {reference}: {status}: unauthorized to registry {host} (check its credentials in the client's docker config.json)")]
    Unauthorized {
        /// The image (full normalized reference).
        reference: String,
        /// The URL requested.
        url: String,
        /// The HTTP status (401 or 403).
        status: StatusCode,
        /// The registry host.
        host: String,
    },
    /// The token endpoint could not be reached or refused.
    #[error("failed to get token from {realm} for {reference}")]
    TokenRequest {
        /// The image (full normalized reference).
        reference: String,
        /// The token endpoint.
        realm: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The token endpoint answered with an error status or without a token.
    #[error("failed to get token from {realm} for {reference}: {detail}")]
    Token {
        /// The image (full normalized reference).
        reference: String,
        /// The token endpoint.
        realm: String,
        /// The status or missing field.
        detail: String,
    },
    /// The build's credential provider failed.
    #[error("registry auth for {reference} failed")]
    Auth {
        /// The image (full normalized reference).
        reference: String,
        /// The cause.
        #[source]
        source: auth::AuthError,
    },
    /// A manifest of a media type we cannot handle.
    #[error("manifest {digest} of {reference} has unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        /// The image (full normalized reference).
        reference: String,
        /// The manifest's digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// A JSON document did not parse.
    #[error("failed to parse {what} {digest} of {reference}")]
    Json {
        /// The image (full normalized reference).
        reference: String,
        /// `manifest`, `index` or `config`.
        what: &'static str,
        /// The document's digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Content does not have the digest it was asked for by.
    #[error("{what} of {reference} has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The image (full normalized reference).
        reference: String,
        /// `manifest`, `config` or `blob`.
        what: &'static str,
        /// The digest asked for.
        expected: Digest,
        /// The digest received.
        actual: Digest,
    },
    /// Content does not have the size its descriptor says.
    #[error("blob {digest} of {reference} has size {actual}, expected {expected}")]
    SizeMismatch {
        /// The image (full normalized reference).
        reference: String,
        /// The blob.
        digest: Digest,
        /// The descriptor's size.
        expected: u64,
        /// The size received.
        actual: u64,
    },
    /// A manifest or config larger than we read into memory.
    #[error("{what} of {reference} is larger than {limit} bytes")]
    TooLarge {
        /// The image (full normalized reference).
        reference: String,
        /// `manifest` or `config`.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// The index has no manifest for the wanted platform.
    #[error("no match for platform {platform} in manifest {digest} of {reference} (available: {available})")]
    NoMatchingPlatform {
        /// The image (full normalized reference).
        reference: String,
        /// The wanted platform.
        platform: String,
        /// The index digest.
        digest: Digest,
        /// The platforms the index has, comma-separated.
        available: String,
    },
    /// Storing a blob failed.
    #[error("failed to store blob {digest} of {reference}")]
    Content {
        /// The image (full normalized reference).
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: content::Error,
    },
    /// A push request failed before an HTTP status was received.
    #[error("failed to push {what} to {url} for {reference}")]
    PushRequest {
        /// The image (full normalized reference).
        reference: String,
        /// `blob sha256:...` or `manifest`.
        what: String,
        /// The URL requested.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The registry refused a push request.
    #[error("failed to push {what} to {url} for {reference}: {status}{detail}")]
    PushStatus {
        /// The image (full normalized reference).
        reference: String,
        /// `blob sha256:...` or `manifest`.
        what: String,
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the registry's error body (with a leading `: `), or empty.
        detail: String,
        /// The response's `Retry-After`, when it gave one in seconds.
        retry_after: Option<Duration>,
    },
    /// A blob to push could not be read from the content store.
    #[error("failed to read blob {digest} to push to {reference}")]
    PushContent {
        /// The image (full normalized reference).
        reference: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: content::Error,
    },
    /// The registry gave an upload location that is not a URL.
    #[error("registry gave an invalid upload location {location:?} for {reference}")]
    Location {
        /// The image (full normalized reference).
        reference: String,
        /// The `Location` header.
        location: String,
    },
}

/// Result of registry operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach one registry host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// Use plain http.
    pub http: bool,
    /// Accept any TLS certificate.
    pub insecure: bool,
}

/// Per-host settings, keyed by registry domain as written in references (`127.0.0.1:5000`,
/// `docker.io`).
#[derive(Debug, Clone, Default)]
pub struct RegistryHosts {
    hosts: BTreeMap<String, HostConfig>,
    /// Hosts reached over https without certificate checks, then over plain http.
    lenient: std::collections::BTreeSet<String>,
    /// Pull mirrors per host (`host[:port]` each), tried in order before the host itself.
    mirrors: BTreeMap<String, Vec<String>>,
    /// Extra trusted CA certificates (PEM) per host.
    cas: BTreeMap<String, Vec<Vec<u8>>>,
}

/// One way to reach a host: base URL and TLS leniency.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    base: String,
    insecure: bool,
    /// The registry domain whose settings (CA certificates) apply: the host's, or a mirror's.
    domain: String,
    /// A pull mirror: any failure falls through to the next endpoint.
    mirror: bool,
}

impl RegistryHosts {
    /// No host configured: https everywhere, http fallback for loopback hosts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the configuration of `host`.
    pub fn insert(&mut self, host: impl Into<String>, config: HostConfig) -> &mut Self {
        self.hosts.insert(host.into(), config);
        self
    }

    /// Builder form of [`insert`](Self::insert).
    pub fn with(mut self, host: impl Into<String>, config: HostConfig) -> Self {
        self.insert(host, config);
        self
    }

    /// Makes `host` lenient, as BuildKit's `registry.insecure` exporter attr does: https without
    /// certificate verification first, then plain http. Hosts configured with `http` stay http.
    pub fn allow_insecure(&mut self, host: impl Into<String>) -> &mut Self {
        self.lenient.insert(host.into());
        self
    }

    /// The configuration of `host`, if any.
    pub fn get(&self, host: &str) -> Option<&HostConfig> {
        self.hosts.get(host)
    }

    /// Sets the pull mirrors of `host` (BuildKit's `[registry."host"] mirrors`): each a
    /// registry `host[:port]`, reached with its own settings. Pulls try them in order and fall
    /// back to `host` when a mirror fails or lacks the content; pushes never use them.
    pub fn set_mirrors(&mut self, host: impl Into<String>, mirrors: Vec<String>) -> &mut Self {
        self.mirrors.insert(host.into(), mirrors);
        self
    }

    /// Trusts the PEM certificate(s) `pem` for TLS to `host` (BuildKit's `ca`), on top of the
    /// system's roots.
    pub fn add_ca(&mut self, host: impl Into<String>, pem: Vec<u8>) -> &mut Self {
        self.cas.entry(host.into()).or_default().push(pem);
        self
    }

    /// Endpoints a pull tries for `domain`: its mirrors' endpoints, then its own.
    fn pull_endpoints(&self, domain: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for mirror in self.mirrors.get(domain).into_iter().flatten() {
            out.extend(self.endpoints(mirror).into_iter().map(|mut e| {
                e.mirror = true;
                e
            }));
        }
        out.extend(self.endpoints(domain));
        out
    }

    /// Endpoints to try for `domain` itself (no mirrors), in order.
    fn endpoints(&self, domain: &str) -> Vec<Endpoint> {
        let host = if domain == DEFAULT_DOMAIN {
            "registry-1.docker.io"
        } else {
            domain
        };
        let lenient = self.lenient.contains(domain);
        match self.hosts.get(domain) {
            Some(c) if c.http => vec![Endpoint {
                base: format!("http://{host}"),
                insecure: false,
                domain: domain.to_owned(),
                mirror: false,
            }],
            _ if lenient => vec![
                Endpoint {
                    base: format!("https://{host}"),
                    insecure: true,
                    domain: domain.to_owned(),
                    mirror: false,
                },
                Endpoint {
                    base: format!("http://{host}"),
                    insecure: false,
                    domain: domain.to_owned(),
                    mirror: false,
                },
            ],
            Some(c) => vec![Endpoint {
                base: format!("https://{host}"),
                insecure: c.insecure,
                domain: domain.to_owned(),
                mirror: false,
            }],
            None if is_loopback(domain) => vec![
                Endpoint {
                    base: format!("https://{host}"),
                    insecure: false,
                    domain: domain.to_owned(),
                    mirror: false,
                },
                Endpoint {
                    base: format!("http://{host}"),
                    insecure: false,
                    domain: domain.to_owned(),
                    mirror: false,
                },
            ],
            None => vec![Endpoint {
                base: format!("https://{host}"),
                insecure: false,
                domain: domain.to_owned(),
                mirror: false,
            }],
        }
    }
}

/// `localhost`, `127.0.0.1` or `[::1]`, with or without a port.
fn is_loopback(domain: &str) -> bool {
    let host = if domain.starts_with('[') {
        domain
            .split_once(']')
            .map_or(domain, |(h, _)| h)
            .trim_start_matches('[')
    } else {
        domain.split(':').next().unwrap_or(domain)
    };
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// An image resolved to one platform's manifest, with its config.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference that was resolved (as given).
    pub reference: Reference,
    /// Digest of the platform manifest (not of the index).
    pub manifest_digest: Digest,
    /// The platform manifest.
    pub manifest: ImageManifest,
    /// Its exact bytes.
    pub manifest_bytes: Vec<u8>,
    /// The image config.
    pub config: ImageConfig,
    /// Its exact bytes.
    pub config_bytes: Vec<u8>,
}

impl ResolvedImage {
    /// Descriptor of the platform manifest.
    pub fn manifest_descriptor(&self) -> Descriptor {
        let media_type = self
            .manifest
            .media_type
            .clone()
            .unwrap_or_else(|| media_types::OCI_MANIFEST.to_owned());
        Descriptor::new(
            media_type,
            self.manifest_digest.clone(),
            self.manifest_bytes.len() as u64,
        )
    }
}

/// How one blob reached the registry in a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it (HEAD answered 200).
    Existing,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// What [`Resolver::push_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The digest of the pushed manifest or index.
    pub digest: Digest,
    /// Every config and layer blob, in push order, with how it got there.
    pub blobs: Vec<(Digest, BlobPush)>,
}

impl PushReport {
    /// How many blobs were pushed the way `how`.
    pub fn count(&self, how: BlobPush) -> usize {
        self.blobs.iter().filter(|(_, h)| *h == how).count()
    }
}

/// How pushes retry transient failures and split large blobs.
///
/// Every push request (blob HEAD, upload POST/PATCH/PUT, manifest PUT) that fails without an
/// HTTP answer or with a 5xx, 408 or 429 is tried again, at most `attempts` times in all, after
/// `initial_backoff` doubled on each failure or the registry's `Retry-After`, either capped at
/// `max_backoff`. Blobs larger than `chunk_size` are uploaded in PATCH chunks; a failed chunk
/// resumes where the registry says the upload stands (`GET <location>` → `Range: 0-N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOptions {
    /// Tries per request, the first included (at least 1).
    pub attempts: u32,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Longest wait, `Retry-After` included.
    pub max_backoff: Duration,
    /// Blobs above this many bytes go in chunks of this size (at least 1).
    pub chunk_size: u64,
}

impl Default for PushOptions {
    /// 5 attempts, 500 ms doubling up to 10 s, 32 MiB chunks (containerd's pusher also sends
    /// tens of MiB per request; smaller chunks only add round trips on a healthy link).
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            chunk_size: 32 << 20,
        }
    }
}

impl PushOptions {
    /// The wait after the `failures`-th failure (1-based): the registry's `retry_after` if it
    /// gave one, else `initial_backoff × 2^(failures-1)`; never more than `max_backoff`.
    pub fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let delay = retry_after.unwrap_or_else(|| {
            self.initial_backoff
                .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        });
        delay.min(self.max_backoff)
    }
}

/// Whether a push failure is worth one more try: no HTTP answer, or a 5xx / 408 / 429.
fn is_transient(e: &Error) -> bool {
    match e {
        Error::PushRequest { .. } => true,
        Error::PushStatus { status, .. } => is_transient_status(*status),
        _ => false,
    }
}

fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// The `Retry-After` of a refused push request.
fn retry_after_of(e: &Error) -> Option<Duration> {
    match e {
        Error::PushStatus { retry_after, .. } => *retry_after,
        _ => None,
    }
}

/// A `Retry-After` in seconds (the HTTP-date form is ignored: the backoff applies instead).
fn retry_after_header(response: &Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let seconds: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// The bytes a registry holds of an upload, from its `Range: 0-N` (N the last byte's offset).
/// `0-0` is read as nothing uploaded: distribution answers it for an empty upload, and a
/// one-byte upload is not something a chunked push leaves behind.
fn uploaded_bytes(response: &Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::RANGE)?
        .to_str()
        .ok()?;
    let value = value.trim();
    let range = value.strip_prefix("bytes=").unwrap_or(value);
    let (start, end) = range.split_once('-')?;
    let (start, end): (u64, u64) = (start.trim().parse().ok()?, end.trim().parse().ok()?);
    if start != 0 {
        return None;
    }
    Some(if end == 0 { 0 } else { end + 1 })
}

/// The `Location` of an upload response, resolved against the repository URL.
fn upload_location(
    reference: &Reference,
    repo: &str,
    response: &Response,
) -> Result<Option<reqwest::Url>> {
    let Some(location) = response.headers().get(reqwest::header::LOCATION) else {
        return Ok(None);
    };
    let bad = || Error::Location {
        reference: reference.to_string(),
        location: String::from_utf8_lossy(location.as_bytes()).into_owned(),
    };
    let location = location.to_str().map_err(|_| bad())?;
    let base = reqwest::Url::parse(&format!("{repo}/")).map_err(|_| bad())?;
    base.join(location).map(Some).map_err(|_| bad())
}

/// Resolves references and fetches blobs. Cheap to clone; remembers tokens and which loopback
/// hosts speak plain http.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    hosts: RegistryHosts,
    client: reqwest::Client,
    insecure_client: reqwest::Client,
    /// Domain → a client that also trusts the domain's configured CA certificates.
    ca_clients: HashMap<String, reqwest::Client>,
    /// `(host, scope)` → bearer token.
    tokens: Mutex<HashMap<(String, String), String>>,
    /// Domain → index of the endpoint that worked.
    working: Mutex<HashMap<String, usize>>,
    /// Retries and chunking of pushes.
    push: PushOptions,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: BTreeMap<String, String>,
}

/// Parses `Bearer realm="...",service="...",scope="..."` (quoted values may contain commas).
fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(' ' | ',')) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        chars.next()?; // '='
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

impl Resolver {
    /// A resolver for `hosts` with the default [`PushOptions`].
    pub fn new(hosts: RegistryHosts) -> Result<Self> {
        Self::with_push_options(hosts, PushOptions::default())
    }

    /// A resolver for `hosts` whose pushes retry and chunk as `push` says.
    pub fn with_push_options(hosts: RegistryHosts, push: PushOptions) -> Result<Self> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(30))
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        };
        let build = |insecure: bool| {
            builder()
                .danger_accept_invalid_certs(insecure)
                .build()
                .map_err(|source| Error::Client { source })
        };
        let mut ca_clients = HashMap::new();
        for (host, pems) in &hosts.cas {
            let certificate_error = |source| Error::Certificate {
                host: host.clone(),
                source,
            };
            let mut client = builder();
            for pem in pems {
                for certificate in
                    reqwest::Certificate::from_pem_bundle(pem).map_err(certificate_error)?
                {
                    client = client.add_root_certificate(certificate);
                }
            }
            // The certificates are only decoded here: a build failure is theirs.
            let client = client.build().map_err(certificate_error)?;
            ca_clients.insert(host.clone(), client);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                hosts,
                client: build(false)?,
                insecure_client: build(true)?,
                ca_clients,
                tokens: Mutex::new(HashMap::new()),
                working: Mutex::new(HashMap::new()),
                push: PushOptions {
                    attempts: push.attempts.max(1),
                    chunk_size: push.chunk_size.max(1),
                    ..push
                },
            }),
        })
    }

    /// Resolves `reference` to the manifest for `platform` (choosing in an index) and fetches and
    /// verifies its config.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let target = match (reference.digest(), reference.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_owned(),
            (None, None) => crate::reference::DEFAULT_TAG.to_owned(),
        };
        let (mut bytes, mut media_type) = self.fetch_manifest(reference, &target).await?;
        let mut digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest() {
            check_digest(reference, "manifest", expected, &digest)?;
        }
        if media_types::is_index(&media_type) {
            let index: ImageIndex = parse_json(reference, "index", &digest, &bytes)?;
            let chosen = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| platform.matches(p))
                        && media_types::is_manifest(&m.media_type)
                })
                .ok_or_else(|| Error::NoMatchingPlatform {
                    reference: reference.to_string(),
                    platform: platform.to_string(),
                    digest: digest.clone(),
                    available: index
                        .manifests
                        .iter()
                        .filter_map(|m| m.platform.as_ref().map(ToString::to_string))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let expected = chosen.digest.clone();
            tracing::debug!(%reference, %platform, manifest = %expected, "selected manifest from index");
            (bytes, media_type) = self
                .fetch_manifest(reference, &expected.to_string())
                .await?;
            digest = Digest::of(&bytes);
            check_digest(reference, "manifest", &expected, &digest)?;
        }
        if !media_types::is_manifest(&media_type) {
            return Err(Error::UnsupportedMediaType {
                reference: reference.to_string(),
                digest,
                media_type,
            });
        }
        let manifest: ImageManifest = parse_json(reference, "manifest", &digest, &bytes)?;
        let config_bytes = self.fetch_config(reference, &manifest.config).await?;
        let config: ImageConfig =
            parse_json(reference, "config", &manifest.config.digest, &config_bytes)?;
        // A single manifest says its platform only in its config: check it as containerd's
        // matcher does, so an amd64-only image never silently becomes an arm64 base.
        if !config.os.is_empty() && !config.architecture.is_empty() {
            let image_platform =
                Platform::new(&config.os, &config.architecture, config.variant.as_deref());
            if !platform.matches(&image_platform) {
                return Err(Error::NoMatchingPlatform {
                    reference: reference.to_string(),
                    platform: platform.to_string(),
                    digest,
                    available: image_platform.to_string(),
                });
            }
        }
        Ok(ResolvedImage {
            reference: reference.clone(),
            manifest_digest: digest,
            manifest,
            manifest_bytes: bytes,
            config,
            config_bytes,
        })
    }

    /// The manifest or index `reference` names (its digest, else its tag, else `latest`), as
    /// bytes with the media type the registry gave, without interpreting it (cache manifests
    /// are not images). A digest in the reference is verified.
    pub async fn fetch_manifest_bytes(&self, reference: &Reference) -> Result<(Vec<u8>, String)> {
        let target = match (reference.digest(), reference.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_owned(),
            (None, None) => crate::reference::DEFAULT_TAG.to_owned(),
        };
        let (bytes, media_type) = self.fetch_manifest(reference, &target).await?;
        if let Some(expected) = reference.digest() {
            check_digest(reference, "manifest", expected, &Digest::of(&bytes))?;
        }
        Ok((bytes, media_type))
    }

    /// Streams the blob `descriptor` of `reference` into `store`, verifying digest and size.
    /// Does nothing when the store already has it.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        store: &ContentStore,
    ) -> Result<()> {
        let digest = &descriptor.digest;
        if store.has(digest) {
            return Ok(());
        }
        let (url, mut response) = self
            .get(reference, &format!("blobs/{digest}"), None)
            .await?;
        let content_err = |source| Error::Content {
            reference: reference.to_string(),
            digest: digest.clone(),
            source,
        };
        let mut writer = store.writer().map_err(content_err)?;
        while let Some(chunk) = response.chunk().await.map_err(|source| Error::Request {
            reference: reference.to_string(),
            url: url.clone(),
            source,
        })? {
            std::io::Write::write_all(&mut writer, &chunk).map_err(|source| {
                content_err(content::Error::Io {
                    path: store.root().join("ingest"),
                    source,
                })
            })?;
            if writer.size() > descriptor.size {
                break;
            }
        }
        if writer.size() != descriptor.size {
            return Err(Error::SizeMismatch {
                reference: reference.to_string(),
                digest: digest.clone(),
                expected: descriptor.size,
                actual: writer.size(),
            });
        }
        match writer.commit(Some(digest)) {
            Ok(_) => {
                if let Err(e) = store.add_source(digest, &reference.name()) {
                    tracing::warn!(%digest, error = %e, "failed to record blob source");
                }
                Ok(())
            }
            Err(content::Error::DigestMismatch { expected, actual }) => {
                Err(Error::DigestMismatch {
                    reference: reference.to_string(),
                    what: "blob",
                    expected,
                    actual,
                })
            }
            Err(e) => Err(content_err(e)),
        }
    }

    /// Pushes the image or index `manifest` (whose blobs are all in `store`) to `reference`:
    /// every blob not already in the repository (config and layers, and for an index each child
    /// manifest's), then the manifest itself, under the reference's tag or, without a tag, by
    /// digest (push-by-digest).
    pub async fn push_image(
        &self,
        reference: &Reference,
        manifest: &Descriptor,
        store: &ContentStore,
    ) -> Result<PushReport> {
        let endpoint = self.push_endpoint(reference).await?;
        let mut report = PushReport {
            digest: manifest.digest.clone(),
            blobs: Vec::new(),
        };
        let bytes = self.read_for_push(reference, store, &manifest.digest)?;
        if media_types::is_index(&manifest.media_type) {
            let index: ImageIndex = parse_json(reference, "index", &manifest.digest, &bytes)?;
            for child in &index.manifests {
                let child_bytes = self.read_for_push(reference, store, &child.digest)?;
                let image: ImageManifest =
                    parse_json(reference, "manifest", &child.digest, &child_bytes)?;
                self.push_manifest_blobs(reference, &endpoint, &image, store, &mut report)
                    .await?;
                self.put_manifest(
                    reference,
                    &endpoint,
                    &child.digest.to_string(),
                    &child.media_type,
                    &child_bytes,
                )
                .await?;
            }
        } else {
            let image: ImageManifest = parse_json(reference, "manifest", &manifest.digest, &bytes)?;
            self.push_manifest_blobs(reference, &endpoint, &image, store, &mut report)
                .await?;
        }
        let target = match (reference.tag(), reference.digest()) {
            (Some(tag), _) => tag.to_owned(),
            (None, Some(digest)) if *digest != manifest.digest => {
                return Err(Error::DigestMismatch {
                    reference: reference.to_string(),
                    what: "manifest",
                    expected: digest.clone(),
                    actual: manifest.digest.clone(),
                })
            }
            (None, _) => manifest.digest.to_string(),
        };
        self.put_manifest(reference, &endpoint, &target, &manifest.media_type, &bytes)
            .await?;
        tracing::info!(%reference, digest = %manifest.digest, "pushed image");
        Ok(report)
    }

    /// Pushes one blob of `store` to the repository of `reference`: nothing when the registry
    /// has it, a cross-repository mount when the store knows the blob from another repository
    /// of the same registry, else an upload: POST then PUT, or above [`PushOptions::chunk_size`]
    /// resumable PATCH chunks; transient failures are retried as [`PushOptions`] says.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        store: &ContentStore,
    ) -> Result<BlobPush> {
        let endpoint = self.push_endpoint(reference).await?;
        self.push_blob_to(reference, &endpoint, descriptor, store)
            .await
    }

    async fn push_manifest_blobs(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        image: &ImageManifest,
        store: &ContentStore,
        report: &mut PushReport,
    ) -> Result<()> {
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            if report.blobs.iter().any(|(d, _)| *d == blob.digest) {
                continue;
            }
            let how = self.push_blob_to(reference, endpoint, blob, store).await?;
            report.blobs.push((blob.digest.clone(), how));
        }
        Ok(())
    }

    fn read_for_push(
        &self,
        reference: &Reference,
        store: &ContentStore,
        digest: &Digest,
    ) -> Result<Vec<u8>> {
        store.read(digest).map_err(|source| Error::PushContent {
            reference: reference.to_string(),
            digest: digest.clone(),
            source,
        })
    }

    /// The endpoint of `reference`'s registry that answers `GET /v2/` (any status).
    async fn push_endpoint(&self, reference: &Reference) -> Result<Endpoint> {
        let domain = reference.domain();
        let endpoints = self.inner.hosts.endpoints(domain);
        let start = self
            .lock_working()
            .get(domain)
            .copied()
            .unwrap_or(0)
            .min(endpoints.len().saturating_sub(1));
        let mut last_err = None;
        for (i, endpoint) in endpoints.iter().enumerate().skip(start) {
            let client = self.client_for(endpoint);
            let url = format!("{}/v2/", endpoint.base);
            match client.get(&url).send().await {
                Ok(_) => {
                    if i != start {
                        self.lock_working().insert(domain.to_owned(), i);
                    }
                    return Ok(endpoint.clone());
                }
                Err(source) => {
                    tracing::debug!(%reference, %url, error = %source, "endpoint failed");
                    last_err = Some(Error::Request {
                        reference: reference.to_string(),
                        url,
                        source,
                    });
                }
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Status {
            reference: reference.to_string(),
            url: domain.to_owned(),
            status: StatusCode::BAD_GATEWAY,
        }))
    }

    /// Sends a push request; maps request failures and non-success statuses to errors.
    async fn push_send(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        what: &str,
        url: &str,
        scopes: &[String],
        build: &(dyn Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder> + Sync),
    ) -> Result<Response> {
        let response = self
            .send_authorized(reference, endpoint, scopes, build)
            .await
            .map_err(|e| match e {
                SendError::Request(source) => Error::PushRequest {
                    reference: reference.to_string(),
                    what: what.to_owned(),
                    url: url.to_owned(),
                    source,
                },
                SendError::Other(e) => e,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after = retry_after_header(&response);
        let body = response.text().await.unwrap_or_default();
        let body = body.trim();
        let detail = if body.is_empty() {
            String::new()
        } else {
            format!(": {}", body.chars().take(300).collect::<String>())
        };
        Err(Error::PushStatus {
            reference: reference.to_string(),
            what: what.to_owned(),
            url: url.to_owned(),
            status,
            detail,
            retry_after,
        })
    }

    /// Runs `op` until it succeeds, fails with a non-transient error, or has been tried
    /// [`PushOptions::attempts`] times, waiting [`PushOptions::backoff`] between tries.
    async fn retrying<T, F, Fut>(&self, reference: &Reference, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let options = &self.inner.push;
        let mut failures = 0;
        loop {
            match op().await {
                Err(e) if failures + 1 < options.attempts && is_transient(&e) => {
                    failures += 1;
                    let delay = options.backoff(failures, retry_after_of(&e));
                    tracing::warn!(%reference, what, failures, ?delay, error = %e, "retrying push request");
                    tokio::time::sleep(delay).await;
                }
                result => return result,
            }
        }
    }

    async fn push_blob_to(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        descriptor: &Descriptor,
        store: &ContentStore,
    ) -> Result<BlobPush> {
        let digest = &descriptor.digest;
        let what = format!("blob {digest}");
        let repo = format!("{}/v2/{}", endpoint.base, reference.path());
        let push_scope = format!("repository:{}:pull,push", reference.path());
        let record = || {
            if let Err(e) = store.add_source(digest, &reference.name()) {
                tracing::warn!(%digest, error = %e, "failed to record blob source");
            }
        };

        let head_url = format!("{repo}/blobs/{digest}");
        let exists = self
            .retrying(reference, &what, || async {
                let response = self
                    .send_authorized(
                        reference,
                        endpoint,
                        std::slice::from_ref(&push_scope),
                        &|c| Ok(c.head(&head_url)),
                    )
                    .await
                    .map_err(|e| match e {
                        SendError::Request(source) => Error::PushRequest {
                            reference: reference.to_string(),
                            what: what.clone(),
                            url: head_url.clone(),
                            source,
                        },
                        SendError::Other(e) => e,
                    })?;
                let status = response.status();
                if is_transient_status(status) {
                    return Err(Error::PushStatus {
                        reference: reference.to_string(),
                        what: what.clone(),
                        url: head_url.clone(),
                        status,
                        detail: String::new(),
                        retry_after: retry_after_header(&response),
                    });
                }
                Ok(status.is_success())
            })
            .await;
        match exists {
            Ok(true) => {
                tracing::debug!(%reference, %digest, "blob already in the registry");
                record();
                return Ok(BlobPush::Existing);
            }
            Ok(false) => {}
            // The upload decides: it has its own retries and a clearer error.
            Err(e) => tracing::debug!(%reference, %digest, error = %e, "blob HEAD failed"),
        }

        // Cross-repository mount from a repository of the same registry that has the blob.
        let mount_from = store.sources(digest).into_iter().find_map(|source| {
            let (domain, path) = source.split_once('/')?;
            (domain == reference.domain() && path != reference.path()).then(|| path.to_owned())
        });
        let mut location = None;
        if let Some(from) = &mount_from {
            let url = format!("{repo}/blobs/uploads/?mount={digest}&from={from}");
            let scopes = [push_scope.clone(), format!("repository:{from}:pull")];
            match self
                .push_send(reference, endpoint, &what, &url, &scopes, &|c| {
                    Ok(c.post(&url).header(reqwest::header::CONTENT_LENGTH, "0"))
                })
                .await
            {
                Ok(response) if response.status() == StatusCode::CREATED => {
                    tracing::debug!(%reference, %digest, %from, "mounted blob");
                    record();
                    return Ok(BlobPush::Mounted);
                }
                // 202: the registry did not mount but opened an upload.
                Ok(response) => location = upload_location(reference, &repo, &response)?,
                Err(e) => tracing::debug!(%reference, %digest, error = %e, "mount failed"),
            }
        }

        self.retrying(reference, &what, || {
            self.upload(reference, endpoint, descriptor, store, location.take())
        })
        .await?;
        record();
        Ok(BlobPush::Uploaded)
    }

    /// One upload: POST (unless `location` is already open), then either PUT with the whole blob
    /// or, above [`PushOptions::chunk_size`], PATCH chunks and an empty PUT.
    async fn upload(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        descriptor: &Descriptor,
        store: &ContentStore,
        location: Option<reqwest::Url>,
    ) -> Result<()> {
        let digest = &descriptor.digest;
        let what = format!("blob {digest}");
        let scopes = [format!("repository:{}:pull,push", reference.path())];
        let mut location = match location {
            Some(l) => l,
            None => self.start_upload(reference, endpoint, &what).await?,
        };
        let size = store.info(digest).map_err(|source| Error::PushContent {
            reference: reference.to_string(),
            digest: digest.clone(),
            source,
        })?;
        if size > self.inner.push.chunk_size {
            return self
                .upload_chunks(reference, endpoint, descriptor, store, location, size)
                .await;
        }
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let url = location.to_string();
        self.push_send(reference, endpoint, &what, &url, &scopes, &|c| {
            let file = store
                .open_blob(digest)
                .map_err(|source| Error::PushContent {
                    reference: reference.to_string(),
                    digest: digest.clone(),
                    source,
                })?;
            Ok(c.put(&url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, size.to_string())
                .body(reqwest::Body::from(tokio::fs::File::from_std(file))))
        })
        .await?;
        tracing::debug!(%reference, %digest, size, "uploaded blob");
        Ok(())
    }

    /// Opens an upload session (POST) and returns its location.
    async fn start_upload(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        what: &str,
    ) -> Result<reqwest::Url> {
        let repo = format!("{}/v2/{}", endpoint.base, reference.path());
        let scopes = [format!("repository:{}:pull,push", reference.path())];
        let url = format!("{repo}/blobs/uploads/");
        let response = self
            .push_send(reference, endpoint, what, &url, &scopes, &|c| {
                Ok(c.post(&url).header(reqwest::header::CONTENT_LENGTH, "0"))
            })
            .await?;
        upload_location(reference, &repo, &response)?.ok_or_else(|| Error::Location {
            reference: reference.to_string(),
            location: String::new(),
        })
    }

    /// A chunked upload into the open session `location`: PATCH chunks of
    /// [`PushOptions::chunk_size`] with `Content-Range`, then PUT `?digest=` with no body.
    ///
    /// A chunk that fails transiently is not simply sent again: after the backoff the session's
    /// status (`GET <location>`, `Range: 0-N`) says how much the registry kept, and the upload
    /// continues from byte N+1 — which may be inside the failed chunk. A session the registry no
    /// longer knows (distribution cancels one whose PATCH it half-received) is replaced by a new
    /// one from byte 0. Chunk failures count against [`PushOptions::attempts`] within one call;
    /// the caller retries the whole upload at most that many times again, so the number of
    /// requests stays bounded (attempts² chunk failures at worst).
    async fn upload_chunks(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        descriptor: &Descriptor,
        store: &ContentStore,
        mut location: reqwest::Url,
        size: u64,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;

        let digest = &descriptor.digest;
        let what = format!("blob {digest}");
        let repo = format!("{}/v2/{}", endpoint.base, reference.path());
        let scopes = [format!("repository:{}:pull,push", reference.path())];
        let content_err = |source| Error::PushContent {
            reference: reference.to_string(),
            digest: digest.clone(),
            source,
        };
        let file = store.open_blob(digest).map_err(content_err)?;
        let options = &self.inner.push;
        let mut offset = 0u64;
        let mut failures = 0u32;
        while offset < size {
            let end = (offset + options.chunk_size).min(size);
            let mut chunk = vec![0u8; (end - offset) as usize];
            file.read_exact_at(&mut chunk, offset).map_err(|source| {
                content_err(content::Error::Io {
                    path: store.path(digest),
                    source,
                })
            })?;
            let url = location.to_string();
            let sent = self
                .push_send(reference, endpoint, &what, &url, &scopes, &|c| {
                    Ok(c.patch(&url)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(
                            reqwest::header::CONTENT_RANGE,
                            format!("{offset}-{}", end - 1),
                        )
                        .header(reqwest::header::CONTENT_LENGTH, chunk.len().to_string())
                        .body(chunk.clone()))
                })
                .await;
            match sent {
                Ok(response) => {
                    if let Some(next) = upload_location(reference, &repo, &response)? {
                        location = next;
                    }
                    offset = end;
                }
                Err(e) if failures + 1 < options.attempts && is_transient(&e) => {
                    failures += 1;
                    let delay = options.backoff(failures, retry_after_of(&e));
                    tracing::warn!(%reference, %digest, offset, failures, ?delay, error = %e, "chunk failed; resuming the upload");
                    tokio::time::sleep(delay).await;
                    match self
                        .upload_status(reference, endpoint, &what, &location)
                        .await
                    {
                        Ok((next, uploaded)) if uploaded <= size => {
                            location = next;
                            offset = uploaded;
                        }
                        status => {
                            tracing::warn!(%reference, %digest, status = ?status.map(|(_, n)| n), "upload session lost; starting over");
                            location = self.start_upload(reference, endpoint, &what).await?;
                            offset = 0;
                        }
                    }
                    tracing::debug!(%reference, %digest, offset, "upload resumes");
                }
                Err(e) => return Err(e),
            }
        }
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let url = location.to_string();
        self.push_send(reference, endpoint, &what, &url, &scopes, &|c| {
            Ok(c.put(&url)
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, "0"))
        })
        .await?;
        tracing::debug!(%reference, %digest, size, failures, "uploaded blob in chunks");
        Ok(())
    }

    /// An upload session's status: its (possibly new) location and the bytes the registry has.
    async fn upload_status(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        what: &str,
        location: &reqwest::Url,
    ) -> Result<(reqwest::Url, u64)> {
        let repo = format!("{}/v2/{}", endpoint.base, reference.path());
        let scopes = [format!("repository:{}:pull,push", reference.path())];
        let url = location.to_string();
        let response = self
            .push_send(reference, endpoint, what, &url, &scopes, &|c| {
                Ok(c.get(&url))
            })
            .await?;
        let uploaded = uploaded_bytes(&response).unwrap_or(0);
        let next =
            upload_location(reference, &repo, &response)?.unwrap_or_else(|| location.clone());
        Ok((next, uploaded))
    }

    async fn put_manifest(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        target: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let url = format!(
            "{}/v2/{}/manifests/{target}",
            endpoint.base,
            reference.path()
        );
        let scopes = [format!("repository:{}:pull,push", reference.path())];
        let build = |c: &reqwest::Client| {
            Ok(c.put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(bytes.to_vec()))
        };
        self.retrying(reference, "manifest", || {
            self.push_send(reference, endpoint, "manifest", &url, &scopes, &build)
        })
        .await?;
        Ok(())
    }

    async fn fetch_manifest(
        &self,
        reference: &Reference,
        target: &str,
    ) -> Result<(Vec<u8>, String)> {
        let (url, response) = self
            .get(
                reference,
                &format!("manifests/{target}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        let header_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let bytes = read_limited(reference, "manifest", &url, response).await?;
        // The body's own mediaType wins; registries may answer with a generic content type.
        #[derive(Deserialize)]
        struct Probe {
            #[serde(rename = "mediaType", default)]
            media_type: Option<String>,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
            #[serde(default)]
            config: Option<serde_json::Value>,
        }
        let probe: Option<Probe> = serde_json::from_slice(&bytes).ok();
        let media_type = match probe {
            Some(Probe {
                media_type: Some(m),
                ..
            }) => m,
            Some(Probe {
                manifests: Some(_), ..
            }) => media_types::OCI_INDEX.to_owned(),
            Some(Probe {
                config: Some(_), ..
            }) => media_types::OCI_MANIFEST.to_owned(),
            _ => header_type.unwrap_or_default(),
        };
        Ok((bytes, media_type))
    }

    async fn fetch_config(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
    ) -> Result<Vec<u8>> {
        let (url, response) = self
            .get(reference, &format!("blobs/{}", descriptor.digest), None)
            .await?;
        let bytes = read_limited(reference, "config", &url, response).await?;
        check_digest(reference, "config", &descriptor.digest, &Digest::of(&bytes))?;
        Ok(bytes)
    }

    /// GET `/v2/<path>/<suffix>` on the first endpoint that answers, with token auth; fails on a
    /// non-success status.
    async fn get(
        &self,
        reference: &Reference,
        suffix: &str,
        accept: Option<&str>,
    ) -> Result<(String, Response)> {
        let domain = reference.domain();
        let endpoints = self.inner.hosts.pull_endpoints(domain);
        // Indexes into the pull list (mirrors included) are kept apart from the push list's.
        let working_key = format!("{domain} (pull)");
        let start = self
            .lock_working()
            .get(&working_key)
            .copied()
            .unwrap_or(0)
            .min(endpoints.len().saturating_sub(1));
        let mut last_err = None;
        // Whether a mirror that answered was passed over: the endpoint that worked then is
        // only right for this content, not to be remembered for the domain.
        let mut passed_mirror = false;
        for (i, endpoint) in endpoints.iter().enumerate().skip(start) {
            let url = format!("{}/v2/{}/{}", endpoint.base, reference.path(), suffix);
            let answer = self.get_authorized(reference, endpoint, &url, accept).await;
            if endpoint.mirror {
                match answer.and_then(|response| check_status(reference, url.clone(), response)) {
                    Ok(found) => {
                        tracing::debug!(%reference, %url, "served by mirror");
                        return Ok(found);
                    }
                    Err(e) => {
                        tracing::debug!(%reference, %url, error = %e, "mirror failed, trying the next endpoint");
                        passed_mirror |= !matches!(e, Error::Request { .. });
                        last_err = Some(e);
                        continue;
                    }
                }
            }
            match answer {
                Ok(response) => {
                    if i != start && !passed_mirror {
                        self.lock_working().insert(working_key, i);
                    }
                    return check_status(reference, url, response);
                }
                Err(e @ Error::Request { .. }) if i + 1 < endpoints.len() => {
                    tracing::debug!(%reference, %url, error = %e, "endpoint failed, trying the next one");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Status {
            reference: reference.to_string(),
            url: domain.to_owned(),
            status: StatusCode::BAD_GATEWAY,
        }))
    }

    /// The HTTP client for `endpoint`: no certificate checks for an insecure one, the
    /// domain's configured CAs trusted when it has some.
    fn client_for(&self, endpoint: &Endpoint) -> &reqwest::Client {
        if endpoint.insecure {
            &self.inner.insecure_client
        } else {
            self.inner
                .ca_clients
                .get(&endpoint.domain)
                .unwrap_or(&self.inner.client)
        }
    }

    fn lock_working(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner.working.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.inner.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn get_authorized(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response> {
        let scopes = [format!("repository:{}:pull", reference.path())];
        self.send_authorized(reference, endpoint, &scopes, &|client| {
            let mut request = client.get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            Ok(request)
        })
        .await
        .map_err(|e| match e {
            SendError::Request(source) => Error::Request {
                reference: reference.to_string(),
                url: url.to_owned(),
                source,
            },
            SendError::Other(e) => e,
        })
    }

    /// Sends the request `build` makes, with the cached authorization for `scopes` if there is
    /// one; on a 401 answers the challenge once and sends a new request:
    /// - `Bearer`: a token from the build's [`auth::RegistryAuth`] when the task runs in an
    ///   [`auth::scope`] and the provider gives one, else an anonymous token (for the
    ///   challenge's scope and `scopes`);
    /// - `Basic`: the provider's credentials for the host (no scope or no credentials: the 401
    ///   is returned).
    ///
    /// The status is not checked.
    async fn send_authorized(
        &self,
        reference: &Reference,
        endpoint: &Endpoint,
        scopes: &[String],
        build: &(dyn Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder> + Sync),
    ) -> Result<Response, SendError> {
        let client = self.client_for(endpoint);
        let scope = auth::current();
        let host = endpoint_host(&endpoint.base);
        let key = (endpoint.base.clone(), scopes.join(" "));
        let send = |authorization: Option<Authorization>| async move {
            let mut request = build(client).map_err(SendError::Other)?;
            match authorization {
                Some(Authorization::Bearer(token)) => request = request.bearer_auth(token),
                Some(Authorization::Basic(c)) => {
                    request = request.basic_auth(c.username, Some(c.secret))
                }
                None => {}
            }
            request.send().await.map_err(SendError::Request)
        };
        let cached = match &scope {
            Some(scope) => {
                let token = scope.lock_tokens().get(&key).cloned();
                match token {
                    Some(token) => Some(Authorization::Bearer(token)),
                    None => scope
                        .lock_basic()
                        .get(host)
                        .cloned()
                        .flatten()
                        .map(Authorization::Basic),
                }
            }
            None => self
                .lock_tokens()
                .get(&key)
                .cloned()
                .map(Authorization::Bearer),
        };
        let sent_basic = matches!(cached, Some(Authorization::Basic(_)));
        let response = send(cached).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenges: Vec<Challenge> = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v: &HeaderValue| v.to_str().ok())
            .filter_map(parse_challenge)
            .collect();
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        let Some(challenge) = bearer else {
            if sent_basic || !challenges.iter().any(|c| c.scheme == "basic") {
                return Ok(response);
            }
            let Some(scope) = &scope else {
                return Ok(response);
            };
            let credentials = scope
                .credentials(host)
                .await
                .map_err(|source| Error::Auth {
                    reference: reference.to_string(),
                    source,
                })?;
            let Some(credentials) = credentials else {
                tracing::debug!(%reference, host, "no credentials for basic challenge");
                return Ok(response);
            };
            tracing::debug!(%reference, host, "answering basic challenge with the build's credentials");
            return send(Some(Authorization::Basic(credentials))).await;
        };
        let Some(realm) = challenge.params.get("realm").cloned() else {
            return Ok(response);
        };
        let mut wanted: Vec<String> = Vec::new();
        if let Some(scope) = challenge.params.get("scope") {
            wanted.extend(scope.split(' ').map(str::to_owned));
        }
        for scope in scopes {
            if !wanted.contains(scope) {
                wanted.push(scope.clone());
            }
        }
        let service = challenge.params.get("service").cloned().unwrap_or_default();
        let mut token = None;
        if let Some(scope) = &scope {
            let request = auth::TokenRequest {
                host: host.to_owned(),
                realm: realm.clone(),
                service: service.clone(),
                scopes: wanted.clone(),
            };
            tracing::debug!(%reference, %realm, scopes = ?wanted, "fetching bearer token through the build's registry auth");
            token = scope
                .provider
                .fetch_token(&request)
                .await
                .map_err(|source| Error::Auth {
                    reference: reference.to_string(),
                    source,
                })?
                .filter(|t| !t.is_empty());
        }
        let token = match token {
            Some(token) => token,
            None => {
                self.anonymous_token(reference, client, &realm, &service, &wanted)
                    .await?
            }
        };
        match &scope {
            Some(scope) => scope.lock_tokens().insert(key, token.clone()),
            None => self.lock_tokens().insert(key, token.clone()),
        };
        send(Some(Authorization::Bearer(token))).await
    }

    /// GET `realm?service=&scope=…` without credentials.
    async fn anonymous_token(
        &self,
        reference: &Reference,
        client: &reqwest::Client,
        realm: &str,
        service: &str,
        scopes: &[String],
    ) -> Result<String> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if !service.is_empty() {
            query.push(("service", service));
        }
        for scope in scopes {
            query.push(("scope", scope));
        }
        tracing::debug!(%reference, %realm, ?scopes, "fetching anonymous bearer token");
        let token_response = client
            .get(realm)
            .query(&query)
            .send()
            .await
            .map_err(|source| Error::TokenRequest {
                reference: reference.to_string(),
                realm: realm.to_owned(),
                source,
            })?;
        let status = token_response.status();
        if !status.is_success() {
            return Err(Error::Token {
                reference: reference.to_string(),
                realm: realm.to_owned(),
                detail: status.to_string(),
            });
        }
        let body = token_response
            .bytes()
            .await
            .map_err(|source| Error::TokenRequest {
                reference: reference.to_string(),
                realm: realm.to_owned(),
                source,
            })?;
        serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(|t| t.token.or(t.access_token))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Token {
                reference: reference.to_string(),
                realm: realm.to_owned(),
                detail: "response has no token".to_owned(),
            })
    }
}

/// What a request carries in its `Authorization` header.
enum Authorization {
    Bearer(String),
    Basic(auth::BasicCredentials),
}

/// `host[:port]` of an endpoint base URL (`http://127.0.0.1:5000` → `127.0.0.1:5000`): the
/// name credentials are asked for, as BuildKit does.
fn endpoint_host(base: &str) -> &str {
    base.split_once("://").map_or(base, |(_, rest)| rest)
}

/// Why [`Resolver::send_authorized`] failed: the request itself (the caller adds context) or
/// anything else (already a full [`Error`]).
enum SendError {
    Request(reqwest::Error),
    Other(Error),
}

impl From<Error> for SendError {
    fn from(e: Error) -> Self {
        Self::Other(e)
    }
}

fn check_status(
    reference: &Reference,
    url: String,
    response: Response,
) -> Result<(String, Response)> {
    let status = response.status();
    if status.is_success() {
        return Ok((url, response));
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(Error::Unauthorized {
            reference: reference.to_string(),
            host: reference.domain().to_owned(),
            url,
            status,
        });
    }
    Err(Error::Status {
        reference: reference.to_string(),
        url,
        status,
    })
}

async fn read_limited(
    reference: &Reference,
    what: &'static str,
    url: &str,
    mut response: Response,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|source| Error::Request {
        reference: reference.to_string(),
        url: url.to_owned(),
        source,
    })? {
        if out.len() + chunk.len() > MAX_DOCUMENT_SIZE {
            return Err(Error::TooLarge {
                reference: reference.to_string(),
                what,
                limit: MAX_DOCUMENT_SIZE,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn check_digest(
    reference: &Reference,
    what: &'static str,
    expected: &Digest,
    actual: &Digest,
) -> Result<()> {
    if expected == actual {
        return Ok(());
    }
    Err(Error::DigestMismatch {
        reference: reference.to_string(),
        what,
        expected: expected.clone(),
        actual: actual.clone(),
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(
    reference: &Reference,
    what: &'static str,
    digest: &Digest,
    bytes: &[u8],
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        reference: reference.to_string(),
        what,
        digest: digest.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_host_config_and_loopback_fallback() {
        let hosts = RegistryHosts::new()
            .with(
                "reg.example:5000",
                HostConfig {
                    http: true,
                    insecure: false,
                },
            )
            .with(
                "self.example",
                HostConfig {
                    http: false,
                    insecure: true,
                },
            );
        let bases = |d: &str| {
            hosts
                .endpoints(d)
                .into_iter()
                .map(|e| e.base)
                .collect::<Vec<_>>()
        };
        assert_eq!(bases("reg.example:5000"), ["http://reg.example:5000"]);
        assert_eq!(bases("ghcr.io"), ["https://ghcr.io"]);
        assert_eq!(bases("docker.io"), ["https://registry-1.docker.io"]);
        assert_eq!(
            bases("127.0.0.1:5000"),
            ["https://127.0.0.1:5000", "http://127.0.0.1:5000"]
        );
        assert_eq!(
            bases("localhost"),
            ["https://localhost", "http://localhost"]
        );
        assert_eq!(
            bases("[::1]:5000"),
            ["https://[::1]:5000", "http://[::1]:5000"]
        );
        assert_eq!(bases("127.0.0.2:5000"), ["https://127.0.0.2:5000"]);
        assert!(hosts.endpoints("self.example")[0].insecure);
    }

    #[test]
    fn mirrors_come_first_for_pulls_only_with_their_own_settings() {
        let mut hosts = RegistryHosts::new().with(
            "mirror.example",
            HostConfig {
                http: true,
                insecure: false,
            },
        );
        hosts.set_mirrors(
            "docker.io",
            vec!["mirror.example".into(), "127.0.0.1:5000".into()],
        );
        let pull: Vec<(String, bool, String)> = hosts
            .pull_endpoints("docker.io")
            .into_iter()
            .map(|e| (e.base, e.mirror, e.domain))
            .collect();
        let row = |b: &str, m: bool, d: &str| (b.to_string(), m, d.to_string());
        assert_eq!(
            pull,
            [
                row("http://mirror.example", true, "mirror.example"),
                row("https://127.0.0.1:5000", true, "127.0.0.1:5000"),
                row("http://127.0.0.1:5000", true, "127.0.0.1:5000"),
                row("https://registry-1.docker.io", false, "docker.io"),
            ]
        );
        assert!(hosts.endpoints("docker.io").iter().all(|e| !e.mirror));
        assert_eq!(hosts.pull_endpoints("ghcr.io").len(), 1);
    }

    #[test]
    fn invalid_ca_is_an_error_naming_the_host() {
        let mut hosts = RegistryHosts::new();
        hosts.add_ca(
            "reg.example",
            b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec(),
        );
        let error = Resolver::new(hosts).err().expect("invalid PEM accepted");
        assert_eq!(
            error.to_string(),
            "invalid CA certificate for registry reg.example"
        );
    }

    #[test]
    fn push_backoff_doubles_honours_retry_after_and_is_capped() {
        let options = PushOptions {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            chunk_size: 1,
        };
        let ms = Duration::from_millis;
        assert_eq!(options.backoff(1, None), ms(100));
        assert_eq!(options.backoff(2, None), ms(200));
        assert_eq!(options.backoff(4, None), ms(800));
        assert_eq!(options.backoff(5, None), ms(1000));
        assert_eq!(options.backoff(40, None), ms(1000));
        assert_eq!(options.backoff(1, Some(ms(300))), ms(300));
        assert_eq!(options.backoff(1, Some(Duration::from_secs(120))), ms(1000));
    }

    #[test]
    fn bearer_challenge_parsing() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["service"], "registry.example");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let c = parse_challenge(r#"Basic realm="Registry""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry");
    }
}
