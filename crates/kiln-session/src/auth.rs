//! `moby.filesync.v1.Auth`: registry credentials from the client's docker config.
//!
//! Client end: [`DockerConfig`] reads `config.json` as docker and nerdctl do
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; `auths."<host>"` with `auth`
//! (base64 `user:password`), `username`/`password` or `identitytoken`; `credHelpers`/`credsStore`
//! run `docker-credential-<name> get`), and [`AuthService`] serves it: `Credentials` answers the
//! host's credentials (empty when there are none, as buildctl does), `FetchToken` performs the
//! token request itself (GET with basic auth, POST `grant_type=refresh_token` with an identity
//! token, anonymous GET without credentials) so only the token travels to the daemon.
//! `GetTokenAuthority`/`VerifyTokenAuthority` answer Unimplemented: kiln has no token seed.
//!
//! The config is read at every request, so a `docker login` during a session counts and a
//! broken config only fails builds that need credentials.
//!
//! Daemon end: [`credentials`] and [`fetch_token`] call the service over a session channel;
//! both give `None` when the client does not serve it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use kiln_proto::moby::filesync::v1::auth_client::AuthClient;
use kiln_proto::moby::filesync::v1::auth_server::{Auth, AuthServer};
use kiln_proto::moby::filesync::v1::{
    CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse,
    GetTokenAuthorityRequest, GetTokenAuthorityResponse, VerifyTokenAuthorityRequest,
    VerifyTokenAuthorityResponse,
};
use serde::Deserialize;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::{Error, MAX_MESSAGE_SIZE};

/// The methods [`AuthService`] serves, as advertised in the session header.
pub const METHODS: [&str; 4] = [
    "/moby.filesync.v1.Auth/Credentials",
    "/moby.filesync.v1.Auth/FetchToken",
    "/moby.filesync.v1.Auth/GetTokenAuthority",
    "/moby.filesync.v1.Auth/VerifyTokenAuthority",
];

/// The key docker stores Docker Hub credentials under.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Failure to read credentials on the client.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `config.json` exists but cannot be read.
    #[error("failed to read docker config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON of the expected shape.
    #[error("failed to parse docker config {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An `auth` field is not base64 of `user:password`.
    #[error("invalid auth for {key:?} in docker config {path}")]
    InvalidAuth {
        /// The file.
        path: PathBuf,
        /// The `auths` key.
        key: String,
    },
    /// A credential helper could not be run or failed.
    #[error("credential helper docker-credential-{helper} failed for {host}: {detail}")]
    Helper {
        /// The helper name.
        helper: String,
        /// The registry host.
        host: String,
        /// Why (never the helper's answer on success, which holds the secret).
        detail: String,
    },
}

/// Credentials for one registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name (empty with an identity token).
    pub username: String,
    /// Password.
    pub password: String,
    /// OAuth2 refresh token (`identitytoken`), used instead of the password when set.
    pub identity_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: String,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    identitytoken: String,
}

/// The client's docker `config.json` (read when asked, not at creation).
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
}

impl DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json` (docker's lookup).
    pub fn from_env() -> Self {
        let dir = match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"))
                .join(".docker"),
        };
        Self::at(dir.join("config.json"))
    }

    /// The config file at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credentials for registry `host` (`127.0.0.1:5000`; `docker.io`,
    /// `registry-1.docker.io` and `index.docker.io` mean Docker Hub); `None` when the config has
    /// none or does not exist.
    pub async fn credentials(&self, host: &str) -> Result<Option<Credentials>, ConfigError> {
        let config = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice::<ConfigFile>(&bytes).map_err(|source| {
                ConfigError::Parse {
                    path: self.path.clone(),
                    source,
                }
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let key = match host {
            "docker.io" | "registry-1.docker.io" | "index.docker.io" => DOCKER_HUB_KEY,
            other => other,
        };
        if let Some(helper) = config.cred_helpers.get(key) {
            return run_helper(helper, key).await;
        }
        if !config.creds_store.is_empty() {
            return run_helper(&config.creds_store, key).await;
        }
        // Exact key first, then keys written as URLs (`https://host/v1/`), as docker does.
        let entry = config.auths.get_key_value(key).or_else(|| {
            config
                .auths
                .iter()
                .find(|(k, _)| key != DOCKER_HUB_KEY && hostname_of(k) == key)
        });
        let Some((found, entry)) = entry else {
            return Ok(None);
        };
        let mut credentials = Credentials {
            username: entry.username.clone(),
            password: entry.password.clone(),
            identity_token: entry.identitytoken.clone(),
        };
        if !entry.auth.is_empty() {
            let invalid = || ConfigError::InvalidAuth {
                path: self.path.clone(),
                key: found.clone(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(entry.auth.trim())
                .map_err(|_| invalid())?;
            let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
            let (user, password) = decoded.split_once(':').ok_or_else(invalid)?;
            credentials.username = user.to_owned();
            credentials.password = password.to_owned();
        }
        if credentials == Credentials::default() {
            return Ok(None);
        }
        Ok(Some(credentials))
    }
}

