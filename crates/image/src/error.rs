//! Errors of the image service, one variant per failing step.

use std::path::PathBuf;

/// An image operation failed. Each variant names the object and the step.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("image {reference:?} not found")]
    NotFound { reference: String },

    #[error("registry {registry} is unavailable: {reason}")]
    RegistryUnavailable { registry: String, reason: String },

    #[error("registry {registry} denied access to {reference:?}: {reason}")]
    Unauthenticated {
        registry: String,
        reference: String,
        reason: String,
    },

    #[error("registry {registry} returned an error for {reference:?}: {reason}")]
    Registry {
        registry: String,
        reference: String,
        reason: String,
    },

    #[error("no manifest for platform {platform} in image index of {reference:?}")]
    PlatformNotFound { reference: String, platform: String },

    #[error("unsupported media type {media_type:?} in {reference:?}")]
    UnsupportedMediaType {
        reference: String,
        media_type: String,
    },

    #[error("invalid {what} of {reference:?}: {reason}")]
    InvalidContent {
        reference: String,
        what: &'static str,
        reason: String,
    },

    #[error("digest mismatch for {expected}: content hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },

    #[error("layer {layer} has an unsafe entry {entry:?}: {reason}")]
    UnsafeLayerEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    #[error("failed to unpack layer {layer} at entry {entry:?}: {source}")]
    Unpack {
        layer: String,
        entry: String,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to {step} {path}: {source}")]
    Storage {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid image setting {setting}: {reason}")]
    InvalidConfig { setting: String, reason: String },

    #[error("invalid image archive: {reason}")]
    InvalidArchive { reason: String },
}

impl ImageError {
    /// Returns a function that wraps an I/O error of `step` on `path`, for
    /// `map_err`.
    pub(crate) fn storage(
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl Fn(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Storage {
            step,
            path: path.clone(),
            source,
        }
    }
}
