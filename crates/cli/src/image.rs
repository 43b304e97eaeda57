//! `hatoba image ...`: image commands over the CRI ImageService and
//! hatoba's own service.

use std::path::Path;

use anyhow::Context as _;
use hatoba_cri::proto;
use k8s_cri::v1;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Clients, connect};
use crate::format::{digest_for, human_size, short_id, split_repo_tag, table};
use crate::output::is_closed_stdout;
use crate::{AlreadyReported, ImageCommand, OutputFormat, pull};

/// Size of one chunk of an archive streamed to the daemon, well below
/// tonic's 4 MiB message limit.
const LOAD_CHUNK_SIZE: usize = 1024 * 1024;

/// Runs an image command against the daemon on `socket`.
pub async fn run(socket: &Path, command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Pull {
            reference,
            creds,
            quiet,
        } => {
            let mut clients = connect(socket).await?;
            pull::pull(&mut clients, &reference, creds.as_deref(), quiet).await
        }
        ImageCommand::Ls {
            quiet,
            digests,
            format,
        } => list(&mut connect(socket).await?, quiet, digests, format).await,
        ImageCommand::Rm { names } => remove(&mut connect(socket).await?, &names).await,
        ImageCommand::Inspect { names } => inspect(&mut connect(socket).await?, &names).await,
        ImageCommand::Load { file, input } => {
            let input = file
                .or(input)
                .context("name the archive to load: hatoba image load FILE")?;
            // Open the archive before connecting, so a wrong path fails first.
            let archive = tokio::fs::File::open(&input)
                .await
                .with_context(|| format!("failed to open {}", input.display()))?;
            load(&mut connect(socket).await?, archive, &input).await
        }
    }
}

