//! The CRI ImageService: pulls, lists, inspects and removes images through
//! the image manager. Each RPC lives in its own module, named after it.

use std::sync::Arc;

use hatoba_image::{ImageError, ImageManager, ImageRecord};
use k8s_cri::v1;
use k8s_cri::v1::image_service_server::ImageService;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::error::image_error_status;
use crate::{image_fs_info, image_list, image_pull, image_remove, image_status};

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
        image_list::list_images(&self.images, request).await
    }

    async fn image_status(
        &self,
        request: Request<v1::ImageStatusRequest>,
    ) -> Result<Response<v1::ImageStatusResponse>, Status> {
        image_status::image_status(&self.images, request).await
    }

    async fn pull_image(
        &self,
        request: Request<v1::PullImageRequest>,
    ) -> Result<Response<v1::PullImageResponse>, Status> {
        image_pull::pull_image(&self.images, request).await
    }

    async fn remove_image(
        &self,
        request: Request<v1::RemoveImageRequest>,
    ) -> Result<Response<v1::RemoveImageResponse>, Status> {
        image_remove::remove_image(&self.images, request).await
    }

    async fn image_fs_info(
        &self,
        request: Request<v1::ImageFsInfoRequest>,
    ) -> Result<Response<v1::ImageFsInfoResponse>, Status> {
        image_fs_info::image_fs_info(&self.images, request).await
    }
}

/// Waits for a spawned image task. A panic in the task becomes `Internal`.
pub(crate) async fn join_task<T>(task: JoinHandle<T>, operation: &str) -> Result<T, Status> {
    task.await
        .map_err(|error| Status::internal(format!("image {operation} task failed: {error}")))
}

/// Runs a synchronous image manager call on the blocking pool, because it
/// may read metadata files.
pub(crate) async fn run_blocking<T, F>(images: &Arc<ImageManager>, call: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&ImageManager) -> T + Send + 'static,
{
    let images = Arc::clone(images);
    join_task(tokio::task::spawn_blocking(move || call(&images)), "store").await
}

/// Finds an image by name, ID or digest, or returns `None` when none matches.
pub(crate) async fn find_image(
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
pub(crate) fn requested_image(spec: Option<v1::ImageSpec>) -> Result<String, Status> {
    match spec {
        Some(spec) if !spec.image.is_empty() => Ok(spec.image),
        _ => Err(Status::invalid_argument("image reference is empty")),
    }
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

#[cfg(test)]
mod tests {
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
    fn empty_image_reference_is_invalid_argument() {
        let cases = [None, Some(v1::ImageSpec::default())];
        for spec in cases {
            let status = requested_image(spec).expect_err("empty reference is rejected");
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }
}
