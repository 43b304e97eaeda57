//! Pulling an image: resolve the reference, store the manifest and config,
//! fetch and unpack each layer once, then write the image record.
//!
//! The record is the commit point: until it is written nothing of the pull
//! is visible, and the pull's leases keep its blobs and snapshots safe from
//! a concurrent removal's garbage collection. A pull whose future is
//! dropped keeps what it already stored, and the next pull reuses it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use crate::content::Expected;
use crate::digest::{Digest, chain_ids};
use crate::gc::{LeaseSet, Resource};
use crate::manager::{Inner, blocking};
use crate::registry::Descriptor;
use crate::store::Images;
use crate::unpack::{Compression, Layer};
use crate::{
    Credentials, ImageError, ImageRecord, LayerRecord, PullEvent, PullProgress, Reference,
};

/// A `Downloading` event is sent after this many new bytes...
const PROGRESS_BYTES: u64 = 256 * 1024;
/// ...or after this much time, whichever comes first.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Pulls `reference` and stores it under that name.
pub(crate) async fn pull(
    inner: &Arc<Inner>,
    reference: &str,
    credentials: Option<Credentials>,
    progress: Option<PullProgress>,
) -> Result<ImageRecord, ImageError> {
    let reference = Reference::parse(reference)?;
    let name = reference.to_string();
    let credentials = credentials.as_ref();
    let resolved = inner.registry.resolve(&reference, credentials).await?;

    let manifest_digest = parse_digest(&name, &resolved.manifest_digest)?;
    let config_digest = parse_digest(&name, &resolved.manifest.config.digest)?;
    let mut leases = LeaseSet::new(&inner.leases);
    leases.add(Resource::Blob(manifest_digest.clone()));
    leases.add(Resource::Blob(config_digest.clone()));

    store_bytes(
        inner,
        &name,
        &manifest_digest,
        resolved.manifest_bytes.clone(),
    )
    .await?;
    // The index is kept too, so the repo digest names content in the store.
    if let Some(index_bytes) = &resolved.index_bytes {
        let index_digest = parse_digest(&name, &resolved.top_digest)?;
        leases.add(Resource::Blob(index_digest.clone()));
        store_bytes(inner, &name, &index_digest, index_bytes.clone()).await?;
    }
    let source = Source {
        inner,
        reference: &reference,
        credentials,
        progress: progress.as_ref(),
    };
    source
        .ensure_blob(&config_digest, resolved.manifest.config.size)
        .await?;
    let config_bytes = {
        let inner = Arc::clone(inner);
        let digest = config_digest.clone();
        blocking("read image config", &inner.config.root.clone(), move || {
            inner.content.read(&digest)
        })
        .await?
    };
    let config = ImageConfigSummary::parse(&name, &config_bytes)?;
    let layers = plan_layers(&name, &resolved.manifest.layers, &config.diff_ids)?;
    for layer in &layers {
        leases.add(Resource::Blob(layer.digest.clone()));
        leases.add(Resource::Snapshot(layer.chain_id.clone()));
    }

    send(
        progress.as_ref(),
        PullEvent::Resolved {
            reference: name.clone(),
            manifest_digest: manifest_digest.to_string(),
            layers: layers
                .iter()
                .map(|l| (l.digest.to_string(), l.size))
                .collect(),
        },
    );

    let limit = inner.config.max_concurrent_downloads.max(1);
    // Collected first: a lazy `map` closure in the stream would make the
    // future fail `Send` checks for `tokio::spawn` (a rustc limitation with
    // higher-ranked lifetimes).
    let tasks: Vec<_> = layers
        .iter()
        .map(|layer| source.prepare_layer(layer))
        .collect();
    futures::stream::iter(tasks)
        .buffer_unordered(limit)
        .try_collect::<Vec<()>>()
        .await?;

    let index_size = resolved.index_bytes.as_ref().map_or(0, Vec::len);
    let size = (resolved.manifest_bytes.len() + index_size) as u64
        + resolved.manifest.config.size
        + layers.iter().map(|l| l.size).sum::<u64>();
    let record = ImageRecord {
        id: config_digest.to_string(),
        // A tag next to a digest is not checked against it, so only the
        // digest names the image then.
        repo_tags: match reference.digest {
            Some(_) => Vec::new(),
            None => reference.tagged().into_iter().collect(),
        },
        repo_digests: vec![reference.with_digest(&resolved.top_digest)],
        manifest_digest: manifest_digest.to_string(),
        manifest_media_type: resolved.manifest_media_type.clone(),
        config_digest: config_digest.to_string(),
        layers: layers.iter().map(PlannedLayer::record).collect(),
        size,
        user: config.user,
        created: config.created,
        pinned: false,
    };
    let record = commit(inner, record).await?;
    drop(leases);

    send(
        progress.as_ref(),
        PullEvent::Done {
            image_id: record.id.clone(),
        },
    );
    Ok(record)
}