async fn list(
    clients: &mut Clients,
    quiet: bool,
    digests: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut images = clients
        .images
        .list_images(v1::ListImagesRequest { filter: None })
        .await
        .map_err(|status| clients.call_failed("failed to list images", status))?
        .into_inner()
        .images;
    images.sort_by(|a, b| a.repo_tags.cmp(&b.repo_tags).then(a.id.cmp(&b.id)));

    if quiet {
        for image in &images {
            outln!("{}", short_id(&image.id))?;
        }
        return Ok(());
    }
    if format == OutputFormat::Json {
        let list: Vec<Value> = images.iter().map(image_summary).collect();
        outln!("{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(());
    }

    let mut header = vec!["REPOSITORY", "TAG"];
    if digests {
        header.push("DIGEST");
    }
    header.extend(["IMAGE ID", "SIZE"]);
    let mut rows: Vec<Vec<String>> = images
        .iter()
        .flat_map(|image| list_rows(image, digests))
        .collect();
    // Repository, then tag.
    rows.sort_by(|a, b| a[..2].cmp(&b[..2]));
    out!("{}", table(&header, &rows))?;
    Ok(())
}

/// Returns the `image ls` rows of one image: one per tag, or one
/// `<none>` row for an image without tags.
fn list_rows(image: &v1::Image, digests: bool) -> Vec<Vec<String>> {
    let names: Vec<(&str, &str)> = if image.repo_tags.is_empty() {
        let repository = image
            .repo_digests
            .first()
            .and_then(|name| name.split_once('@'))
            .map_or("<none>", |(repository, _)| repository);
        vec![(repository, "<none>")]
    } else {
        image
            .repo_tags
            .iter()
            .map(|name| split_repo_tag(name))
            .collect()
    };

    names
        .into_iter()
        .map(|(repository, tag)| {
            let mut row = vec![repository.to_owned(), tag.to_owned()];
            if digests {
                let digest = digest_for(&image.repo_digests, repository).unwrap_or("<none>");
                row.push(digest.to_owned());
            }
            row.push(short_id(&image.id).to_owned());
            row.push(human_size(image.size));
            row
        })
        .collect()
}

fn image_summary(image: &v1::Image) -> Value {
    json!({
        "id": image.id,
        "names": image.repo_tags,
        "digests": image.repo_digests,
        "size": image.size,
    })
}

/// Looks up an image by name, or returns `None` when the daemon does not have it.
async fn image_status(
    clients: &mut Clients,
    name: &str,
    verbose: bool,
) -> anyhow::Result<Option<v1::ImageStatusResponse>> {
    let request = v1::ImageStatusRequest {
        image: Some(v1::ImageSpec {
            image: name.to_owned(),
            ..Default::default()
        }),
        verbose,
    };
    let response = clients
        .images
        .image_status(request)
        .await
        .map_err(|status| clients.call_failed(&format!("failed to look up image {name}"), status))?
        .into_inner();
    Ok(response.image.is_some().then_some(response))
}

/// Removes each image, printing its names and ID, like `podman rmi`. Every
/// name is tried, and any failure makes the command fail at the end.
async fn remove(clients: &mut Clients, names: &[String]) -> anyhow::Result<()> {
    let mut failed = 0;
    for name in names {
        if let Err(error) = remove_one(clients, name).await {
            // A closed stdout ends the command, which has done its work.
            if is_closed_stdout(&error) {
                return Err(error);
            }
            errln!("Error: {}", hatoba_cri::error_chain(error.as_ref()));
            failed += 1;
        }
    }
    finish_batch(failed, names.len())
}

async fn remove_one(clients: &mut Clients, name: &str) -> anyhow::Result<()> {
    let image = image_status(clients, name, false)
        .await?
        .and_then(|response| response.image)
        .with_context(|| not_known(name))?;

    // Remove by ID, so exactly the image looked up goes.
    let request = v1::RemoveImageRequest {
        image: Some(v1::ImageSpec {
            image: image.id.clone(),
            ..Default::default()
        }),
    };
    clients
        .images
        .remove_image(request)
        .await
        .map_err(|status| clients.call_failed(&format!("failed to remove image {name}"), status))?;

    for tag in &image.repo_tags {
        outln!("Untagged: {tag}")?;
    }
    outln!("Deleted: {}", image.id)?;
    Ok(())
}

/// Returns the message for a name that finds no image, with a hint when the
/// name looks like an ID prefix that is too short to be used as one.
fn not_known(name: &str) -> String {
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if (1..4).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        format!("image not known: {name} (an ID prefix needs at least 4 characters)")
    } else {
        format!("image not known: {name}")
    }
}

/// Prints a JSON array with the details of each image found. Unknown
/// names are reported on stderr and make the command fail.
async fn inspect(clients: &mut Clients, names: &[String]) -> anyhow::Result<()> {
    let mut found = Vec::new();
    let mut failed = 0;
    for name in names {
        match inspect_one(clients, name).await {
            Ok(details) => found.push(details),
            Err(error) => {
                errln!("Error: {}", hatoba_cri::error_chain(error.as_ref()));
                failed += 1;
            }
        }
    }
    outln!("{}", serde_json::to_string_pretty(&found)?)?;
    finish_batch(failed, names.len())
}

async fn inspect_one(clients: &mut Clients, name: &str) -> anyhow::Result<Value> {
    let response = image_status(clients, name, true)
        .await?
        .with_context(|| not_known(name))?;
    let image = response.image.with_context(|| not_known(name))?;

    // The daemon's verbose `info` contains the image config and the layers.
    let info: Value = match response.info.get("info") {
        Some(text) => serde_json::from_str(text)
            .with_context(|| format!("the daemon sent invalid details for image {name}"))?,
        None => Value::Null,
    };

    let mut details = image_summary(&image);
    details["manifestDigest"] = info["manifestDigest"].clone();
    details["config"] = info["imageSpec"].clone();
    details["layers"] = info["layers"].clone();
    Ok(details)
}

