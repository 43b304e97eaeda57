//! The CRI ImageService: pulls, lists, inspects and removes images through
//! the image manager.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hatoba_image::{Credentials, FsUsage, ImageError, ImageManager, ImageRecord, PullProgress};
use k8s_cri::v1;
use k8s_cri::v1::image_service_server::ImageService;
use serde_json::json;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::error::{error_chain, image_error_status};

/// The CRI ImageService of the daemon.
pub struct CriImageService {
    images: Arc<ImageManager>,
}

impl CriImageService {
    /// Creates the service on a shared image manager.
    pub fn new(images: Arc<ImageManager>) -> Self {
        Self { images }
    }
}

#[tonic::async_trait]
impl ImageService for CriImageService {
    async fn list_images(
        &self,
        request: Request<v1::ListImagesRequest>,
    ) -> Result<Response<v1::ListImagesResponse>, Status> {
        let name = request
            .into_inner()
            .filter
            .and_then(|filter| filter.image)
            .map(|spec| spec.image)
            .unwrap_or_default();
        tracing::debug!(image.r#ref = %name, "ListImages");

        let records = if name.is_empty() {
            run_blocking(&self.images, ImageManager::list).await?
        } else {
            find_image(&self.images, name).await?.into_iter().collect()
        };
        Ok(Response::new(v1::ListImagesResponse {
            images: records.iter().map(cri_image).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<v1::ImageStatusRequest>,
    ) -> Result<Response<v1::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = requested_image(request.image)?;
        tracing::debug!(image.r#ref = %name, verbose = request.verbose, "ImageStatus");

        // The CRI expects an empty response, not an error, for an unknown image.
        let Some(record) = find_image(&self.images, name).await? else {
            return Ok(Response::new(v1::ImageStatusResponse::default()));
        };

        let info = if request.verbose {
            let info = verbose_info(&self.images, &record).await?;
            HashMap::from([("info".to_owned(), info)])
        } else {
            HashMap::new()
        };
        Ok(Response::new(v1::ImageStatusResponse {
            image: Some(cri_image(&record)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<v1::PullImageRequest>,
    ) -> Result<Response<v1::PullImageResponse>, Status> {
        let request = request.into_inner();
        let reference = requested_image(request.image)?;
        let credentials = credentials_from_auth(request.auth)?;

        let pull = spawn_pull(
            Arc::clone(&self.images),
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

    async fn remove_image(
        &self,
        request: Request<v1::RemoveImageRequest>,
    ) -> Result<Response<v1::RemoveImageResponse>, Status> {
        let name = requested_image(request.into_inner().image)?;

        // Run the removal in its own task so a client that goes away does
        // not stop it between freeing blobs and updating the metadata.
        let images = Arc::clone(&self.images);
        let removal = tokio::spawn(async move {
            let result = images.remove(&name).await;
            log_removal(&name, &result);
            result
        });
        match join_task(removal, "removal").await? {
            // RemoveImage is idempotent: an image that is already gone is fine.
            Ok(_) | Err(ImageError::NotFound { .. }) => {
                Ok(Response::new(v1::RemoveImageResponse {}))
            }
            Err(error) => Err(image_error_status(&error)),
        }
    }

    async fn image_fs_info(
        &self,
        _request: Request<v1::ImageFsInfoRequest>,
    ) -> Result<Response<v1::ImageFsInfoResponse>, Status> {
        tracing::debug!("ImageFsInfo");
        let usage = self
            .images
            .fs_usage()
            .await
            .map_err(|error| image_error_status(&error))?;
        let filesystem = filesystem_usage(&usage, SystemTime::now());

        // Container root filesystems live on the same store until the
        // runtime has its own snapshot directory.
        Ok(Response::new(v1::ImageFsInfoResponse {
            image_filesystems: vec![filesystem.clone()],
            container_filesystems: vec![filesystem],
        }))
    }
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
                tracing::info!(rpc, image.r#ref = %reference, image.id = %record.id, "pulled image");
            }
            Err(error) => {
                let error = error_chain(error);
                tracing::info!(rpc, image.r#ref = %reference, %error, "image pull failed");
            }
        }
        result
    })
}

fn log_removal(name: &str, result: &Result<Option<ImageRecord>, ImageError>) {
    match result {
        Ok(Some(record)) => {
            tracing::info!(image.r#ref = %name, image.id = %record.id, "removed image");
        }
        Ok(None) | Err(ImageError::NotFound { .. }) => {
            tracing::info!(image.r#ref = %name, "image to remove was already gone");
        }
        Err(error) => {
            let error = error_chain(error);
            tracing::info!(image.r#ref = %name, %error, "image removal failed");
        }
    }
}

/// Waits for a spawned image task. A panic in the task becomes `Internal`.
pub(crate) async fn join_task<T>(task: JoinHandle<T>, operation: &str) -> Result<T, Status> {
    task.await
        .map_err(|error| Status::internal(format!("image {operation} task failed: {error}")))
}

/// Runs a synchronous image manager call on the blocking pool, because it
/// may read metadata files.
async fn run_blocking<T, F>(images: &Arc<ImageManager>, call: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&ImageManager) -> T + Send + 'static,
{
    let images = Arc::clone(images);
    join_task(tokio::task::spawn_blocking(move || call(&images)), "store").await
}

/// Finds an image by name, ID or digest, or returns `None` when none matches.
async fn find_image(
    images: &Arc<ImageManager>,
    name: String,
) -> Result<Option<ImageRecord>, Status> {
    match run_blocking(images, move |images| images.find(&name)).await? {
        Ok(found) => Ok(found),
        Err(ImageError::NotFound { .. }) => Ok(None),
        Err(error) => Err(image_error_status(&error)),
    }
}

/// Returns the image name of a request, rejecting a missing or empty one.
fn requested_image(spec: Option<v1::ImageSpec>) -> Result<String, Status> {
    match spec {
        Some(spec) if !spec.image.is_empty() => Ok(spec.image),
        _ => Err(Status::invalid_argument("image reference is empty")),
    }
}

/// Builds the `info` value of a verbose ImageStatus: a JSON object with the
/// image config, the manifest digest, the chain IDs and the layers. The keys
/// `imageSpec` and `chainID` (the top layer's chain ID) match containerd
/// 1.6.20, so scripts that read `crictl inspecti` output work on both.
async fn verbose_info(images: &Arc<ImageManager>, record: &ImageRecord) -> Result<String, Status> {
    let stored = record.clone();
    let config = run_blocking(images, move |images| images.image_config(&stored))
        .await?
        .map_err(|error| image_error_status(&error))?;

    let layers: Vec<_> = record
        .layers
        .iter()
        .map(|layer| {
            json!({
                "digest": layer.digest,
                "mediaType": layer.media_type,
                "size": layer.size,
                "diffID": layer.diff_id,
            })
        })
        .collect();
    let chain_ids: Vec<&str> = record
        .layers
        .iter()
        .map(|layer| layer.chain_id.as_str())
        .collect();

    let info = json!({
        "imageSpec": config,
        "chainID": chain_ids.last().copied().unwrap_or_default(),
        "manifestDigest": record.manifest_digest,
        "chainIDs": chain_ids,
        "layers": layers,
    });
    Ok(info.to_string())
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

/// Converts a stored image to the CRI `Image` message. Tags and digests are
/// sorted, as containerd 1.6.20 sorts them, so their order does not depend
/// on the order of the pulls.
pub fn cri_image(record: &ImageRecord) -> v1::Image {
    let (uid, username) = image_user(&record.user);
    let mut repo_tags = record.repo_tags.clone();
    repo_tags.sort();
    let mut repo_digests = record.repo_digests.clone();
    repo_digests.sort();
    v1::Image {
        id: record.id.clone(),
        repo_tags,
        repo_digests,
        size: record.size,
        uid: uid.map(|value| v1::Int64Value { value }),
        username,
        spec: Some(v1::ImageSpec {
            image: record.id.clone(),
            ..Default::default()
        }),
        pinned: record.pinned,
    }
}

/// Splits the image config `User` (`name`, `uid`, `name:group`, `uid:gid`)
/// into the numeric uid or the user name that the CRI reports. Kubelet uses
/// them to enforce `runAsNonRoot`.
fn image_user(user: &str) -> (Option<i64>, String) {
    let name = user.split_once(':').map_or(user, |(name, _group)| name);
    if name.is_empty() {
        return (None, String::new());
    }
    match name.parse::<i64>() {
        Ok(uid) => (Some(uid), String::new()),
        Err(_) => (None, name.to_owned()),
    }
}

fn filesystem_usage(usage: &FsUsage, now: SystemTime) -> v1::FilesystemUsage {
    let timestamp = now
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    v1::FilesystemUsage {
        timestamp,
        fs_id: Some(v1::FilesystemIdentifier {
            mountpoint: usage.mountpoint.display().to_string(),
        }),
        used_bytes: Some(v1::UInt64Value {
            value: usage.used_bytes,
        }),
        inodes_used: Some(v1::UInt64Value {
            value: usage.inodes_used,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn record(user: &str) -> ImageRecord {
        ImageRecord {
            id: "sha256:1111111111111111111111111111111111111111111111111111111111111111"
                .to_owned(),
            repo_tags: vec!["127.0.0.1:5000/testenv/busybox:latest".to_owned()],
            repo_digests: vec![
                "127.0.0.1:5000/testenv/busybox@sha256:2222222222222222222222222222222222222222222222222222222222222222"
                    .to_owned(),
            ],
            manifest_digest: "sha256:2222222222222222222222222222222222222222222222222222222222222222"
                .to_owned(),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".to_owned(),
            config_digest: "sha256:1111111111111111111111111111111111111111111111111111111111111111"
                .to_owned(),
            layers: Vec::new(),
            size: 1234,
            user: user.to_owned(),
            created: None,
            pinned: true,
        }
    }

    #[test]
    fn cri_image_copies_names_size_and_pin() {
        let image = cri_image(&record(""));
        assert_eq!(image.id, record("").id);
        assert_eq!(image.repo_tags, record("").repo_tags);
        assert_eq!(image.repo_digests, record("").repo_digests);
        assert_eq!(image.size, 1234);
        assert!(image.pinned);
        let spec = image.spec.expect("spec is set");
        assert_eq!(spec.image, record("").id);
    }

    #[test]
    fn cri_image_user_becomes_uid_or_username() {
        let cases = [
            ("", None, ""),
            ("1000", Some(1000), ""),
            ("1000:1000", Some(1000), ""),
            ("0", Some(0), ""),
            ("0:wheel", Some(0), ""),
            ("app", None, "app"),
            ("app:staff", None, "app"),
            ("app:1000", None, "app"),
            (":1000", None, ""),
        ];
        for (user, uid, username) in cases {
            let image = cri_image(&record(user));
            assert_eq!(image.uid.map(|uid| uid.value), uid, "user {user:?}");
            assert_eq!(image.username, username, "user {user:?}");
        }
    }

    #[test]
    fn cri_image_sorts_names() {
        let mut unsorted = record("");
        unsorted.repo_tags = vec![
            "docker.io/testenv/busybox:latest".to_owned(),
            "127.0.0.1:5000/testenv/busybox:latest".to_owned(),
            "127.0.0.1:5000/testenv/busybox:1.35".to_owned(),
        ];
        unsorted.repo_digests = vec![
            "docker.io/testenv/busybox@sha256:22".to_owned(),
            "127.0.0.1:5000/testenv/busybox@sha256:22".to_owned(),
        ];

        let image = cri_image(&unsorted);

        assert_eq!(
            image.repo_tags,
            [
                "127.0.0.1:5000/testenv/busybox:1.35",
                "127.0.0.1:5000/testenv/busybox:latest",
                "docker.io/testenv/busybox:latest",
            ]
        );
        assert_eq!(
            image.repo_digests,
            [
                "127.0.0.1:5000/testenv/busybox@sha256:22",
                "docker.io/testenv/busybox@sha256:22",
            ]
        );
    }

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

    #[test]
    fn empty_image_reference_is_invalid_argument() {
        let cases = [None, Some(v1::ImageSpec::default())];
        for spec in cases {
            let status = requested_image(spec).expect_err("empty reference is rejected");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn filesystem_usage_reports_store_usage() {
        let usage = FsUsage {
            mountpoint: PathBuf::from("/var/lib/hatoba/images"),
            used_bytes: 4096,
            inodes_used: 12,
        };
        let now = UNIX_EPOCH + Duration::from_secs(2);
        let filesystem = filesystem_usage(&usage, now);
        assert_eq!(filesystem.timestamp, 2_000_000_000);
        assert_eq!(
            filesystem.fs_id.expect("fs_id is set").mountpoint,
            "/var/lib/hatoba/images"
        );
        assert_eq!(
            filesystem.used_bytes.expect("used_bytes is set").value,
            4096
        );
        assert_eq!(
            filesystem.inodes_used.expect("inodes_used is set").value,
            12
        );
    }
}
