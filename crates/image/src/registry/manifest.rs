//! Manifests and image indexes: media types, parsing, digests and platform
//! selection.
//!
//! Media types are those of the OCI image spec 1.1 and of Docker's image
//! manifest schema 2. Docker schema 1 is not supported.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use sha2::{Digest as _, Sha256, Sha512};

use crate::ImageError;
use crate::reference::check_digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Layer media types whose blobs hatoba can unpack.
pub const LAYER_MEDIA_TYPES: [&str; 8] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// The `Accept` header of manifest requests: every type hatoba can read.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Maximum size of a manifest. Larger ones are rejected before parsing.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor: the media type, digest and size of a blob, as a
/// manifest or index lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:...` or `sha512:...`.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Platform of a manifest in an image index, absent elsewhere.
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Alternative download locations of foreign layers, which hatoba does not use.
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An image manifest: the config blob and the layers, lowest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// OCI or Docker schema 2 manifest media type.
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

/// A manifest or index document, typed by its media type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Index(Index),
    Manifest(Manifest),
}

/// The fields of either document kind. The fields that are present decide
/// the kind.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDocument {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    fs_layers: Option<serde_json::Value>,
}

/// Parses a manifest or index. `reference` names the image in errors.
pub fn parse_document(reference: &str, bytes: &[u8]) -> Result<Document, ImageError> {
    let invalid = |reason: String| ImageError::InvalidContent {
        reference: reference.to_string(),
        what: "manifest",
        reason,
    };
    let raw: RawDocument =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;

    let media_type = document_media_type(reference, &raw)?;
    match media_type.as_str() {
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let manifests = raw
                .manifests
                .ok_or_else(|| invalid("index has no manifests".into()))?;
            check_descriptors(reference, &manifests)?;
            Ok(Document::Index(Index {
                media_type,
                manifests,
            }))
        }
        _ => {
            let config = raw
                .config
                .ok_or_else(|| invalid("manifest has no config".into()))?;
            let layers = raw
                .layers
                .ok_or_else(|| invalid("manifest has no layers".into()))?;
            let manifest = Manifest {
                media_type,
                config,
                layers,
            };
            check_manifest(reference, &manifest)?;
            Ok(Document::Manifest(manifest))
        }
    }
}

/// Returns the media type a document declares or, when it declares none
/// (the OCI spec allows that), the one its fields imply.
fn document_media_type(reference: &str, raw: &RawDocument) -> Result<String, ImageError> {
    let unsupported = |media_type: &str| ImageError::UnsupportedMediaType {
        reference: reference.to_string(),
        media_type: media_type.to_string(),
    };
    if raw.schema_version == Some(1) || raw.fs_layers.is_some() {
        return Err(unsupported(DOCKER_SCHEMA1));
    }
    let media_type = match &raw.media_type {
        Some(declared) => declared.as_str(),
        None if raw.manifests.is_some() => OCI_INDEX,
        None => OCI_MANIFEST,
    };
    match media_type {
        OCI_INDEX | OCI_MANIFEST | DOCKER_MANIFEST_LIST | DOCKER_MANIFEST => {
            Ok(media_type.to_string())
        }
        _ => Err(unsupported(media_type)),
    }
}

/// Returns whether a media type names a Docker schema 1 manifest, which the
/// registry may send when a client accepts nothing newer.
pub fn is_schema1(media_type: &str) -> bool {
    media_type == DOCKER_SCHEMA1 || media_type == DOCKER_SCHEMA1_SIGNED
}

/// Checks the config and layer media types and every digest of a manifest.
fn check_manifest(reference: &str, manifest: &Manifest) -> Result<(), ImageError> {
    let unsupported = |media_type: &str| ImageError::UnsupportedMediaType {
        reference: reference.to_string(),
        media_type: media_type.to_string(),
    };
    if ![OCI_CONFIG, DOCKER_CONFIG].contains(&manifest.config.media_type.as_str()) {
        return Err(unsupported(&manifest.config.media_type));
    }
    if let Some(layer) = manifest
        .layers
        .iter()
        .find(|layer| !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()))
    {
        return Err(unsupported(&layer.media_type));
    }
    check_descriptors(reference, std::slice::from_ref(&manifest.config))?;
    check_descriptors(reference, &manifest.layers)
}