/// Streams an archive to the daemon and prints the loaded images' names.
async fn load(
    clients: &mut Clients,
    mut archive: tokio::fs::File,
    input: &Path,
) -> anyhow::Result<()> {
    let total_size = archive
        .metadata()
        .await
        .with_context(|| format!("failed to read the size of {}", input.display()))?
        .len();
    if total_size == 0 {
        anyhow::bail!("{} is empty", input.display());
    }

    // Read in a task of its own, so the gRPC stream can pull chunks while
    // the call is in flight. A read error ends the stream early, and the
    // daemon rejects the short upload.
    let (chunks, stream) = mpsc::channel(4);
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut data = vec![0; LOAD_CHUNK_SIZE];
            let read = archive.read(&mut data).await?;
            if read == 0 {
                return Ok::<(), std::io::Error>(());
            }
            data.truncate(read);
            let chunk = proto::LoadChunk {
                data,
                total_size: if first { total_size } else { 0 },
            };
            first = false;
            if chunks.send(chunk).await.is_err() {
                // The call ended, and its result explains why.
                return Ok(());
            }
        }
    });

    let result = clients.hatoba.load_image(ReceiverStream::new(stream)).await;
    let read = reader
        .await
        .context("the archive reader task failed")?
        .with_context(|| format!("failed to read {}", input.display()));
    let response = result.map_err(|status| {
        clients.call_failed(&format!("failed to load {}", input.display()), status)
    });
    // A read error explains a rejected upload better than the daemon can.
    read?;
    let loaded = response?.into_inner();

    for image in loaded.images {
        if image.repo_tags.is_empty() {
            outln!("Loaded image: {}", image.id)?;
        }
        for tag in image.repo_tags {
            outln!("Loaded image: {tag}")?;
        }
    }
    Ok(())
}

/// Fails when any item of a batch failed. Their errors are already printed.
fn finish_batch(failed: usize, total: usize) -> anyhow::Result<()> {
    if failed == 0 {
        Ok(())
    } else {
        Err(AlreadyReported { failed, total }.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_known_hints_at_short_id_prefixes() {
        assert!(not_known("02").contains("at least 4 characters"));
        assert!(not_known("sha256:0a").contains("at least 4 characters"));
        assert_eq!(not_known("busybox"), "image not known: busybox");
        assert_eq!(not_known("02ab"), "image not known: 02ab");
    }

    fn image(tags: &[&str], digests: &[&str]) -> v1::Image {
        v1::Image {
            id: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .to_owned(),
            repo_tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            repo_digests: digests.iter().map(|digest| (*digest).to_owned()).collect(),
            size: 1_234_567,
            ..Default::default()
        }
    }

    #[test]
    fn list_rows_has_one_row_per_tag() {
        let image = image(
            &[
                "127.0.0.1:5000/testenv/busybox:latest",
                "127.0.0.1:5000/testenv/busybox:1.35",
            ],
            &[],
        );
        let rows = list_rows(&image, false);
        assert_eq!(
            rows,
            [
                [
                    "127.0.0.1:5000/testenv/busybox",
                    "latest",
                    "0123456789ab",
                    "1.23 MB"
                ],
                [
                    "127.0.0.1:5000/testenv/busybox",
                    "1.35",
                    "0123456789ab",
                    "1.23 MB"
                ],
            ]
        );
    }

    #[test]
    fn list_rows_of_untagged_image_show_none() {
        let image = image(&[], &["a.io/app@sha256:feed"]);
        let rows = list_rows(&image, true);
        assert_eq!(
            rows,
            [[
                "a.io/app",
                "<none>",
                "sha256:feed",
                "0123456789ab",
                "1.23 MB"
            ]]
        );
    }

    #[test]
    fn finish_batch_fails_when_any_item_failed() {
        assert!(finish_batch(0, 2).is_ok());
        let error = finish_batch(1, 2).expect_err("one failure fails the batch");
        assert!(error.is::<AlreadyReported>());
    }
}
