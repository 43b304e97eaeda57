//! Connecting to the daemon's unix socket, shared by all client commands.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hatoba_cri::proto::hatoba_client::HatobaClient;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Largest response the CLI accepts, the same as the daemon's limit. A
/// ListImages response on a busy node can outgrow tonic's 4 MiB default.
const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// gRPC clients of the daemon's three services on one connection.
pub struct Clients {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    pub hatoba: HatobaClient<Channel>,
    /// The daemon's socket, named when the connection breaks.
    pub socket: PathBuf,
}

/// Connecting to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to hatoba at {}: is `hatoba daemon` running?", socket.display())]
    NotRunning { socket: PathBuf },

    #[error("cannot connect to hatoba at {}: {source}", socket.display())]
    Socket {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot open a gRPC channel to hatoba at {}: {source}", socket.display())]
    Channel {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to the daemon on `socket`.
pub async fn connect(socket: &Path) -> Result<Clients, ConnectError> {
    // Connect once by hand, so a missing daemon gets a clear message rather
    // than tonic's generic transport error. The channel's first connection
    // reuses this stream, and reconnects open new ones.
    let first = UnixStream::connect(socket)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ConnectError::NotRunning {
                    socket: socket.to_owned(),
                }
            }
            _ => ConnectError::Socket {
                socket: socket.to_owned(),
                source,
            },
        })?;
    let first = Arc::new(Mutex::new(Some(first)));

    // The URI is required by the API but unused: every connection goes to the socket.
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://hatoba.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            let first = first.lock().ok().and_then(|mut first| first.take());
            async move {
                let stream = match first {
                    Some(stream) => stream,
                    None => UnixStream::connect(path).await?,
                };
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|source| ConnectError::Channel {
            socket: socket.to_owned(),
            source,
        })?;

    Ok(Clients {
        runtime: RuntimeServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE),
        images: ImageServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE),
        hatoba: HatobaClient::new(channel),
        socket: socket.to_owned(),
    })
}

impl Clients {
    /// Turns a failed call into an error, see [`call_failed`].
    pub fn call_failed(&self, context: &str, status: tonic::Status) -> anyhow::Error {
        call_failed(&self.socket, context, status)
    }
}

/// Turns a failed call into an error that carries the daemon's message
/// without tonic's debug rendering of the status. A status that the client
/// raised because the connection broke reports the lost connection and
/// names the socket, in place of the HTTP/2 error.
pub fn call_failed(socket: &Path, context: &str, status: tonic::Status) -> anyhow::Error {
    // Statuses sent by the daemon arrive as headers and have no source.
    // tonic attaches the transport error to the statuses it raises itself.
    if let Some(cause) = std::error::Error::source(&status) {
        return anyhow::anyhow!(
            "{context}: lost the connection to hatoba at {}: {}",
            socket.display(),
            hatoba_cri::error_chain(cause)
        );
    }
    let message = status.message();
    if message.is_empty() {
        anyhow::anyhow!("{context}: {:?}", status.code())
    } else {
        anyhow::anyhow!("{context}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tonic::{Code, Status};

    use super::*;

    #[test]
    fn daemon_statuses_keep_their_message() {
        let socket = Path::new("/run/hatoba/hatoba.sock");
        let error = call_failed(
            socket,
            "failed to pull a.io/app",
            Status::new(Code::NotFound, "image a.io/app not found"),
        );
        assert_eq!(
            error.to_string(),
            "failed to pull a.io/app: image a.io/app not found"
        );
        let error = call_failed(
            socket,
            "failed to list images",
            Status::new(Code::Internal, ""),
        );
        assert_eq!(error.to_string(), "failed to list images: Internal");
    }

    #[test]
    fn transport_errors_name_the_lost_connection() {
        let status = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
        let error = call_failed(
            Path::new("/run/hatoba/hatoba.sock"),
            "failed to pull a.io/app",
            status,
        );
        assert_eq!(
            error.to_string(),
            "failed to pull a.io/app: lost the connection to hatoba at /run/hatoba/hatoba.sock: \
             connection reset by peer"
        );
    }
}
