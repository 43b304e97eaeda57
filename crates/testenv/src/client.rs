//! A CRI v1 gRPC client over the daemon's unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connecting to the CRI socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to connect to the cri socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to the CRI socket at `socket` and returns a RuntimeService and an
/// ImageService client sharing one channel.
pub async fn connect(
    socket: &Path,
) -> Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>), ClientError> {
    let channel = channel(socket).await?;
    Ok((
        RuntimeServiceClient::new(channel.clone()),
        ImageServiceClient::new(channel),
    ))
}

/// Opens a gRPC channel whose every connection dials the unix socket `socket`.
pub async fn channel(socket: &Path) -> Result<Channel, ClientError> {
    // Tonic requires a URI, but the connector below ignores it and opens
    // the unix socket instead.
    let endpoint = Endpoint::from_static("http://hatoba.invalid");
    let path = socket.to_path_buf();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })
}