/// Checks that every descriptor has a well-formed digest, so that digests
/// from a registry never reach a URL or a file name unchecked.
fn check_descriptors(reference: &str, descriptors: &[Descriptor]) -> Result<(), ImageError> {
    for descriptor in descriptors {
        check_digest(&descriptor.digest).map_err(|reason| ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "manifest",
            reason,
        })?;
    }
    Ok(())
}

/// Hashes `bytes` with the algorithm of `like` (a digest string), sha256
/// when it names an unsupported algorithm.
pub fn digest_like(like: &str, bytes: &[u8]) -> String {
    if like.starts_with("sha512:") {
        format!("sha512:{}", hex::encode(Sha512::digest(bytes)))
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }
}

/// Checks that `bytes` hash to `expected`.
pub fn verify_digest(expected: &str, bytes: &[u8]) -> Result<(), ImageError> {
    let actual = digest_like(expected, bytes);
    if actual == expected {
        Ok(())
    } else {
        Err(ImageError::DigestMismatch {
            expected: expected.to_string(),
            actual,
        })
    }
}

/// An OS, architecture and variant, with Go's names (`linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, normalizing architecture aliases
    /// (`x86_64`, `aarch64`) to Go's names.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let (os, architecture, variant) = match parts[..] {
            [os, arch] => (os, arch, None),
            [os, arch, variant] => (os, arch, Some(variant)),
            _ => return Err(format!("platform {text:?} is not os/arch[/variant]")),
        };
        if [os, architecture]
            .iter()
            .chain(&variant)
            .any(|part| part.is_empty())
        {
            return Err(format!("platform {text:?} has an empty part"));
        }
        Ok(Self::normalized(os, architecture, variant))
    }

    /// Returns the platform of this host: linux and the architecture this
    /// binary was built for, with the default variant of that architecture.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            other => other,
        };
        Self::normalized("linux", architecture, None)
    }

    /// Builds a platform with lowercase names, Go's architecture names and
    /// the default variant of an architecture made explicit, so that equal
    /// platforms compare equal.
    fn normalized(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        let variant = variant.map(str::to_ascii_lowercase);
        let (architecture, variant) = match architecture.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant.filter(|v| v != "v1")),
            "i386" | "i686" => ("386".into(), variant),
            "aarch64" | "arm64" => ("arm64".into(), Some(v_variant(variant, "v8"))),
            "armhf" => ("arm".into(), Some("v7".into())),
            "armel" => ("arm".into(), Some("v6".into())),
            "arm" => ("arm".into(), Some(v_variant(variant, "v7"))),
            other => (other.to_string(), variant),
        };
        Self {
            os: os.to_ascii_lowercase(),
            architecture,
            variant,
        }
    }

    /// Lists the platforms this one can run, best first. As containerd
    /// does, an ARM or amd64 host also runs older variants, arm64 runs
    /// 32-bit ARM, and amd64 runs 386.
    fn runnable(&self) -> Vec<Platform> {
        let with = |architecture: &str, variant: Option<String>| Platform {
            os: self.os.clone(),
            architecture: architecture.to_string(),
            variant,
        };
        let older = |newest: u32, oldest: u32| (oldest..newest).rev().map(|v| format!("v{v}"));
        let mut list = vec![self.clone()];
        match self.architecture.as_str() {
            "arm" => {
                let version = self.variant_version().unwrap_or(5);
                list.extend(older(version, 5).map(|v| with("arm", Some(v))));
            }
            "arm64" => {
                if self.variant.as_deref() != Some("v8") {
                    list.push(with("arm64", Some("v8".into())));
                }
                list.extend(older(9, 5).map(|v| with("arm", Some(v))));
            }
            "amd64" => {
                let version = self.variant_version().unwrap_or(1);
                list.extend(older(version, 2).map(|v| with("amd64", Some(v))));
                if version > 1 {
                    list.push(with("amd64", None));
                }
                list.push(with("386", None));
            }
            _ => {}
        }
        list
    }

    /// Returns `N` of a `vN` variant.
    fn variant_version(&self) -> Option<u32> {
        self.variant.as_deref()?.strip_prefix('v')?.parse().ok()
    }
}

