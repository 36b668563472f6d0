//! Secrets and SSH agents of a build, served by its client's session
//! (`moby.buildkit.secrets.v1.Secrets`, `moby.sshforward.v1.SSH`): the
//! [`ExecSession`] the solver hands to the worker for `RUN --mount=type=secret`
//! and `type=ssh`. The session is looked up when an exec needs it, so a build
//! without such mounts never touches these services.

use std::os::unix::net::UnixStream;

use kiln_session::{secrets, sshforward, Session, SessionManager};
use kiln_worker::{ExecSession, SessionError};

use crate::locals::SESSION_WAIT;

/// [`ExecSession`] over the client session `session_id`.
pub struct SessionSecrets {
    sessions: SessionManager,
    session_id: String,
}

impl std::fmt::Debug for SessionSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSecrets")
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl SessionSecrets {
    /// Secrets and agents of the build whose session is `session_id`.
    pub fn new(sessions: SessionManager, session_id: String) -> Self {
        Self {
            sessions,
            session_id,
        }
    }

    async fn session(&self) -> Result<std::sync::Arc<Session>, SessionError> {
        if self.session_id.is_empty() {
            return Err("the build has no session".into());
        }
        Ok(self.sessions.get(&self.session_id, SESSION_WAIT).await?)
    }
}

#[async_trait::async_trait]
impl ExecSession for SessionSecrets {
    async fn secret(&self, id: &str) -> Result<Option<Vec<u8>>, SessionError> {
        if self.session_id.is_empty() {
            return Ok(None);
        }
        let session = self.session().await?;
        Ok(secrets::get_secret(session.channel(), id).await?)
    }

    async fn has_ssh_agent(&self, id: &str) -> Result<bool, SessionError> {
        if self.session_id.is_empty() {
            return Ok(false);
        }
        let session = self.session().await?;
        Ok(sshforward::check_agent(session.channel(), id).await?)
    }

    async fn forward_ssh(&self, id: &str, conn: UnixStream) -> Result<(), SessionError> {
        let session = self.session().await?;
        conn.set_nonblocking(true)?;
        let conn = tokio::net::UnixStream::from_std(conn)?;
        Ok(sshforward::forward_agent(session.channel(), id, conn).await?)
    }
}
