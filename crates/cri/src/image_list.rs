//! ListImages: every stored image, or the one that the filter's image
//! name finds.

use std::sync::Arc;

use hatoba_image::ImageManager;
use k8s_cri::v1;
use tonic::{Request, Response, Status};

use crate::error::escape_control;
use crate::image_service::{cri_image, find_image, run_blocking};

/// Lists images. A filter with an image name returns at most the image that
/// the name finds, by tag, digest reference or ID.
pub(crate) async fn list_images(
    images: &Arc<ImageManager>,
    request: Request<v1::ListImagesRequest>,
) -> Result<Response<v1::ListImagesResponse>, Status> {
    let name = request
        .into_inner()
        .filter
        .and_then(|filter| filter.image)
        .map(|spec| spec.image)
        .unwrap_or_default();
    tracing::debug!(image.r#ref = %escape_control(&name), "ListImages");

    let records = if name.is_empty() {
        run_blocking(images, ImageManager::list).await?
    } else {
        find_image(images, name).await?.into_iter().collect()
    };
    Ok(Response::new(v1::ListImagesResponse {
        images: records.iter().map(cri_image).collect(),
    }))
}
