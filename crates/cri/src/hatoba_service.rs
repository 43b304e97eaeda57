//! hatoba's own gRPC service (`hatoba.v1.Hatoba`) for the CLI: pulls with
//! per-layer progress and loading image archives.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use hatoba_image::{Credentials, ImageError, ImageManager, ImageRecord, PullEvent};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{error_chain, image_error_status};
use crate::image_pull::spawn_pull;
use crate::image_service::join_task;
use crate::proto;
use crate::proto::hatoba_server::Hatoba;

/// The `hatoba.v1.Hatoba` service of the daemon.
pub struct HatobaService {
    images: Arc<ImageManager>,
    upload_dir: PathBuf,
}

impl HatobaService {
    /// Creates the service. Uploaded archives are written to temporary
    /// files in `upload_dir` while they are loaded.
    pub fn new(images: Arc<ImageManager>, upload_dir: PathBuf) -> Self {
        Self { images, upload_dir }
    }
}

type PullEventStream = Pin<Box<dyn Stream<Item = Result<proto::PullEvent, Status>> + Send>>;
type EventSender = UnboundedSender<Result<proto::PullEvent, Status>>;

#[tonic::async_trait]
impl Hatoba for HatobaService {
    type PullImageStream = PullEventStream;

    async fn pull_image(
        &self,
        request: Request<proto::PullRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        let request = request.into_inner();
        if request.reference.is_empty() {
            return Err(Status::invalid_argument("image reference is empty"));
        }
        let credentials =
            (!request.username.is_empty() || !request.password.is_empty()).then(|| Credentials {
                username: request.username,
                password: request.password,
                ..Credentials::default()
            });

        let (progress_sender, progress) = mpsc::unbounded_channel();
        let pull = spawn_pull(
            Arc::clone(&self.images),
            "hatoba.PullImage",
            request.reference,
            credentials,
            Some(progress_sender),
        );
        let (events, stream) = mpsc::unbounded_channel();
        tokio::spawn(forward_pull(pull, progress, events));
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            stream,
        ))))
    }

    async fn load_image(
        &self,
        request: Request<Streaming<proto::LoadChunk>>,
    ) -> Result<Response<proto::LoadResponse>, Status> {
        let upload = receive_archive(request.into_inner(), self.upload_dir.clone()).await?;

        // Load in a task of its own, so a client that goes away does not
        // stop the load halfway. The task deletes the upload when done.
        let images = Arc::clone(&self.images);
        let load = tokio::spawn(async move {
            let result = images.load(upload.path()).await;
            log_load(&result);
            drop(upload);
            result
        });
        let records = join_task(load, "load")
            .await?
            .map_err(|error| image_error_status(&error))?;

        let images = records
            .into_iter()
            .map(|record| proto::LoadedImage {
                id: record.id,
                repo_tags: record.repo_tags,
            })
            .collect();
        Ok(Response::new(proto::LoadResponse { images }))
    }
}

/// Forwards a pull's progress to the client, then its outcome as the last
/// message. A client that went away does not stop the pull, so send errors
/// are ignored.
async fn forward_pull(
    mut pull: JoinHandle<Result<ImageRecord, ImageError>>,
    mut progress: UnboundedReceiver<PullEvent>,
    events: EventSender,
) {
    let send_progress = |event: PullEvent| {
        if let Some(message) = proto_event(event) {
            let _ = events.send(Ok(message));
        }
    };

    // Wait on the task as well as the channel: the manager might keep a
    // clone of the sender, so a closed channel cannot mark the end.
    let outcome = loop {
        tokio::select! {
            biased;
            Some(event) = progress.recv() => send_progress(event),
            outcome = &mut pull => break outcome,
        }
    };
    while let Ok(event) = progress.try_recv() {
        send_progress(event);
    }

    let last = match outcome {
        Ok(Ok(record)) => Ok(proto::PullEvent {
            event: Some(proto::pull_event::Event::Done(proto::Done {
                image_id: record.id,
            })),
        }),
        Ok(Err(error)) => Err(image_error_status(&error)),
        Err(error) => Err(Status::internal(format!("image pull task failed: {error}"))),
    };
    let _ = events.send(last);
}

