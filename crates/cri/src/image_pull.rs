//! PullImage: fetches an image with the credentials of the request.

use std::sync::Arc;

use base64::Engine as _;
use hatoba_image::{Credentials, ImageError, ImageManager, ImageRecord, PullProgress};
use k8s_cri::v1;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::error::{error_chain, escape_control, image_error_status};
use crate::image_service::{join_task, requested_image};

/// Pulls an image and returns its ID as the image reference.
pub(crate) async fn pull_image(
    images: &Arc<ImageManager>,
    request: Request<v1::PullImageRequest>,
) -> Result<Response<v1::PullImageResponse>, Status> {
    let request = request.into_inner();
    let reference = requested_image(request.image)?;
    let credentials = credentials_from_auth(request.auth)?;

    let pull = spawn_pull(
        Arc::clone(images),
        "PullImage",
        reference,
        credentials,
        None,
    );
    let record = join_task(pull, "pull")
        .await?
        .map_err(|error| image_error_status(&error))?;
    Ok(Response::new(v1::PullImageResponse {
        image_ref: record.id,
    }))
}

/// Starts a pull in its own task, so a client that goes away does not
/// cancel it halfway, and logs its outcome once when it ends.
pub(crate) fn spawn_pull(
    images: Arc<ImageManager>,
    rpc: &'static str,
    reference: String,
    credentials: Option<Credentials>,
    progress: Option<PullProgress>,
) -> JoinHandle<Result<ImageRecord, ImageError>> {
    tokio::spawn(async move {
        let result = images.pull(&reference, credentials, progress).await;
        match &result {
            Ok(record) => {
                tracing::info!(rpc, image.r#ref = %escape_control(&reference), image.id = %record.id, "pulled image");
            }
            Err(error) => {
                let error = error_chain(error);
                tracing::info!(rpc, image.r#ref = %escape_control(&reference), %error, "image pull failed");
            }
        }
        result
    })
}

/// Converts CRI registry credentials. `username`/`password` win over `auth`,
/// which contains base64 of `user:password` as in a Docker config file.
/// `server_address` is ignored: the image reference names the registry.
fn credentials_from_auth(auth: Option<v1::AuthConfig>) -> Result<Option<Credentials>, Status> {
    let Some(auth) = auth else {
        return Ok(None);
    };

    let (username, password) = if !auth.username.is_empty() || !auth.password.is_empty() {
        (auth.username, auth.password)
    } else if !auth.auth.is_empty() {
        decode_auth(&auth.auth)?
    } else {
        (String::new(), String::new())
    };

    let credentials = Credentials {
        username,
        password,
        identity_token: auth.identity_token,
        registry_token: auth.registry_token,
    };
    let anonymous = credentials.username.is_empty()
        && credentials.password.is_empty()
        && credentials.identity_token.is_empty()
        && credentials.registry_token.is_empty();
    Ok((!anonymous).then_some(credentials))
}

/// Decodes an `auth` field. Errors never echo it, because it is a secret.
fn decode_auth(auth: &str) -> Result<(String, String), Status> {
    let invalid =
        || Status::invalid_argument("auth config field `auth` is not base64 of \"user:password\"");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (username, password) = text.split_once(':').ok_or_else(invalid)?;
    Ok((username.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_absent_or_empty_mean_anonymous() {
        assert!(credentials_from_auth(None).expect("no auth").is_none());
        let empty = credentials_from_auth(Some(v1::AuthConfig::default())).expect("empty auth");
        assert!(empty.is_none());
    }

    #[test]
    fn credentials_come_from_username_and_password() {
        let auth = v1::AuthConfig {
            username: "hatoba".into(),
            password: "hatoba-basic-pw".into(),
            auth: base64::engine::general_purpose::STANDARD.encode("other:secret"),
            server_address: "127.0.0.1:5001".into(),
            ..Default::default()
        };
        let credentials = credentials_from_auth(Some(auth))
            .expect("valid auth")
            .expect("credentials present");
        assert_eq!(credentials.username, "hatoba");
        assert_eq!(credentials.password, "hatoba-basic-pw");
    }

    #[test]
    fn credentials_come_from_base64_auth() {
        let auth = v1::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("hatoba:pass:with:colons"),
            ..Default::default()
        };
        let credentials = credentials_from_auth(Some(auth))
            .expect("valid auth")
            .expect("credentials present");
        assert_eq!(credentials.username, "hatoba");
        assert_eq!(credentials.password, "pass:with:colons");
    }

    #[test]
    fn credentials_carry_tokens() {
        let auth = v1::AuthConfig {
            identity_token: "refresh".into(),
            registry_token: "bearer".into(),
            ..Default::default()
        };
        let credentials = credentials_from_auth(Some(auth))
            .expect("valid auth")
            .expect("credentials present");
        assert_eq!(credentials.identity_token, "refresh");
        assert_eq!(credentials.registry_token, "bearer");
        assert!(credentials.username.is_empty());
    }

    #[test]
    fn bad_auth_is_invalid_argument() {
        for auth in ["%%%not-base64%%%", "bm9jb2xvbg=="] {
            let status = credentials_from_auth(Some(v1::AuthConfig {
                auth: auth.into(),
                ..Default::default()
            }))
            .expect_err("bad auth is rejected");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{auth}");
            assert!(!status.message().contains(auth), "{}", status.message());
        }
    }
}