/// Spells a variant as `vN` (`8` becomes `v8`), `default` when absent.
fn v_variant(variant: Option<String>, default: &str) -> String {
    match variant {
        None => default.to_string(),
        Some(v) if v.starts_with(|c: char| c.is_ascii_digit()) => format!("v{v}"),
        Some(v) => v,
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

/// Picks the manifest of an index that runs best on `target`: the first
/// entry of the most preferred runnable platform.
pub fn select_platform<'a>(index: &'a Index, target: &Platform) -> Option<&'a Descriptor> {
    let runnable = target.runnable();
    let rank = |descriptor: &Descriptor| {
        let platform = descriptor.platform.as_ref()?;
        let platform = Platform::normalized(
            &platform.os,
            &platform.architecture,
            platform.variant.as_deref(),
        );
        runnable.iter().position(|candidate| *candidate == platform)
    };
    index
        .manifests
        .iter()
        .filter_map(|descriptor| Some((rank(descriptor)?, descriptor)))
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, descriptor)| descriptor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn parse(json: &serde_json::Value) -> Result<Document, ImageError> {
        parse_document("test/ref:1", json.to_string().as_bytes())
    }

    fn index_json(platforms: &[(&str, &str, Option<&str>)]) -> Index {
        let manifests: Vec<_> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut platform = serde_json::json!({ "os": os, "architecture": arch });
                if let Some(variant) = variant {
                    platform["variant"] = serde_json::json!(variant);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": sha(u8::try_from(i).expect("small index")),
                    "size": 100,
                    "platform": platform,
                })
            })
            .collect();
        let json = serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
        match parse(&json).expect("index should parse") {
            Document::Index(index) => index,
            Document::Manifest(_) => panic!("parsed an index as a manifest"),
        }
    }

    fn pick(index: &Index, target: &str) -> Option<String> {
        let target = Platform::parse(target).expect("platform should parse");
        select_platform(index, &target).map(|d| d.digest.clone())
    }

    fn manifest_json(media_type: Option<&str>, layer_type: &str) -> serde_json::Value {
        let mut json = serde_json::json!({
            "schemaVersion": 2,
            "config": { "mediaType": OCI_CONFIG, "digest": sha(1), "size": 10 },
            "layers": [{ "mediaType": layer_type, "digest": sha(2), "size": 20 }],
        });
        if let Some(media_type) = media_type {
            json["mediaType"] = serde_json::json!(media_type);
        }
        json
    }

    #[test]
    fn oci_and_docker_manifests_parse() {
        for media_type in [OCI_MANIFEST, DOCKER_MANIFEST] {
            let json = manifest_json(Some(media_type), LAYER_MEDIA_TYPES[1]);
            let Ok(Document::Manifest(manifest)) = parse(&json) else {
                panic!("{media_type} should parse as a manifest");
            };
            assert_eq!(manifest.media_type, media_type);
            assert_eq!(manifest.config.digest, sha(1));
            assert_eq!(manifest.layers[0].size, 20);
        }
    }

    #[test]
    fn missing_media_type_follows_fields() {
        let manifest = manifest_json(None, LAYER_MEDIA_TYPES[0]);
        assert!(
            matches!(parse(&manifest), Ok(Document::Manifest(m)) if m.media_type == OCI_MANIFEST)
        );
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [] });
        assert!(matches!(parse(&index), Ok(Document::Index(i)) if i.media_type == OCI_INDEX));
    }

    #[test]
    fn docker_manifest_list_parses_as_index() {
        let json = serde_json::json!({ "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": [] });
        assert!(matches!(parse(&json), Ok(Document::Index(_))));
    }

    #[test]
    fn schema1_is_unsupported() {
        let json = serde_json::json!({ "schemaVersion": 1, "name": "x", "fsLayers": [] });
        assert!(matches!(
            parse(&json),
            Err(ImageError::UnsupportedMediaType { media_type, .. }) if media_type == DOCKER_SCHEMA1
        ));
        assert!(is_schema1(DOCKER_SCHEMA1_SIGNED));
    }

    #[test]
    fn every_listed_layer_type_is_accepted() {
        for layer_type in LAYER_MEDIA_TYPES {
            assert!(
                parse(&manifest_json(None, layer_type)).is_ok(),
                "{layer_type}"
            );
        }
    }

    #[test]
    fn unknown_layer_and_config_types_are_unsupported() {
        let helm = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
        assert!(matches!(
            parse(&manifest_json(None, helm)),
            Err(ImageError::UnsupportedMediaType { media_type, .. }) if media_type == helm
        ));
        let mut json = manifest_json(None, LAYER_MEDIA_TYPES[0]);
        json["config"]["mediaType"] = serde_json::json!("application/vnd.cncf.helm.config.v1+json");
        assert!(matches!(
            parse(&json),
            Err(ImageError::UnsupportedMediaType { .. })
        ));
        json["mediaType"] = serde_json::json!("text/plain");
        assert!(matches!(
            parse(&json),
            Err(ImageError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn malformed_documents_are_invalid_content() {
        let mut json = manifest_json(None, LAYER_MEDIA_TYPES[0]);
        json["layers"][0]["digest"] = serde_json::json!("sha256:../../etc/passwd");
        assert!(matches!(
            parse(&json),
            Err(ImageError::InvalidContent { .. })
        ));
        let result = parse_document("r", b"<html>");
        assert!(matches!(result, Err(ImageError::InvalidContent { .. })));
        let no_config =
            serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [] });
        assert!(matches!(
            parse(&no_config),
            Err(ImageError::InvalidContent { .. })
        ));
    }

    #[test]
    fn digests_verify_with_the_expected_algorithm() {
        let sha256 = digest_like("sha256:", b"hello");
        assert_eq!(
            sha256,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(verify_digest(&sha256, b"hello").is_ok());
        assert!(digest_like("sha512:", b"hello").starts_with("sha512:9b71d224"));
        assert!(matches!(
            verify_digest(&sha256, b"hullo"),
            Err(ImageError::DigestMismatch { expected, .. }) if expected == sha256
        ));
    }

    #[test]
    fn platform_strings_parse_and_normalize() {
        let p = Platform::parse("linux/aarch64").expect("parses");
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("linux/x86_64").expect("parses").to_string(),
            "linux/amd64"
        );
        assert_eq!(
            Platform::parse("linux/arm").expect("parses").to_string(),
            "linux/arm/v7"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//v7").is_err());
        assert!(Platform::parse("linux/arm/v7/x").is_err());
    }

    #[test]
    fn host_platform_uses_go_architecture_names() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        let expected = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        assert_eq!(host.architecture, expected);
    }

    #[test]
    fn exact_platform_is_preferred_over_index_order() {
        let index = index_json(&[
            ("linux", "386", None),
            ("linux", "arm64", Some("v8")),
            ("linux", "amd64", None),
        ]);
        assert_eq!(pick(&index, "linux/amd64"), Some(sha(2)));
        assert_eq!(pick(&index, "linux/arm64"), Some(sha(1)));
    }

    #[test]
    fn arm64_matches_entries_with_or_without_v8() {
        let index = index_json(&[("linux", "arm64", None)]);
        assert_eq!(pick(&index, "linux/arm64/v8"), Some(sha(0)));
    }

    #[test]
    fn arm_prefers_exact_variant_then_older_ones() {
        let index = index_json(&[
            ("linux", "arm", Some("v5")),
            ("linux", "arm", Some("v6")),
            ("linux", "arm", Some("v7")),
        ]);
        assert_eq!(pick(&index, "linux/arm/v7"), Some(sha(2)));
        assert_eq!(pick(&index, "linux/arm/v6"), Some(sha(1)));
        let older = index_json(&[("linux", "arm", Some("v5")), ("linux", "arm", Some("v6"))]);
        assert_eq!(pick(&older, "linux/arm/v7"), Some(sha(1)));
        let newer = index_json(&[("linux", "arm", Some("v7"))]);
        assert_eq!(pick(&newer, "linux/arm/v6"), None);
    }

    #[test]
    fn arm64_falls_back_to_32_bit_arm() {
        let index = index_json(&[("linux", "arm", Some("v6")), ("linux", "arm", Some("v7"))]);
        assert_eq!(pick(&index, "linux/arm64"), Some(sha(1)));
    }

    #[test]
    fn amd64_accepts_older_levels_then_386() {
        let index = index_json(&[("linux", "386", None), ("linux", "amd64", Some("v2"))]);
        assert_eq!(pick(&index, "linux/amd64/v3"), Some(sha(1)));
        assert_eq!(pick(&index, "linux/amd64"), Some(sha(0)));
        let plain = index_json(&[("linux", "amd64", Some("v1"))]);
        assert_eq!(pick(&plain, "linux/amd64/v2"), Some(sha(0)));
    }

    #[test]
    fn attestations_and_other_os_never_match() {
        let index = index_json(&[
            ("unknown", "unknown", None),
            ("windows", "amd64", None),
            ("linux", "amd64", Some("v3")),
        ]);
        assert_eq!(pick(&index, "linux/amd64"), None);
        assert_eq!(pick(&index, "linux/amd64/v3"), Some(sha(2)));
    }
}
