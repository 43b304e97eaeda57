//! ImageStatus: one image, with the image config and layers when verbose.

use std::collections::HashMap;
use std::sync::Arc;

use hatoba_image::{ImageManager, ImageRecord};
use k8s_cri::v1;
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::error::{escape_control, image_error_status};
use crate::image_service::{cri_image, find_image, requested_image, run_blocking};

/// Returns the status of one image, or an empty response when no image
/// matches.
pub(crate) async fn image_status(
    images: &Arc<ImageManager>,
    request: Request<v1::ImageStatusRequest>,
) -> Result<Response<v1::ImageStatusResponse>, Status> {
    let request = request.into_inner();
    let name = requested_image(request.image)?;
    tracing::debug!(image.r#ref = %escape_control(&name), verbose = request.verbose, "ImageStatus");

    // The CRI expects an empty response, not an error, for an unknown image.
    let Some(record) = find_image(images, name).await? else {
        return Ok(Response::new(v1::ImageStatusResponse::default()));
    };

    let info = if request.verbose {
        let info = verbose_info(images, &record).await?;
        HashMap::from([("info".to_owned(), info)])
    } else {
        HashMap::new()
    };
    Ok(Response::new(v1::ImageStatusResponse {
        image: Some(cri_image(&record)),
        info,
    }))
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