/// Registry source and progress channel of one pull.
struct Source<'a> {
    inner: &'a Arc<Inner>,
    reference: &'a Reference,
    credentials: Option<&'a Credentials>,
    progress: Option<&'a PullProgress>,
}

impl Source<'_> {
    /// Makes sure a layer's snapshot exists: reuses it, or fetches the blob
    /// if needed and unpacks it.
    async fn prepare_layer(&self, layer: &PlannedLayer) -> Result<(), ImageError> {
        let digest = layer.digest.to_string();
        // A reused snapshot still needs its blob in the store, because the
        // image record names it: a collection may have freed the blob while
        // another image kept the snapshot.
        let reused = |blob_reused| {
            send(
                self.progress,
                PullEvent::Downloaded {
                    digest: digest.clone(),
                    reused: blob_reused,
                },
            );
            send(
                self.progress,
                PullEvent::Unpacked {
                    digest: digest.clone(),
                    reused: true,
                },
            );
        };
        if self.inner.snapshots.exists(&layer.chain_id) {
            reused(self.ensure_blob(&layer.digest, layer.size).await?);
            return Ok(());
        }

        let snapshot_lock = self
            .inner
            .locks
            .lock(Resource::Snapshot(layer.chain_id.clone()))
            .await;
        if self.inner.snapshots.exists(&layer.chain_id) {
            reused(self.ensure_blob(&layer.digest, layer.size).await?);
            return Ok(());
        }

        let blob_reused = self.ensure_blob(&layer.digest, layer.size).await?;
        send(
            self.progress,
            PullEvent::Downloaded {
                digest: digest.clone(),
                reused: blob_reused,
            },
        );

        let unpacked = unpack_once(self.inner, layer.clone(), snapshot_lock).await?;
        send(
            self.progress,
            PullEvent::Unpacked {
                digest,
                reused: !unpacked,
            },
        );
        Ok(())
    }

    /// Fetches a blob into the content store unless it is there. Returns
    /// whether it was already there. Concurrent calls for one digest fetch
    /// it once.
    async fn ensure_blob(&self, digest: &Digest, size: u64) -> Result<bool, ImageError> {
        let name = self.reference.to_string();
        if self.inner.content.contains(digest) {
            self.inner.content.check_size(&name, digest, size)?;
            return Ok(true);
        }
        let _lock = self.inner.locks.lock(Resource::Blob(digest.clone())).await;
        if self.inner.content.contains(digest) {
            self.inner.content.check_size(&name, digest, size)?;
            return Ok(true);
        }

        let blob = self
            .inner
            .registry
            .fetch_blob(self.reference, &digest.to_string(), self.credentials)
            .await?;
        let mut throttle = Throttle::new(size);
        let stream = std::pin::pin!(blob.into_stream());
        self.inner
            .content
            .write_stream(
                Expected {
                    reference: &name,
                    digest,
                    size: Some(size),
                },
                stream,
                |received| {
                    if throttle.due(received, Instant::now()) {
                        send(
                            self.progress,
                            PullEvent::Downloading {
                                digest: digest.to_string(),
                                received,
                                total: size,
                            },
                        );
                    }
                },
            )
            .await?;
        Ok(false)
    }
}

/// Limits `Downloading` events of one blob to one per 256 KiB or 100 ms,
/// whichever comes first, plus one when the blob is complete.
struct Throttle {
    total: u64,
    sent_bytes: u64,
    sent_at: Instant,
}

impl Throttle {
    fn new(total: u64) -> Self {
        Self {
            total,
            sent_bytes: 0,
            sent_at: Instant::now(),
        }
    }

    /// Returns whether an event for `received` bytes is due at `now`.
    fn due(&mut self, received: u64, now: Instant) -> bool {
        let due = received >= self.total
            || received - self.sent_bytes >= PROGRESS_BYTES
            || now.saturating_duration_since(self.sent_at) >= PROGRESS_INTERVAL;
        if due {
            self.sent_bytes = received;
            self.sent_at = now;
        }
        due
    }
}