/// Converts a progress event for the wire. The manager's own `Done` is
/// dropped: the forwarder sends the final message from the pull's result.
fn proto_event(event: PullEvent) -> Option<proto::PullEvent> {
    use proto::pull_event::Event;

    let event = match event {
        PullEvent::Resolved {
            reference,
            manifest_digest,
            layers,
        } => Event::Resolved(proto::Resolved {
            reference,
            manifest_digest,
            layers: layers
                .into_iter()
                .map(|(digest, size)| proto::Layer { digest, size })
                .collect(),
        }),
        PullEvent::Downloading {
            digest,
            received,
            total,
        } => Event::Downloading(proto::Downloading {
            digest,
            received,
            total,
        }),
        PullEvent::Downloaded { digest, reused } => {
            Event::Downloaded(proto::LayerDone { digest, reused })
        }
        PullEvent::Unpacked { digest, reused } => {
            Event::Unpacked(proto::LayerDone { digest, reused })
        }
        PullEvent::Done { .. } => return None,
    };
    Some(proto::PullEvent { event: Some(event) })
}

/// Writes an uploaded archive to a temporary file in `dir`, which is deleted
/// when the returned handle drops. Rejects an empty or truncated upload.
async fn receive_archive(
    mut chunks: Streaming<proto::LoadChunk>,
    dir: PathBuf,
) -> Result<tempfile::NamedTempFile, Status> {
    let upload = tokio::task::spawn_blocking(move || {
        tempfile::Builder::new()
            .prefix("load-")
            .suffix(".tar")
            .tempfile_in(&dir)
            .map_err(|error| {
                Status::internal(format!(
                    "failed to create a temporary file in {}: {error}",
                    dir.display()
                ))
            })
    });
    let upload = join_task(upload, "upload").await??;
    let write_failed = |error: std::io::Error| {
        Status::internal(format!(
            "failed to write the uploaded archive to {}: {error}",
            upload.path().display()
        ))
    };

    let handle = upload.as_file().try_clone().map_err(write_failed)?;
    let mut file = tokio::fs::File::from_std(handle);
    let mut received: u64 = 0;
    let mut expected: Option<u64> = None;
    while let Some(chunk) = chunks.message().await? {
        if expected.is_none() && chunk.total_size != 0 {
            expected = Some(chunk.total_size);
        }
        file.write_all(&chunk.data).await.map_err(write_failed)?;
        received += chunk.data.len() as u64;
    }
    file.flush().await.map_err(write_failed)?;
    drop(file);

    if received == 0 {
        return Err(Status::invalid_argument("the uploaded archive is empty"));
    }
    if let Some(expected) = expected.filter(|&expected| expected != received) {
        return Err(Status::invalid_argument(format!(
            "the archive upload ended after {received} of {expected} bytes"
        )));
    }
    Ok(upload)
}

fn log_load(result: &Result<Vec<ImageRecord>, ImageError>) {
    match result {
        Ok(records) => {
            for record in records {
                let names = record.repo_tags.join(",");
                tracing::info!(rpc = "hatoba.LoadImage", image.id = %record.id, image.names = %names, "loaded image");
            }
        }
        Err(error) => {
            let error = error_chain(error);
            tracing::info!(rpc = "hatoba.LoadImage", %error, "image load failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_events_convert_and_done_is_dropped() {
        let resolved = proto_event(PullEvent::Resolved {
            reference: "127.0.0.1:5000/testenv/busybox:latest".into(),
            manifest_digest: "sha256:aa".into(),
            layers: vec![("sha256:bb".into(), 42)],
        });
        let Some(proto::PullEvent {
            event: Some(proto::pull_event::Event::Resolved(resolved)),
        }) = resolved
        else {
            panic!("Resolved converts to a resolved event");
        };
        assert_eq!(resolved.manifest_digest, "sha256:aa");
        assert_eq!(resolved.layers[0].digest, "sha256:bb");
        assert_eq!(resolved.layers[0].size, 42);

        let unpacked = proto_event(PullEvent::Unpacked {
            digest: "sha256:bb".into(),
            reused: true,
        });
        assert!(matches!(
            unpacked,
            Some(proto::PullEvent {
                event: Some(proto::pull_event::Event::Unpacked(proto::LayerDone {
                    reused: true,
                    ..
                }))
            })
        ));

        let done = proto_event(PullEvent::Done {
            image_id: "sha256:cc".into(),
        });
        assert!(done.is_none());
    }
}
