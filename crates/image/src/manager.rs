//! The image manager: the one entry point the CRI layer and the CLI use.
//!
//! Layout under `ImageConfig::root`: `blobs/` (content store), `ingest/`
//! (blobs being written), `snapshots/` (unpacked layers by chain ID),
//! `trash/` (snapshots being deleted) and `images.json` (image records).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::content::ContentStore;
use crate::digest::Digest;
use crate::gc::{self, KeyedLocks, Leases};
use crate::registry::RegistryClient;
use crate::snapshot::Snapshots;
use crate::store::MetadataStore;
use crate::{ImageConfig, ImageError, Reference};

/// Registry credentials from a CRI `AuthConfig` or an image pull secret.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// A ready identity token, used as the refresh token of an OAuth2 exchange.
    pub identity_token: String,
    /// A ready bearer token for the registry.
    pub registry_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// One layer of a stored image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Digest of the blob as stored in the registry (compressed).
    pub digest: String,
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar stream, from the image config.
    pub diff_id: String,
    /// Chain ID of this layer and the ones below it; names its snapshot.
    pub chain_id: String,
}

/// An image in the metadata store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Image ID: the digest of the image config (`sha256:...`).
    pub id: String,
    /// Normalized `registry/repository:tag` names.
    pub repo_tags: Vec<String>,
    /// Normalized `registry/repository@sha256:...` names.
    pub repo_digests: Vec<String>,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// Digest of the image config blob (the same as `id`).
    pub config_digest: String,
    pub layers: Vec<LayerRecord>,
    /// Bytes of the manifest, config and compressed layers, plus the index
    /// when the image was pulled through one, as containerd counts them.
    pub size: u64,
    /// `User` from the image config, empty when unset.
    pub user: String,
    /// Creation time from the image config, RFC 3339, if set.
    pub created: Option<String>,
    /// Pinned images are never garbage collected.
    pub pinned: bool,
}

/// Progress of one pull, sent as it happens so the CLI can draw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest was resolved: these layers will be fetched or reused.
    Resolved {
        reference: String,
        manifest_digest: String,
        /// Layer blob digests and sizes in manifest order.
        layers: Vec<(String, u64)>,
    },
    /// Bytes of a layer received so far.
    Downloading {
        digest: String,
        received: u64,
        total: u64,
    },
    /// A layer is in the content store, fetched now or found there.
    Downloaded { digest: String, reused: bool },
    /// A layer is in its snapshot, unpacked now or found there.
    Unpacked { digest: String, reused: bool },
    /// The image is stored and visible.
    Done { image_id: String },
}

/// Sender side of a pull's progress events.
pub type PullProgress = UnboundedSender<PullEvent>;

/// Disk usage of the image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    pub mountpoint: PathBuf,
    pub used_bytes: u64,
    pub inodes_used: u64,
}

/// Pulls, stores, lists and removes images.
pub struct ImageManager {
    config: ImageConfig,
    inner: Arc<Inner>,
}

/// The state that pulls, loads and removals share.
pub(crate) struct Inner {
    pub(crate) config: ImageConfig,
    pub(crate) content: ContentStore,
    pub(crate) snapshots: Snapshots,
    pub(crate) store: MetadataStore,
    pub(crate) leases: Arc<Leases>,
    /// Single-flight locks per blob digest and per chain ID.
    pub(crate) locks: KeyedLocks,
    pub(crate) registry: RegistryClient,
    /// Lock that serializes garbage collections, which list and delete.
    gc: tokio::sync::Mutex<()>,
}

impl Inner {
    /// Removes blobs and snapshots that no image uses and no lease holds.
    pub(crate) async fn collect_garbage(self: &Arc<Self>) -> Result<(), ImageError> {
        let _gc = self.gc.lock().await;
        let inner = Arc::clone(self);
        let collected = blocking("collect garbage", &self.config.root, move || {
            gc::collect(
                &inner.config.root,
                &inner.content,
                &inner.snapshots,
                &inner.leases,
                || inner.store.snapshot(),
            )
        })
        .await?;
        if collected.blobs > 0 || collected.snapshots > 0 {
            tracing::debug!(
                blobs = collected.blobs,
                snapshots = collected.snapshots,
                "removed unused image content"
            );
        }
        Ok(())
    }
}

