//! `moby.buildkit.secrets.v1.Secrets`: build secrets served by the client.
//!
//! The client end ([`SecretSource`] values given to
//! [`SessionBuilder::secret`](crate::client::SessionBuilder::secret)) reads a
//! secret from its file or environment variable when the daemon asks for it,
//! as buildctl's secrets provider does, so a secret is never read unless a
//! `RUN --mount=type=secret` needs it. An unknown id is answered `NotFound`.
//! The daemon end is [`get_secret`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_proto::moby::buildkit::secrets::v1::secrets_client::SecretsClient;
use kiln_proto::moby::buildkit::secrets::v1::secrets_server::Secrets;
use kiln_proto::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use tonic::transport::Channel;

use crate::{Error, MAX_MESSAGE_SIZE};

/// Full name of the method, as advertised in the session headers.
pub const METHOD: &str = "/moby.buildkit.secrets.v1.Secrets/GetSecret";

/// Largest secret value served (BuildKit's limit is 500 KiB).
pub const MAX_SECRET_SIZE: u64 = 500 * 1024;

/// Where the client finds the value of one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The content of a file, read when asked for.
    File(PathBuf),
    /// The value of an environment variable of the client, read when asked for.
    Env(String),
}

/// The client end: serves secrets by id.
#[derive(Debug, Clone, Default)]
pub(crate) struct SecretsService {
    pub(crate) sources: Arc<HashMap<String, SecretSource>>,
}

impl SecretsService {
    fn read(&self, id: &str) -> Result<Vec<u8>, tonic::Status> {
        let source = self
            .sources
            .get(id)
            .ok_or_else(|| tonic::Status::not_found(format!("secret {id} not found")))?;
        match source {
            SecretSource::File(path) => {
                let meta = std::fs::metadata(path).map_err(|e| {
                    tonic::Status::not_found(format!(
                        "secret {id}: failed to read {}: {e}",
                        path.display()
                    ))
                })?;
                if meta.len() > MAX_SECRET_SIZE {
                    return Err(tonic::Status::invalid_argument(format!(
                        "secret {id} is too big ({} bytes, at most {MAX_SECRET_SIZE})",
                        meta.len()
                    )));
                }
                std::fs::read(path).map_err(|e| {
                    tonic::Status::not_found(format!(
                        "secret {id}: failed to read {}: {e}",
                        path.display()
                    ))
                })
            }
            SecretSource::Env(name) => std::env::var_os(name)
                .map(std::os::unix::ffi::OsStringExt::into_vec)
                .ok_or_else(|| {
                    tonic::Status::not_found(format!(
                        "secret {id}: environment variable {name} is not set"
                    ))
                }),
        }
    }
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn get_secret(
        &self,
        request: tonic::Request<GetSecretRequest>,
    ) -> Result<tonic::Response<GetSecretResponse>, tonic::Status> {
        let id = request.into_inner().id;
        // Never log the value; the id is not secret.
        tracing::debug!(id, "secret requested");
        let data = self.read(&id)?;
        Ok(tonic::Response::new(GetSecretResponse { data }))
    }
}

/// The daemon end: asks the client for secret `id`. `Ok(None)` when the client
/// does not have it (`NotFound`, or a client that serves no secrets at all:
/// `Unimplemented`), as BuildKit's `secrets.GetSecret` treats both.
pub async fn get_secret(channel: Channel, id: &str) -> Result<Option<Vec<u8>>, Error> {
    let mut client = SecretsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let request = GetSecretRequest {
        id: id.to_string(),
        annotations: Default::default(),
    };
    match client.get_secret(request).await {
        Ok(response) => Ok(Some(response.into_inner().data)),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::Unimplemented
            ) =>
        {
            tracing::debug!(id, message = status.message(), "secret not found");
            Ok(None)
        }
        Err(status) => Err(Error::Rpc {
            method: METHOD,
            status,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_and_env_and_reports_unknown_ids() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, b"file-value").unwrap();
        std::env::set_var("KILN_SESSION_TEST_SECRET", "env-value");
        let service = SecretsService {
            sources: Arc::new(HashMap::from([
                ("f".to_string(), SecretSource::File(file)),
                (
                    "e".to_string(),
                    SecretSource::Env("KILN_SESSION_TEST_SECRET".into()),
                ),
                (
                    "unset".to_string(),
                    SecretSource::Env("KILN_SESSION_TEST_UNSET".into()),
                ),
                (
                    "gone".to_string(),
                    SecretSource::File(dir.path().join("missing")),
                ),
            ])),
        };
        assert_eq!(service.read("f").unwrap(), b"file-value");
        assert_eq!(service.read("e").unwrap(), b"env-value");
        for id in ["nope", "unset", "gone"] {
            assert_eq!(
                service.read(id).unwrap_err().code(),
                tonic::Code::NotFound,
                "{id}"
            );
        }
    }
}