/// `https://host:port/v1/` → `host:port` (docker's `ConvertToHostname`).
fn hostname_of(key: &str) -> &str {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or(rest)
}

/// Runs `docker-credential-<helper> get` with `host` on stdin (the docker credential helper
/// protocol); "not found" answers are `None`.
async fn run_helper(helper: &str, host: &str) -> Result<Option<Credentials>, ConfigError> {
    use tokio::io::AsyncWriteExt;
    let fail = |detail: String| ConfigError::Helper {
        helper: helper.to_owned(),
        host: host.to_owned(),
        detail,
    };
    let mut child = tokio::process::Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(host.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !output.status.success() {
        // Helpers print "credentials not found in native keychain" on stdout for a miss.
        let said = String::from_utf8_lossy(&output.stdout);
        if said.contains("credentials not found") {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail: String = format!("{} {}", said.trim(), stderr.trim())
            .trim()
            .chars()
            .take(200)
            .collect();
        return Err(fail(format!("{}: {detail}", output.status)));
    }
    #[derive(Deserialize)]
    struct HelperAnswer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let answer: HelperAnswer =
        serde_json::from_slice(&output.stdout).map_err(|e| fail(format!("invalid answer: {e}")))?;
    // docker's convention: user name `<token>` means the secret is an identity token.
    Ok(Some(if answer.username == "<token>" {
        Credentials {
            identity_token: answer.secret,
            ..Default::default()
        }
    } else {
        Credentials {
            username: answer.username,
            password: answer.secret,
            ..Default::default()
        }
    }))
}

/// The `Auth` session service over a [`DockerConfig`].
#[derive(Debug, Clone)]
pub struct AuthService {
    config: DockerConfig,
    http: reqwest::Client,
}

impl AuthService {
    /// Serves `config`.
    pub fn new(config: DockerConfig) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::HttpClient { source })?;
        Ok(Self { config, http })
    }

    /// The tonic service, ready for a session server.
    pub fn into_server(self) -> AuthServer<Self> {
        AuthServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    async fn lookup(&self, host: &str) -> Result<Option<Credentials>, Status> {
        self.config
            .credentials(host)
            .await
            .map_err(|e| Status::internal(crate::error_chain(&e)))
    }
}

/// A token endpoint's answer (distribution token spec and OAuth2).
#[derive(Debug, Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: String,
    #[serde(default)]
    access_token: String,
    #[serde(default)]
    expires_in: i64,
    #[serde(default)]
    issued_at: Option<String>,
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn credentials(
        &self,
        request: Request<CredentialsRequest>,
    ) -> Result<Response<CredentialsResponse>, Status> {
        let host = request.into_inner().host;
        let response = match self.lookup(&host).await? {
            None => CredentialsResponse::default(),
            Some(c) if !c.identity_token.is_empty() => CredentialsResponse {
                username: String::new(),
                secret: c.identity_token,
            },
            Some(c) => CredentialsResponse {
                username: c.username,
                secret: c.password,
            },
        };
        tracing::debug!(
            host,
            found = !response.secret.is_empty(),
            "credentials asked"
        );
        Ok(Response::new(response))
    }

    async fn fetch_token(
        &self,
        request: Request<FetchTokenRequest>,
    ) -> Result<Response<FetchTokenResponse>, Status> {
        let request = request.into_inner();
        let credentials = self.lookup(&request.host).await?;
        let scope = request.scopes.join(" ");
        let client_id = if request.client_id.is_empty() {
            "buildkit-client".to_owned()
        } else {
            request.client_id.clone()
        };
        let http = match &credentials {
            Some(c) if !c.identity_token.is_empty() => {
                // OAuth2 refresh-token grant, as docker does with identity tokens.
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", c.identity_token.as_str()),
                    ("client_id", client_id.as_str()),
                ];
                if !request.service.is_empty() {
                    form.push(("service", request.service.as_str()));
                }
                if !scope.is_empty() {
                    form.push(("scope", scope.as_str()));
                }
                self.http.post(&request.realm).form(&form)
            }
            other => {
                let mut query: Vec<(&str, &str)> = Vec::new();
                if !request.service.is_empty() {
                    query.push(("service", &request.service));
                }
                for scope in &request.scopes {
                    query.push(("scope", scope));
                }
                let mut http = self.http.get(&request.realm).query(&query);
                if let Some(c) = other {
                    http = http.basic_auth(&c.username, Some(&c.password));
                }
                http
            }
        };
        let failed = |detail: String| {
            Status::unavailable(format!(
                "failed to fetch token from {} for {}: {detail}",
                request.realm, request.host
            ))
        };
        let answer = http.send().await.map_err(|e| failed(e.to_string()))?;
        let status = answer.status();
        if !status.is_success() {
            return Err(failed(status.to_string()));
        }
        let answer: TokenAnswer = answer
            .json()
            .await
            .map_err(|e| failed(format!("invalid answer: {e}")))?;
        let token = if answer.access_token.is_empty() {
            answer.token
        } else {
            answer.access_token
        };
        if token.is_empty() {
            return Err(failed("answer has no token".to_owned()));
        }
        let issued_at = answer
            .issued_at
            .as_deref()
            .and_then(rfc3339_unix_seconds)
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64)
            });
        tracing::debug!(host = %request.host, realm = %request.realm, "token fetched");
        Ok(Response::new(FetchTokenResponse {
            token,
            expires_in: answer.expires_in,
            issued_at,
        }))
    }

    async fn get_token_authority(
        &self,
        _request: Request<GetTokenAuthorityRequest>,
    ) -> Result<Response<GetTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("kiln has no token authority"))
    }

    async fn verify_token_authority(
        &self,
        _request: Request<VerifyTokenAuthorityRequest>,
    ) -> Result<Response<VerifyTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("kiln has no token authority"))
    }
}