/// Sends a progress event. A receiver that went away is not an error.
fn send(progress: Option<&PullProgress>, event: PullEvent) {
    if let Some(progress) = progress {
        let _ = progress.send(event);
    }
}

/// Unpacks a layer whose blob is in the content store, unless its snapshot
/// exists. Returns whether it unpacked.
pub(crate) async fn unpack_if_missing(
    inner: &Arc<Inner>,
    layer: &PlannedLayer,
) -> Result<bool, ImageError> {
    if inner.snapshots.exists(&layer.chain_id) {
        return Ok(false);
    }
    let lock = inner
        .locks
        .lock(Resource::Snapshot(layer.chain_id.clone()))
        .await;
    unpack_once(inner, layer.clone(), lock).await
}

/// Unpacks a layer whose blob is in the content store into its snapshot,
/// unless the snapshot exists. Returns whether it unpacked. The snapshot
/// lock moves into the blocking task: a dropped caller does not release it
/// while the unpack still runs.
pub(crate) async fn unpack_once(
    inner: &Arc<Inner>,
    layer: PlannedLayer,
    snapshot_lock: tokio::sync::OwnedMutexGuard<()>,
) -> Result<bool, ImageError> {
    let task_inner = Arc::clone(inner);
    blocking("unpack layer", &inner.config.root.clone(), move || {
        let _lock = snapshot_lock;
        let blob = task_inner.content.open(&layer.digest)?;
        let digest = layer.digest.to_string();
        task_inner.snapshots.create(
            &layer.chain_id,
            blob,
            Layer {
                digest: &digest,
                compression: layer.compression,
                diff_id: &layer.diff_id,
            },
        )
    })
    .await
}

/// Stores a manifest or other small document as a blob, verifying it.
pub(crate) async fn store_bytes(
    inner: &Arc<Inner>,
    reference: &str,
    digest: &Digest,
    bytes: Vec<u8>,
) -> Result<(), ImageError> {
    if inner.content.contains(digest) {
        return Ok(());
    }
    let task_inner = Arc::clone(inner);
    let reference = reference.to_string();
    let digest = digest.clone();
    blocking("store blob", &inner.config.root.clone(), move || {
        task_inner.content.write_bytes(
            Expected {
                reference: &reference,
                digest: &digest,
                size: Some(bytes.len() as u64),
            },
            &bytes,
        )
    })
    .await
}

pub(crate) fn parse_digest(reference: &str, digest: &str) -> Result<Digest, ImageError> {
    Digest::parse(digest).map_err(|e| e.for_image(reference))
}

/// The parts of an image config the store needs.
#[derive(Debug)]
pub(crate) struct ImageConfigSummary {
    pub diff_ids: Vec<Digest>,
    pub user: String,
    pub created: Option<String>,
}

impl ImageConfigSummary {
    /// Parses the fields the store uses from an image config blob.
    pub(crate) fn parse(reference: &str, bytes: &[u8]) -> Result<Self, ImageError> {
        #[derive(Deserialize)]
        struct Raw {
            created: Option<String>,
            config: Option<RawExec>,
            rootfs: Option<RawRootFs>,
        }
        #[derive(Deserialize)]
        struct RawExec {
            #[serde(rename = "User")]
            user: Option<String>,
        }
        #[derive(Deserialize)]
        struct RawRootFs {
            #[serde(rename = "type")]
            kind: String,
            diff_ids: Vec<String>,
        }

        let invalid = |reason: String| ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "image config",
            reason,
        };
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        let rootfs = raw
            .rootfs
            .ok_or_else(|| invalid("rootfs is missing".into()))?;
        if rootfs.kind != "layers" {
            return Err(invalid(format!(
                "rootfs type is {:?}, expected \"layers\"",
                rootfs.kind
            )));
        }
        let diff_ids = rootfs
            .diff_ids
            .iter()
            .map(|d| parse_digest(reference, d))
            .collect::<Result<_, _>>()?;

        Ok(Self {
            diff_ids,
            user: raw.config.and_then(|c| c.user).unwrap_or_default(),
            created: raw.created,
        })
    }
}

/// One layer of an image, with everything needed to fetch and unpack it.
#[derive(Debug, Clone)]
pub(crate) struct PlannedLayer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub compression: Compression,
    pub diff_id: Digest,
    pub chain_id: Digest,
}