/// Runs blocking store work on the blocking pool. `path` names the store in
/// the error if the task panics.
pub(crate) async fn blocking<T: Send + 'static>(
    step: &'static str,
    path: &Path,
    work: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join| ImageError::Storage {
            step,
            path: path.to_path_buf(),
            source: std::io::Error::other(join),
        })?
}

impl ImageManager {
    /// Opens the store under `config.root`, creating it if needed, and
    /// removes what an interrupted pull or removal left behind.
    pub async fn open(config: ImageConfig) -> Result<Self, ImageError> {
        let registry = RegistryClient::new(&config)?;
        let root = config.root.clone();
        let (content, snapshots, store) = blocking("open image store", &root, {
            let root = root.clone();
            move || {
                // Only root reads the store, because it contains every image's
                // setuid binaries. Overlay mounts read it as root anyway.
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&root)
                    .map_err(ImageError::storage(
                        "create image store directory",
                        root.clone(),
                    ))?;
                let content = ContentStore::new(&root);
                content.init()?;
                let snapshots = Snapshots::new(&root);
                snapshots.init()?;
                gc::empty_trash(&root)?;
                let store = MetadataStore::open(&root)?;
                Ok((content, snapshots, store))
            }
        })
        .await?;

        let inner = Arc::new(Inner {
            config: config.clone(),
            content,
            snapshots,
            store,
            leases: Arc::new(Leases::default()),
            locks: KeyedLocks::default(),
            registry,
            gc: tokio::sync::Mutex::new(()),
        });
        // Blobs and snapshots of pulls that were killed before their image
        // record was written are garbage now.
        inner.collect_garbage().await?;

        Ok(Self { config, inner })
    }

    /// Returns the settings the manager was opened with.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// Pulls `reference` from its registry and stores it under that name.
    /// Layers already stored are reused. The image becomes visible only
    /// when every blob is verified and every layer is unpacked.
    pub async fn pull(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
        progress: Option<PullProgress>,
    ) -> Result<ImageRecord, ImageError> {
        crate::pull::pull(&self.inner, reference, credentials, progress).await
    }

    /// Lists every stored image.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.inner.store.snapshot().values().cloned().collect()
    }

    /// Finds an image by ID (`sha256:...`, full hex or a unique hex prefix of
    /// at least 4 characters), by tag or by digest reference. Names are
    /// normalized first, so `busybox` finds `docker.io/library/busybox:latest`.
    pub fn find(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        find_in(&self.inner.store.snapshot(), name)
    }

    /// Returns the image config blob of a stored image as JSON.
    pub fn image_config(&self, image: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let digest = Digest::parse(&image.config_digest).map_err(|e| e.for_image(&image.id))?;
        let bytes = self.inner.content.read(&digest)?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::InvalidContent {
            reference: image.id.clone(),
            what: "image config",
            reason: e.to_string(),
        })
    }

    /// Removes the image that `name` finds, with all of its names, and frees
    /// the blobs and snapshots that no other image uses. Returns `None` when
    /// no image matches.
    ///
    /// NOTE: the store does not know which snapshots running containers
    /// mount. Once containers exist, the runtime has to keep the images they
    /// use from being removed.
    pub async fn remove(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let Some(found) = self.find(name)? else {
            return Ok(None);
        };
        let id = found.id.clone();
        // The record may have changed since `find`, so return what was removed.
        let removed = self
            .inner
            .store
            .update(move |images| images.remove(&id))
            .await?;
        self.inner.collect_garbage().await?;
        Ok(removed)
    }

    /// Loads every image of an OCI image layout archive or a `docker save`
    /// archive (tar, optionally gzip-compressed). Returns each image with the
    /// names the archive gives it. An image that is already stored keeps its
    /// content and other names.
    pub async fn load(&self, archive: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        crate::archive::load(&self.inner, archive).await
    }

    /// Returns the snapshot directories of an image, lowest layer first, for
    /// building a container's overlay root filesystem.
    pub fn snapshot_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .map(|layer| {
                // Records contain only chain IDs this store computed. The
                // fallback keeps a corrupt record from escaping the store.
                let hex = layer.chain_id.strip_prefix("sha256:").unwrap_or("invalid");
                let hex = if hex.contains('/') || hex.starts_with('.') {
                    "invalid"
                } else {
                    hex
                };
                self.config.root.join("snapshots").join(hex)
            })
            .collect()
    }

    /// Measures the bytes and inodes used under the store's root.
    ///
    /// NOTE: this walks the whole store on every call. Kubelet polls
    /// ImageFsInfo every few seconds, so a large store wants a cached figure
    /// that pulls and removals update.
    pub async fn fs_usage(&self) -> Result<FsUsage, ImageError> {
        let root = self.config.root.clone();
        blocking("measure image store", &root.clone(), move || {
            let mut usage = FsUsage {
                mountpoint: root.clone(),
                used_bytes: 0,
                inodes_used: 0,
            };
            let mut seen = HashSet::new();
            measure(&root, &mut usage, &mut seen)?;
            Ok(usage)
        })
        .await
    }
}