/// Seconds since the epoch of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.frac](Z|+00:00)`;
/// `None` for anything else (the caller uses the current time).
fn rfc3339_unix_seconds(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 19 || bytes[4] != b'-' || bytes[10] != b'T' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let zone = text[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if !matches!(zone, "Z" | "+00:00" | "") {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn unsupported(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unimplemented | tonic::Code::NotFound
    )
}

/// Daemon end: the client's credentials for `host` over the session `channel`; `None` when it
/// has none or does not serve `Auth`.
pub async fn credentials(channel: Channel, host: &str) -> Result<Option<(String, String)>, Error> {
    let mut client = AuthClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);
    match client
        .credentials(CredentialsRequest {
            host: host.to_owned(),
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            Ok((!r.username.is_empty() || !r.secret.is_empty()).then_some((r.username, r.secret)))
        }
        Err(status) if unsupported(&status) => Ok(None),
        Err(status) => Err(Error::Rpc {
            method: "/moby.filesync.v1.Auth/Credentials",
            status,
        }),
    }
}

/// Daemon end: a bearer token the client fetched for `realm`/`service`/`scopes` with its
/// credentials; `None` when the client does not serve `Auth` or answers no token.
pub async fn fetch_token(
    channel: Channel,
    host: &str,
    realm: &str,
    service: &str,
    scopes: &[String],
) -> Result<Option<String>, Error> {
    let mut client = AuthClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE);
    match client
        .fetch_token(FetchTokenRequest {
            client_id: "buildkit-client".to_owned(),
            host: host.to_owned(),
            realm: realm.to_owned(),
            service: service.to_owned(),
            scopes: scopes.to_vec(),
        })
        .await
    {
        Ok(r) => Ok(Some(r.into_inner().token).filter(|t| !t.is_empty())),
        Err(status) if unsupported(&status) => Ok(None),
        Err(status) => Err(Error::Rpc {
            method: "/moby.filesync.v1.Auth/FetchToken",
            status,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, json: &str) -> DockerConfig {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        DockerConfig::at(path)
    }

    #[tokio::test]
    async fn reads_auth_username_password_and_identity_token_entries() {
        let dir = tempfile::tempdir().unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        let c = config(
            dir.path(),
            &format!(
                r#"{{"auths": {{
                    "127.0.0.1:5000": {{"auth": "{auth}"}},
                    "https://reg.example:8443/v1/": {{"username": "bob", "password": "pw"}},
                    "https://index.docker.io/v1/": {{"identitytoken": "refresh"}},
                    "empty.example": {{}}
                }}}}"#
            ),
        );
        let a = c.credentials("127.0.0.1:5000").await.unwrap().unwrap();
        assert_eq!(
            (a.username.as_str(), a.password.as_str()),
            ("alice", "pa:ss")
        );
        let b = c.credentials("reg.example:8443").await.unwrap().unwrap();
        assert_eq!((b.username.as_str(), b.password.as_str()), ("bob", "pw"));
        for hub in ["docker.io", "registry-1.docker.io", "index.docker.io"] {
            let h = c.credentials(hub).await.unwrap().unwrap();
            assert_eq!(h.identity_token, "refresh");
        }
        assert!(c.credentials("empty.example").await.unwrap().is_none());
        assert!(c.credentials("other.example").await.unwrap().is_none());
        assert!(!format!("{a:?}").contains("pa:ss"));
    }

    #[tokio::test]
    async fn missing_file_has_no_credentials_and_broken_ones_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let missing = DockerConfig::at(dir.path().join("nope.json"));
        assert!(missing.credentials("x").await.unwrap().is_none());
        let broken = config(dir.path(), "{not json");
        let e = broken.credentials("x").await.unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        let bad_auth = config(dir.path(), r#"{"auths":{"x":{"auth":"bm9jb2xvbg=="}}}"#);
        assert!(matches!(
            bad_auth.credentials("x").await,
            Err(ConfigError::InvalidAuth { .. })
        ));
        let helper = config(dir.path(), r#"{"credHelpers":{"x":"kiln-absent-helper"}}"#);
        let e = helper.credentials("x").await.unwrap_err().to_string();
        assert!(e.contains("docker-credential-kiln-absent-helper"), "{e}");
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(rfc3339_unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_unix_seconds("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096)
        );
        assert_eq!(rfc3339_unix_seconds("2024-02-29T12:34:56+02:00"), None);
        assert_eq!(
            hostname_of("https://reg.example:8443/v1/"),
            "reg.example:8443"
        );
    }
}