impl PlannedLayer {
    pub(crate) fn record(&self) -> LayerRecord {
        LayerRecord {
            digest: self.digest.to_string(),
            media_type: self.media_type.clone(),
            size: self.size,
            diff_id: self.diff_id.to_string(),
            chain_id: self.chain_id.to_string(),
        }
    }
}

/// Pairs manifest layers with the config's diff IDs and computes chain IDs.
pub(crate) fn plan_layers(
    reference: &str,
    descriptors: &[Descriptor],
    diff_ids: &[Digest],
) -> Result<Vec<PlannedLayer>, ImageError> {
    if descriptors.len() != diff_ids.len() {
        return Err(ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "image config",
            reason: format!(
                "the manifest has {} layers but rootfs.diff_ids has {} entries",
                descriptors.len(),
                diff_ids.len()
            ),
        });
    }

    let chain = chain_ids(diff_ids);
    descriptors
        .iter()
        .zip(diff_ids.iter().zip(chain))
        .map(|(descriptor, (diff_id, chain_id))| {
            let compression =
                Compression::from_media_type(&descriptor.media_type).ok_or_else(|| {
                    ImageError::UnsupportedMediaType {
                        reference: reference.to_string(),
                        media_type: descriptor.media_type.clone(),
                    }
                })?;
            Ok(PlannedLayer {
                digest: parse_digest(reference, &descriptor.digest)?,
                media_type: descriptor.media_type.clone(),
                size: descriptor.size,
                compression,
                diff_id: diff_id.clone(),
                chain_id,
            })
        })
        .collect()
}

/// Writes an image record, the commit point of a pull or load. Returns the
/// stored record, merged with an existing record of the same image, and
/// removes garbage if an image lost its last name to this one.
pub(crate) async fn commit(
    inner: &Arc<Inner>,
    record: ImageRecord,
) -> Result<ImageRecord, ImageError> {
    let (stored, orphaned) = inner
        .store
        .update(move |images| merge_record(images, record))
        .await?;
    if orphaned > 0 {
        inner.collect_garbage().await?;
    }
    Ok(stored)
}

