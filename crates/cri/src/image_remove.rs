//! RemoveImage: removes an image and frees what no other image uses.

use std::sync::Arc;

use hatoba_image::{ImageError, ImageManager, ImageRecord};
use k8s_cri::v1;
use tonic::{Request, Response, Status};

use crate::error::{error_chain, escape_control, image_error_status};
use crate::image_service::{join_task, requested_image};

/// Removes an image with all of its names. Removing an unknown image
/// succeeds, as the CRI requires.
pub(crate) async fn remove_image(
    images: &Arc<ImageManager>,
    request: Request<v1::RemoveImageRequest>,
) -> Result<Response<v1::RemoveImageResponse>, Status> {
    let name = requested_image(request.into_inner().image)?;

    // Run the removal in its own task so a client that goes away does
    // not stop it between freeing blobs and updating the metadata.
    let images = Arc::clone(images);
    let removal = tokio::spawn(async move {
        let result = images.remove(&name).await;
        log_removal(&name, &result);
        result
    });
    match join_task(removal, "removal").await? {
        // RemoveImage is idempotent: an image that is already gone is fine.
        Ok(_) | Err(ImageError::NotFound { .. }) => Ok(Response::new(v1::RemoveImageResponse {})),
        Err(error) => Err(image_error_status(&error)),
    }
}

fn log_removal(name: &str, result: &Result<Option<ImageRecord>, ImageError>) {
    match result {
        Ok(Some(record)) => {
            tracing::info!(rpc = "RemoveImage", image.r#ref = %escape_control(name), image.id = %record.id, "removed image");
        }
        Ok(None) | Err(ImageError::NotFound { .. }) => {
            tracing::info!(rpc = "RemoveImage", image.r#ref = %escape_control(name), "image to remove was already gone");
        }
        Err(error) => {
            let error = error_chain(error);
            tracing::info!(rpc = "RemoveImage", image.r#ref = %escape_control(name), %error, "image removal failed");
        }
    }
}
