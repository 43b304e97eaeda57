//! The image manager: the one entry point the CRI layer and the CLI use.
//!
//! NOTE: this file holds the agreed interface. The bodies are filled in by
//! the registry, store and unpacking modules.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::{ImageConfig, ImageError};

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
    /// Bytes of the manifest, config and compressed layers.
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
}

impl ImageManager {
    /// Opens the store under `config.root`, creating it if needed, and
    /// removes what an interrupted pull or removal left behind.
    pub async fn open(config: ImageConfig) -> Result<Self, ImageError> {
        Ok(Self { config })
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
        let _ = (reference, credentials, progress);
        todo!("pull")
    }

    /// Lists every stored image.
    pub fn list(&self) -> Vec<ImageRecord> {
        todo!("list")
    }

    /// Finds an image by ID (`sha256:...`, full hex or a unique hex prefix of
    /// at least 4 characters), by tag or by digest reference. Names are
    /// normalized first, so `busybox` finds `docker.io/library/busybox:latest`.
    pub fn find(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let _ = name;
        todo!("find")
    }

    /// Returns the image config blob of a stored image as JSON.
    pub fn image_config(&self, image: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let _ = image;
        todo!("image_config")
    }

    /// Removes the image that `name` finds, with all of its names, and frees
    /// the blobs and snapshots that no other image uses. Returns `None` when
    /// no image matches.
    pub async fn remove(&self, name: &str) -> Result<Option<ImageRecord>, ImageError> {
        let _ = name;
        todo!("remove")
    }

    /// Loads every image of an OCI image layout archive or a `docker save`
    /// archive (tar, optionally gzip-compressed).
    pub async fn load(&self, archive: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let _ = archive;
        todo!("load")
    }

    /// Returns the snapshot directories of an image, lowest layer first, for
    /// building a container's overlay root filesystem.
    pub fn snapshot_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        let _ = image;
        todo!("snapshot_dirs")
    }

    /// Measures the bytes and inodes used under the store's root.
    pub async fn fs_usage(&self) -> Result<FsUsage, ImageError> {
        todo!("fs_usage")
    }
}