/// Adds the blocks and inodes of `path` and everything below it, counting a
/// hard-linked inode once. Symlinks are counted but not followed.
fn measure(
    path: &Path,
    usage: &mut FsUsage,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<(), ImageError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Removed by a concurrent collection while the walk ran.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ImageError::Storage {
                step: "measure",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if meta.nlink() <= 1 || seen.insert((meta.dev(), meta.ino())) {
        usage.used_bytes += meta.blocks() * 512;
        usage.inodes_used += 1;
    }
    if !meta.is_dir() {
        return Ok(());
    }

    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ImageError::Storage {
                step: "measure",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    for entry in entries {
        let entry = entry.map_err(ImageError::storage("measure", path.to_path_buf()))?;
        measure(&entry.path(), usage, seen)?;
    }
    Ok(())
}

/// Finds an image by ID, unique ID prefix, tag or digest reference.
pub(crate) fn find_in(
    images: &crate::store::Images,
    name: &str,
) -> Result<Option<ImageRecord>, ImageError> {
    if let Some(hex) = name.strip_prefix("sha256:")
        && hex.len() == 64
    {
        return Ok(images.get(name).cloned());
    }

    // A truncated ID may also be written as a digest (`sha256:02218a83`), as
    // containerd accepts it. That form is only ever an ID.
    let id_form = name.strip_prefix("sha256:");

    // A name wins over a bare ID prefix, as in Docker: `cafe` is a
    // repository name before it is the start of an ID.
    let parsed = Reference::parse(name);
    if id_form.is_none()
        && let Ok(reference) = &parsed
        && let Some(image) = find_by_reference(images, reference)
    {
        return Ok(Some(image.clone()));
    }
    let prefix = id_form.unwrap_or(name);
    let is_hex = prefix.len() >= 4
        && prefix
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_hex {
        return parsed.map(|_| None);
    }
    let matches: Vec<&ImageRecord> = images
        .values()
        .filter(|image| {
            image
                .id
                .strip_prefix("sha256:")
                .is_some_and(|h| h.starts_with(prefix))
        })
        .collect();
    match matches.as_slice() {
        [] => Ok(None),
        [image] => Ok(Some((*image).clone())),
        several => {
            let ids: Vec<&str> = several.iter().map(|image| image.id.as_str()).collect();
            Err(ImageError::InvalidReference {
                reference: name.to_string(),
                reason: format!(
                    "the ID prefix is ambiguous: it matches {}, give more characters",
                    ids.join(", ")
                ),
            })
        }
    }
}

/// Finds the image that has a reference's tag or digest among its names.
fn find_by_reference<'a>(
    images: &'a crate::store::Images,
    reference: &Reference,
) -> Option<&'a ImageRecord> {
    match &reference.digest {
        Some(digest) => {
            let pinned = reference.with_digest(digest);
            let repo = reference.name();
            images.values().find(|image| {
                image.repo_digests.contains(&pinned)
                    || (&image.manifest_digest == digest && names_repository(image, &repo))
            })
        }
        None => {
            let tagged = reference.tagged();
            images
                .values()
                .find(|image| tagged.as_ref().is_some_and(|t| image.repo_tags.contains(t)))
        }
    }
}

/// Returns whether any name of the image is in repository `repo`.
fn names_repository(image: &ImageRecord, repo: &str) -> bool {
    let in_repo = |name: &String, separator: char| {
        name.strip_prefix(repo)
            .is_some_and(|rest| rest.starts_with(separator))
    };
    image.repo_tags.iter().any(|t| in_repo(t, ':'))
        || image.repo_digests.iter().any(|d| in_repo(d, '@'))
}

#[cfg(test)]
mod tests;
