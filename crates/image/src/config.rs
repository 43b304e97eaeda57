//! Settings of the image service, filled from the daemon's TOML file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the image service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Directory of the content store, snapshots and image metadata.
    pub root: PathBuf,
    /// Per-registry settings, keyed by registry host (`docker.io`, `127.0.0.1:5000`).
    pub registries: BTreeMap<String, RegistryConfig>,
    /// OS and architecture that image indexes resolve to, `linux/amd64` style.
    /// Empty means the host's.
    pub platform: String,
    /// Number of layers fetched at once by one pull.
    pub max_concurrent_downloads: usize,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/hatoba/images"),
            registries: BTreeMap::new(),
            platform: String::new(),
            max_concurrent_downloads: 3,
        }
    }
}

/// Settings of one registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Endpoints tried in order before the registry itself, as `http://host:port`
    /// or `https://host`.
    pub mirrors: Vec<String>,
    /// URL of the registry's own API endpoint, replacing the default
    /// (`https://registry-1.docker.io` for `docker.io`, `https://HOST`
    /// otherwise). Empty means the default. With it set, nothing is sent to
    /// the default endpoint.
    pub endpoint: String,
    /// Talk plain HTTP to the registry itself instead of HTTPS.
    pub plain_http: bool,
    /// Skip TLS certificate verification for the registry and its mirrors.
    pub insecure_skip_verify: bool,
}
