//! ImageFsInfo: disk usage of the image store.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hatoba_image::{FsUsage, ImageManager};
use k8s_cri::v1;
use tonic::{Request, Response, Status};

use crate::error::image_error_status;

/// Reports the bytes and inodes that the image store uses.
pub(crate) async fn image_fs_info(
    images: &Arc<ImageManager>,
    _request: Request<v1::ImageFsInfoRequest>,
) -> Result<Response<v1::ImageFsInfoResponse>, Status> {
    tracing::debug!("ImageFsInfo");
    let usage = images
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
