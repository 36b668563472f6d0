//! Registry credentials of a build, asked from its client over the session's `Auth` service.
//!
//! A build runs inside `kiln_image::registry::auth::scope` with a [`SessionAuth`]: the workers'
//! resolvers (base images, layer pulls) and the image exporter's push answer registry challenges
//! through it. The scope caches what it got for the build only; nothing is logged or written.
//! A session that does not serve `Auth` (an older client) leaves requests anonymous.

use std::sync::Arc;

use kiln_image::registry::auth::{AuthError, BasicCredentials, RegistryAuth, TokenRequest};
use kiln_session::{Session, SessionManager};

use crate::locals::SESSION_WAIT;

const CREDENTIALS_METHOD: &str = "/moby.filesync.v1.Auth/Credentials";
const FETCH_TOKEN_METHOD: &str = "/moby.filesync.v1.Auth/FetchToken";

/// The provider for the build of `session_id`; `None` without a session.
pub(crate) fn for_session(
    sessions: &SessionManager,
    session_id: &str,
) -> Option<Arc<dyn RegistryAuth>> {
    if session_id.is_empty() {
        return None;
    }
    Some(Arc::new(SessionAuth {
        sessions: sessions.clone(),
        session_id: session_id.to_owned(),
    }))
}

/// Asks the client of one session.
struct SessionAuth {
    sessions: SessionManager,
    session_id: String,
}

impl SessionAuth {
    /// The session when it serves `method`.
    async fn session(
        &self,
        method: &str,
        what: &'static str,
        host: &str,
    ) -> Result<Option<Arc<Session>>, AuthError> {
        let session = self
            .sessions
            .get(&self.session_id, SESSION_WAIT)
            .await
            .map_err(|e| AuthError {
                what,
                host: host.to_owned(),
                message: e.to_string(),
            })?;
        if !session.supports(method) {
            tracing::debug!(session = %self.session_id, "session does not serve registry auth");
            return Ok(None);
        }
        Ok(Some(session))
    }
}

fn rpc_error(what: &'static str, host: &str, e: kiln_session::Error) -> AuthError {
    let message = match &e {
        kiln_session::Error::Rpc { status, .. } => status.message().to_owned(),
        other => other.to_string(),
    };
    AuthError {
        what,
        host: host.to_owned(),
        message,
    }
}

#[async_trait::async_trait]
impl RegistryAuth for SessionAuth {
    async fn credentials(&self, host: &str) -> Result<Option<BasicCredentials>, AuthError> {
        let Some(session) = self
            .session(CREDENTIALS_METHOD, "credentials", host)
            .await?
        else {
            return Ok(None);
        };
        let answer = kiln_session::auth::credentials(session.channel(), host)
            .await
            .map_err(|e| rpc_error("credentials", host, e))?;
        tracing::debug!(session = %self.session_id, host, found = answer.is_some(), "registry credentials from the session");
        Ok(answer.map(|(username, secret)| BasicCredentials { username, secret }))
    }

    async fn fetch_token(&self, request: &TokenRequest) -> Result<Option<String>, AuthError> {
        let host = request.host.as_str();
        let Some(session) = self.session(FETCH_TOKEN_METHOD, "token", host).await? else {
            return Ok(None);
        };
        let token = kiln_session::auth::fetch_token(
            session.channel(),
            host,
            &request.realm,
            &request.service,
            &request.scopes,
        )
        .await
        .map_err(|e| rpc_error("token", host, e))?;
        tracing::debug!(session = %self.session_id, host, realm = %request.realm, found = token.is_some(), "registry token from the session");
        Ok(token)
    }
}
