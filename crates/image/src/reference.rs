//! Image references, normalized as kubelet and containerd normalize them.

use crate::ImageError;

/// A normalized image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host and optional port, `docker.io` for short names.
    pub registry: String,
    /// Repository path, `library/busybox` for a Docker Hub official image.
    pub repository: String,
    /// Tag, `latest` when neither tag nor digest is given.
    pub tag: Option<String>,
    /// Digest, `sha256:...`.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalizes a reference: `busybox` becomes
    /// `docker.io/library/busybox:latest`.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let _ = input;
        todo!("Reference::parse")
    }
}