/// Adds `record` to `images`. Its names move to it from any other image,
/// and another image left without any name is removed, as containerd does.
/// An existing record of the same image gains the new names and keeps its
/// content. Returns the stored record and how many images were removed.
pub(crate) fn merge_record(images: &mut Images, mut record: ImageRecord) -> (ImageRecord, usize) {
    let mut orphans = Vec::new();
    for other in images.values_mut().filter(|other| other.id != record.id) {
        let had_names = !other.repo_tags.is_empty() || !other.repo_digests.is_empty();
        other.repo_tags.retain(|t| !record.repo_tags.contains(t));
        other
            .repo_digests
            .retain(|d| !record.repo_digests.contains(d));
        if had_names && other.repo_tags.is_empty() && other.repo_digests.is_empty() {
            orphans.push(other.id.clone());
        }
    }
    for id in &orphans {
        images.remove(id);
    }

    if let Some(existing) = images.get(&record.id) {
        let mut tags = existing.repo_tags.clone();
        tags.extend(
            record
                .repo_tags
                .iter()
                .filter(|t| !existing.repo_tags.contains(t))
                .cloned(),
        );
        let mut digests = existing.repo_digests.clone();
        digests.extend(
            record
                .repo_digests
                .iter()
                .filter(|d| !existing.repo_digests.contains(d))
                .cloned(),
        );
        // The stored manifest and layers stay: the same config can come in
        // another manifest (other compression, an archive), and replacing
        // them would let a collection free blobs the old names point at.
        // NOTE: a record has room for one manifest, so the layer blobs of the newer
        // manifest are freed even though its repo digest is kept.
        record = ImageRecord {
            repo_tags: tags,
            repo_digests: digests,
            ..existing.clone()
        };
    }
    images.insert(record.id.clone(), record.clone());
    (record, orphans.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: char, tags: &[&str], digests: &[&str]) -> ImageRecord {
        ImageRecord {
            id: format!("sha256:{}", id.to_string().repeat(64)),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            manifest_digest: String::new(),
            manifest_media_type: String::new(),
            config_digest: String::new(),
            layers: vec![],
            size: 0,
            user: String::new(),
            created: None,
            pinned: false,
        }
    }

    fn insert(images: &mut Images, record: ImageRecord) {
        images.insert(record.id.clone(), record);
    }

    #[test]
    fn moving_tag_keeps_other_names_of_old_image() {
        let mut images = Images::new();
        insert(
            &mut images,
            record('a', &["r/x:latest", "r/x:v1"], &["r/x@sha256:aa"]),
        );

        let (_, orphaned) = merge_record(
            &mut images,
            record('b', &["r/x:latest"], &["r/x@sha256:bb"]),
        );

        assert_eq!(orphaned, 0);
        let old = &images[&format!("sha256:{}", "a".repeat(64))];
        assert_eq!(old.repo_tags, vec!["r/x:v1".to_string()]);
        assert_eq!(old.repo_digests, vec!["r/x@sha256:aa".to_string()]);
    }

    #[test]
    fn image_left_without_names_is_removed() {
        let mut images = Images::new();
        insert(&mut images, record('a', &["r/x:latest"], &[]));

        let (_, orphaned) = merge_record(
            &mut images,
            record('b', &["r/x:latest"], &["r/x@sha256:bb"]),
        );

        assert_eq!(orphaned, 1);
        assert_eq!(images.len(), 1);
        assert!(images.contains_key(&format!("sha256:{}", "b".repeat(64))));
    }

    #[test]
    fn unnamed_image_is_not_removed_by_other_commits() {
        let mut images = Images::new();
        insert(&mut images, record('a', &[], &[]));

        let (_, orphaned) = merge_record(&mut images, record('b', &["r/y:latest"], &[]));

        assert_eq!(orphaned, 0);
        assert_eq!(images.len(), 2);
    }

    #[test]
    fn same_image_under_new_tag_gains_the_tag() {
        let mut images = Images::new();
        let mut pinned = record('a', &["r/x:v1"], &["r/x@sha256:aa"]);
        pinned.pinned = true;
        insert(&mut images, pinned);

        let (stored, _) = merge_record(&mut images, record('a', &["r/x:v2"], &["r/x@sha256:aa"]));

        assert_eq!(
            stored.repo_tags,
            vec!["r/x:v1".to_string(), "r/x:v2".to_string()]
        );
        assert_eq!(stored.repo_digests, vec!["r/x@sha256:aa".to_string()]);
        assert!(stored.pinned, "pinning survives a re-pull");
        assert_eq!(images.len(), 1);
    }

    #[test]
    fn config_summary_reads_user_created_and_diff_ids() {
        let diff = Digest::sha256_of(b"layer");
        let json = format!(
            r#"{{"created":"2024-05-01T10:00:00Z","config":{{"User":"1000:1000"}},
                "rootfs":{{"type":"layers","diff_ids":["{diff}"]}}}}"#
        );
        let summary =
            ImageConfigSummary::parse("r/x:latest", json.as_bytes()).expect("parse config");
        assert_eq!(summary.diff_ids, vec![diff]);
        assert_eq!(summary.user, "1000:1000");
        assert_eq!(summary.created.as_deref(), Some("2024-05-01T10:00:00Z"));
    }

    #[test]
    fn config_summary_accepts_null_config() {
        let json = br#"{"config":null,"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let summary = ImageConfigSummary::parse("r/x:latest", json).expect("parse config");
        assert_eq!(summary.user, "");
        assert!(summary.created.is_none());
    }

    #[test]
    fn config_summary_rejects_invalid_diff_id() {
        let json = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:../../x"]}}"#;
        let err = ImageConfigSummary::parse("r/x:latest", json).expect_err("invalid diff id");
        assert!(
            matches!(err, ImageError::InvalidContent { what: "digest", .. }),
            "{err}"
        );
    }

    #[test]
    fn throttle_sends_per_256_kib() {
        let start = Instant::now();
        let mut throttle = Throttle::new(1024 * 1024);
        throttle.sent_at = start;
        assert!(!throttle.due(1000, start));
        assert!(throttle.due(PROGRESS_BYTES, start));
        assert!(!throttle.due(PROGRESS_BYTES + 1, start));
        assert!(
            throttle.due(1024 * 1024, start),
            "completion is always sent"
        );
    }

    #[test]
    fn throttle_sends_per_100_ms() {
        let start = Instant::now();
        let mut throttle = Throttle::new(1024 * 1024);
        throttle.sent_at = start;
        assert!(!throttle.due(10, start + Duration::from_millis(99)));
        assert!(throttle.due(20, start + PROGRESS_INTERVAL));
        assert!(!throttle.due(30, start + PROGRESS_INTERVAL));
    }
}
