//! Registry credentials for one build, supplied by whoever started it.
//!
//! kilnd's resolvers live in long-lived workers shared by every build, while credentials belong
//! to one build's client (BuildKit asks the client over the session's `Auth` service). So the
//! credentials travel with the build instead of with the resolver: the daemon runs a build's
//! future inside [`scope`] with a [`RegistryAuth`] provider, and every [`Resolver`] call made
//! from that future (base-image resolution, layer pulls, pushes by an exporter) answers a 401
//! through it:
//! - a `Basic` challenge → [`RegistryAuth::credentials`] for the registry host, then the request
//!   again with basic auth;
//! - a `Bearer` challenge → [`RegistryAuth::fetch_token`] (the provider performs the token
//!   request with its credentials); when it has none the resolver fetches an anonymous token as
//!   without a scope.
//!
//! Tokens and credentials obtained in a scope are cached in that scope only (per build, so per
//! session) and never leave memory; a build outside any scope shares the resolver's anonymous
//! tokens. Scopes are tokio task-locals: they reach everything awaited inside the build's
//! future, not tasks it spawns.
//!
//! [`Resolver`]: super::Resolver

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

/// A user name and secret (password or identity token) for a registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    /// The user name; empty with an identity token.
    pub username: String,
    /// The password or token.
    pub secret: String,
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, even in debug logs.
        f.debug_struct("BasicCredentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What a `Bearer` challenge asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The registry host (`127.0.0.1:5000`, `registry-1.docker.io`).
    pub host: String,
    /// The token endpoint (`realm`).
    pub realm: String,
    /// The `service` parameter, possibly empty.
    pub service: String,
    /// The scopes wanted (`repository:library/busybox:pull`).
    pub scopes: Vec<String>,
}

/// A provider failed (for kilnd: the session's `Auth` call failed).
#[derive(Debug, thiserror::Error)]
#[error("failed to get {what} for registry {host}: {message}")]
pub struct AuthError {
    /// `credentials` or `token`.
    pub what: &'static str,
    /// The registry host.
    pub host: String,
    /// What went wrong (must not contain secrets).
    pub message: String,
}

/// Source of registry credentials for one build.
#[async_trait::async_trait]
pub trait RegistryAuth: Send + Sync {
    /// Credentials for `host`, `None` when there are none (the request stays anonymous).
    async fn credentials(&self, host: &str) -> Result<Option<BasicCredentials>, AuthError>;

    /// A bearer token for `request`, obtained with the provider's credentials; `None` when the
    /// provider cannot give one (the resolver then asks for an anonymous token itself).
    async fn fetch_token(&self, request: &TokenRequest) -> Result<Option<String>, AuthError>;
}

/// The provider of a build and what it handed out so far.
pub(crate) struct AuthScope {
    pub(crate) provider: Arc<dyn RegistryAuth>,
    /// `(endpoint base, scopes)` → bearer token.
    pub(crate) tokens: Mutex<HashMap<(String, String), String>>,
    /// Host → credentials (`None`: asked, the provider has none).
    pub(crate) basic: Mutex<HashMap<String, Option<BasicCredentials>>>,
}

impl AuthScope {
    pub(crate) fn lock_tokens(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_basic(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Option<BasicCredentials>>> {
        self.basic.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The credentials of `host`, asking the provider once per scope.
    pub(crate) async fn credentials(
        &self,
        host: &str,
    ) -> Result<Option<BasicCredentials>, AuthError> {
        if let Some(known) = self.lock_basic().get(host) {
            return Ok(known.clone());
        }
        let credentials = self.provider.credentials(host).await?;
        self.lock_basic()
            .insert(host.to_owned(), credentials.clone());
        Ok(credentials)
    }
}

tokio::task_local! {
    static CURRENT: Arc<AuthScope>;
}

/// Runs `future` with `provider` answering registry challenges for every resolver call inside
/// it (see the module docs). With `None` the future runs as is.
pub async fn scope<F: Future>(provider: Option<Arc<dyn RegistryAuth>>, future: F) -> F::Output {
    match provider {
        Some(provider) => {
            let scope = Arc::new(AuthScope {
                provider,
                tokens: Mutex::new(HashMap::new()),
                basic: Mutex::new(HashMap::new()),
            });
            CURRENT.scope(scope, future).await
        }
        None => future.await,
    }
}

/// The scope the current task runs in, if any.
pub(crate) fn current() -> Option<Arc<AuthScope>> {
    CURRENT.try_with(Arc::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    #[async_trait::async_trait]
    impl RegistryAuth for Fixed {
        async fn credentials(&self, host: &str) -> Result<Option<BasicCredentials>, AuthError> {
            Ok((host == "known").then(|| BasicCredentials {
                username: "u".into(),
                secret: "s3cret".into(),
            }))
        }
        async fn fetch_token(&self, _: &TokenRequest) -> Result<Option<String>, AuthError> {
            Ok(None)
        }
    }

    #[tokio::test]
    async fn scope_is_visible_inside_only_and_caches_per_scope() {
        assert!(current().is_none());
        scope(Some(Arc::new(Fixed)), async {
            let s = current().expect("inside the scope");
            assert_eq!(s.credentials("known").await.unwrap().unwrap().username, "u");
            assert!(s.credentials("other").await.unwrap().is_none());
            assert_eq!(s.lock_basic().len(), 2);
        })
        .await;
        assert!(current().is_none());
        scope(Some(Arc::new(Fixed)), async {
            assert!(current().unwrap().lock_basic().is_empty());
        })
        .await;
        scope(None, async { assert!(current().is_none()) }).await;
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let c = BasicCredentials {
            username: "u".into(),
            secret: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
