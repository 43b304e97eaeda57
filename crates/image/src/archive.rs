//! Loading images from an archive: an OCI image layout or a `docker save`
//! archive, as a tar that may be gzip- or zstd-compressed.
//!
//! Every regular member goes into the content store first, hashed on the
//! way (members under `blobs/<algorithm>/` must match their name). The
//! images are then read from the stored documents, their layers unpacked
//! as in a pull, and their records written. Members are never written to
//! the file system by their path, and a member whose path or link target
//! leaves the archive is rejected.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::json;

use crate::content::{ContentStore, Expected};
use crate::digest::{Algorithm, Digest, chain_ids};
use crate::gc::{LeaseSet, Resource};
use crate::manager::{Inner, blocking};
use crate::pull::{
    ImageConfigSummary, PlannedLayer, commit, parse_digest, plan_layers, unpack_if_missing,
};
use crate::registry::{
    Document, OCI_CONFIG, OCI_MANIFEST, Platform, parse_document, select_platform,
};
use crate::unpack::Compression;
use crate::{ImageError, ImageRecord, Reference};

/// Annotation with the full image name, written by containerd and Docker 25+.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Annotation of the OCI image spec, often only a tag.
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Symlinks chained longer than this are rejected as a loop.
const MAX_LINK_HOPS: usize = 16;
/// Indexes of indexes are allowed by the OCI spec, but deeper chains are rejected.
const MAX_INDEX_DEPTH: usize = 4;

/// Loads every image of an archive and returns the stored records.
pub(crate) async fn load(
    inner: &Arc<Inner>,
    archive: &Path,
) -> Result<Vec<ImageRecord>, ImageError> {
    let result = load_images(inner, archive).await;

    // The load also stored members that no image uses: `oci-layout`,
    // `index.json`, legacy `json` files, or everything after a failure.
    // They are freed now that the load's leases are gone.
    let collected = inner.collect_garbage().await;
    match (result, collected) {
        (Ok(records), collected) => collected.map(|()| records),
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(gc_error)) => {
            // The load error is the one returned, so the collection failure
            // is logged here. The next start collects again.
            tracing::warn!(error = %gc_error, "failed to free the content of a failed image load");
            Err(error)
        }
    }
}

async fn load_images(inner: &Arc<Inner>, archive: &Path) -> Result<Vec<ImageRecord>, ImageError> {
    let leases = LeaseSet::new(&inner.leases);
    let (plans, mut leases) = {
        let inner = Arc::clone(inner);
        let path = archive.to_path_buf();
        blocking("read image archive", archive, move || {
            let mut leases = leases;
            let members = scan(&inner.content, &path, &mut leases)?;
            let plans = plan_images(
                &inner.content,
                &members,
                inner.registry.platform(),
                &mut leases,
            )?;
            Ok((plans, leases))
        })
        .await?
    };

    let mut records = Vec::with_capacity(plans.len());
    let limit = inner.config.max_concurrent_downloads.max(1);
    for plan in plans {
        for layer in &plan.layers {
            leases.add(Resource::Snapshot(layer.chain_id.clone()));
        }
        // Collected first for the same `Send` reason as in `pull`.
        let tasks: Vec<_> = plan
            .layers
            .iter()
            .map(|layer| unpack_if_missing(inner, layer))
            .collect();
        futures::stream::iter(tasks)
            .buffer_unordered(limit)
            .try_collect::<Vec<bool>>()
            .await?;
        let loaded = plan.record();
        let mut stored = commit(inner, loaded.clone()).await?;
        // Report the names this archive gave, not those the image had before.
        stored.repo_tags = loaded.repo_tags;
        stored.repo_digests = loaded.repo_digests;
        records.push(stored);
    }
    drop(leases);
    Ok(records)
}

fn invalid(reason: impl Into<String>) -> ImageError {
    ImageError::InvalidArchive {
        reason: reason.into(),
    }
}

/// Content of a member path.
#[derive(Debug, Clone)]
enum Member {
    File {
        digest: Digest,
        size: u64,
    },
    /// A symlink or hard link, with its target as an archive path.
    Link(String),
}

/// The archive's members by normalized path.
#[derive(Debug, Default)]
struct Members {
    by_path: HashMap<String, Member>,
}

impl Members {
    /// Finds the file at `path`, following links.
    fn file(&self, path: &str) -> Result<(Digest, u64), ImageError> {
        let mut current = normalize_member(path)?;
        for _ in 0..MAX_LINK_HOPS {
            match self.by_path.get(&current) {
                Some(Member::File { digest, size }) => return Ok((digest.clone(), *size)),
                Some(Member::Link(target)) => current = target.clone(),
                None => return Err(invalid(format!("the archive has no file {path:?}"))),
            }
        }
        Err(invalid(format!("links starting at {path:?} form a loop")))
    }

    fn contains(&self, path: &str) -> bool {
        self.by_path.contains_key(path)
    }
}

/// Reads the archive once, storing every regular member as a blob.
fn scan(content: &ContentStore, path: &Path, leases: &mut LeaseSet) -> Result<Members, ImageError> {
    let open_error = ImageError::storage("open image archive", path.to_path_buf());
    let mut file = File::open(path).map_err(&open_error)?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic).map_err(&open_error)?;
    file.seek(SeekFrom::Start(0)).map_err(&open_error)?;
    let reader = Compression::detect(&magic[..n])
        .decoder(file)
        .map_err(|e| invalid(format!("failed to start decompressing: {e}")))?;

    let label = path.display().to_string();
    let mut archive = tar::Archive::new(reader);
    let mut members = Members::default();
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("failed to read the tar stream: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| invalid(format!("failed to read the tar stream: {e}")))?;
        let raw = String::from_utf8(entry.path_bytes().into_owned())
            .map_err(|_| invalid("a member path is not UTF-8"))?;
        let member_path = normalize_member(&raw)?;

        let kind = entry.header().entry_type();
        let member = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => store_member(
                content,
                &label,
                &member_path,
                entry.size(),
                &mut entry,
                leases,
            )?,
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .ok_or_else(|| invalid(format!("link {raw:?} has no target")))?;
                let target = if kind == tar::EntryType::Symlink {
                    resolve_symlink(&member_path, &target)?
                } else {
                    normalize_member(&target)?
                };
                Member::Link(target)
            }
            // Directories and other entry types carry no blobs.
            _ => continue,
        };
        members.by_path.insert(member_path, member);
    }
    Ok(members)
}

/// Stores one regular member. A member under `blobs/<algorithm>/<hex>` must
/// hash to its name, and others are stored under their sha256.
fn store_member(
    content: &ContentStore,
    label: &str,
    member_path: &str,
    size: u64,
    reader: impl Read,
    leases: &mut LeaseSet,
) -> Result<Member, ImageError> {
    if let Some(digest) = blob_digest_of(member_path) {
        leases.add(Resource::Blob(digest.clone()));
        if !content.contains(&digest) {
            content.ingest_reader(
                reader,
                digest.algorithm(),
                Some(Expected {
                    reference: label,
                    digest: &digest,
                    size: Some(size),
                }),
                label,
                |_| {},
            )?;
        }
        return Ok(Member::File { digest, size });
    }

    let (digest, size) =
        content.ingest_reader(reader, Algorithm::Sha256, None, label, |digest| {
            leases.add(Resource::Blob(digest.clone()));
        })?;
    Ok(Member::File { digest, size })
}

/// Returns the digest a `blobs/<algorithm>/<hex>` path names.
fn blob_digest_of(member_path: &str) -> Option<Digest> {
    let rest = member_path.strip_prefix("blobs/")?;
    let (algorithm, hex) = rest.split_once('/')?;
    Digest::parse(&format!("{algorithm}:{hex}")).ok()
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Normalizes a member path (`./a//b` becomes `a/b`), rejecting absolute
/// paths and `..` components.
fn normalize_member(raw: &str) -> Result<String, ImageError> {
    if raw.starts_with('/') {
        return Err(invalid(format!("member {raw:?} has an absolute path")));
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(invalid(format!(
                    "member {raw:?} leaves the archive with .."
                )));
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// Resolves a symlink target relative to its member's directory. Targets
/// that leave the archive are rejected.
fn resolve_symlink(member_path: &str, target: &str) -> Result<String, ImageError> {
    if target.starts_with('/') {
        return Err(invalid(format!(
            "symlink {member_path:?} points to the absolute path {target:?}"
        )));
    }
    let mut parts: Vec<&str> = member_path.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(invalid(format!(
                        "symlink {member_path:?} points to {target:?}, outside the archive"
                    )));
                }
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// An image read from the archive, ready to unpack and store.
#[derive(Debug)]
struct ImagePlan {
    repo_tags: Vec<String>,
    repo_digests: Vec<String>,
    manifest_digest: Digest,
    manifest_media_type: String,
    manifest_size: u64,
    config_digest: Digest,
    config_size: u64,
    config: ImageConfigSummary,
    layers: Vec<PlannedLayer>,
}

impl ImagePlan {
    fn record(&self) -> ImageRecord {
        ImageRecord {
            id: self.config_digest.to_string(),
            repo_tags: self.repo_tags.clone(),
            repo_digests: self.repo_digests.clone(),
            manifest_digest: self.manifest_digest.to_string(),
            manifest_media_type: self.manifest_media_type.clone(),
            config_digest: self.config_digest.to_string(),
            layers: self.layers.iter().map(PlannedLayer::record).collect(),
            size: self.manifest_size
                + self.config_size
                + self.layers.iter().map(|l| l.size).sum::<u64>(),
            user: self.config.user.clone(),
            created: self.config.created.clone(),
            pinned: false,
        }
    }
}

/// Reads the images of an OCI image layout or, failing that, of a
/// `docker save` manifest.
fn plan_images(
    content: &ContentStore,
    members: &Members,
    platform: &Platform,
    leases: &mut LeaseSet,
) -> Result<Vec<ImagePlan>, ImageError> {
    let docker = if members.contains("manifest.json") {
        Some(read_docker_manifest(content, members)?)
    } else {
        None
    };

    if members.contains("index.json") {
        let mut plans = plan_oci_images(content, members, platform)?;
        // Docker 25+ writes both files, and older OCI layouts may name
        // images only in manifest.json.
        if let Some(entries) = &docker {
            for plan in plans.iter_mut().filter(|p| p.repo_tags.is_empty()) {
                for entry in entries {
                    if members.file(&entry.config)?.0 == plan.config_digest {
                        plan.repo_tags.extend(repo_tags(entry)?);
                    }
                }
            }
        }
        return Ok(plans);
    }

    match docker {
        Some(entries) => entries
            .iter()
            .map(|entry| plan_docker_image(content, members, entry, leases))
            .collect(),
        None => Err(invalid(
            "neither index.json (OCI image layout) nor manifest.json (docker save) is in the archive",
        )),
    }
}

fn plan_oci_images(
    content: &ContentStore,
    members: &Members,
    platform: &Platform,
) -> Result<Vec<ImagePlan>, ImageError> {
    let (index_digest, _) = members.file("index.json")?;
    let index = match parse_document("index.json", &content.read(&index_digest)?)? {
        Document::Index(index) => index,
        Document::Manifest(_) => {
            return Err(invalid("index.json is a manifest, not an image index"));
        }
    };

    let mut plans = Vec::new();
    for descriptor in &index.manifests {
        let top_digest = parse_digest("index.json", &descriptor.digest)?;
        let name = image_name(&descriptor.annotations)?;
        let label = name
            .as_ref()
            .map_or_else(|| top_digest.to_string(), Reference::to_string);

        let (manifest_digest, manifest_media_type, manifest) = resolve_manifest(
            content,
            &label,
            top_digest.clone(),
            descriptor.size,
            platform,
        )?;
        let manifest_size = content_size(content, &manifest_digest)?;
        let config_digest = parse_digest(&label, &manifest.config.digest)?;
        require_blob(content, &label, &config_digest, manifest.config.size)?;
        let config = ImageConfigSummary::parse(&label, &content.read(&config_digest)?)?;
        let layers = plan_layers(&label, &manifest.layers, &config.diff_ids)?;
        for layer in &layers {
            require_blob(content, &label, &layer.digest, layer.size)?;
        }

        let (repo_tags, repo_digests) = match &name {
            Some(reference) => (
                match reference.digest {
                    Some(_) => Vec::new(),
                    None => reference.tagged().into_iter().collect(),
                },
                vec![reference.with_digest(&top_digest.to_string())],
            ),
            None => (Vec::new(), Vec::new()),
        };
        plans.push(ImagePlan {
            repo_tags,
            repo_digests,
            manifest_digest,
            manifest_media_type,
            manifest_size,
            config_digest,
            config_size: manifest.config.size,
            config,
            layers,
        });
    }
    Ok(plans)
}

/// Follows a descriptor of index.json through nested indexes to the
/// manifest for `platform`.
fn resolve_manifest(
    content: &ContentStore,
    label: &str,
    mut digest: Digest,
    mut size: u64,
    platform: &Platform,
) -> Result<(Digest, String, crate::registry::Manifest), ImageError> {
    for _ in 0..MAX_INDEX_DEPTH {
        require_blob(content, label, &digest, size)?;
        match parse_document(label, &content.read(&digest)?)? {
            Document::Manifest(manifest) => {
                let media_type = manifest.media_type.clone();
                return Ok((digest, media_type, manifest));
            }
            Document::Index(index) => {
                let child = select_platform(&index, platform).ok_or_else(|| {
                    ImageError::PlatformNotFound {
                        reference: label.to_string(),
                        platform: platform.to_string(),
                    }
                })?;
                digest = parse_digest(label, &child.digest)?;
                size = child.size;
            }
        }
    }
    Err(ImageError::InvalidContent {
        reference: label.to_string(),
        what: "image index",
        reason: format!("indexes are nested more than {MAX_INDEX_DEPTH} deep"),
    })
}

/// Returns the image name an index.json entry carries, if any. A bare
/// `org.opencontainers.image.ref.name` such as `latest` is only a tag and
/// names no repository, so it is not used.
fn image_name(annotations: &BTreeMap<String, String>) -> Result<Option<Reference>, ImageError> {
    let name = match (
        annotations.get(CONTAINERD_NAME),
        annotations.get(OCI_REF_NAME),
    ) {
        (Some(name), _) => name,
        (None, Some(name)) if name.contains(['/', ':', '@']) => name,
        _ => return Ok(None),
    };
    Reference::parse(name).map(Some)
}

/// Checks that a blob a descriptor names is in the archive, with the size
/// the descriptor gives.
fn require_blob(
    content: &ContentStore,
    label: &str,
    digest: &Digest,
    size: u64,
) -> Result<(), ImageError> {
    if !content.contains(digest) {
        return Err(invalid(format!(
            "blob {digest} of {label} is missing from the archive"
        )));
    }
    content.check_size(label, digest, size)
}

fn content_size(content: &ContentStore, digest: &Digest) -> Result<u64, ImageError> {
    let path = content.blob_path(digest);
    std::fs::metadata(&path)
        .map(|m| m.len())
        .map_err(|source| ImageError::Storage {
            step: "read blob size",
            path,
            source,
        })
}

/// One image of a `docker save` archive's manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    /// Path of the config: `<hex>.json`, or `blobs/sha256/<hex>` from Docker 25 on.
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, lowest first.
    layers: Vec<String>,
}

fn read_docker_manifest(
    content: &ContentStore,
    members: &Members,
) -> Result<Vec<DockerEntry>, ImageError> {
    let (digest, _) = members.file("manifest.json")?;
    serde_json::from_slice(&content.read(&digest)?)
        .map_err(|e| invalid(format!("manifest.json is not a docker save manifest: {e}")))
}

fn repo_tags(entry: &DockerEntry) -> Result<Vec<String>, ImageError> {
    let mut tags = Vec::new();
    for name in entry.repo_tags.iter().flatten() {
        let reference = Reference::parse(name)?;
        tags.extend(reference.tagged());
    }
    Ok(tags)
}

fn plan_docker_image(
    content: &ContentStore,
    members: &Members,
    entry: &DockerEntry,
    leases: &mut LeaseSet,
) -> Result<ImagePlan, ImageError> {
    let (config_digest, config_size) = members.file(&entry.config)?;
    let label = config_digest.to_string();
    let config = ImageConfigSummary::parse(&label, &content.read(&config_digest)?)?;
    if entry.layers.len() != config.diff_ids.len() {
        return Err(ImageError::InvalidContent {
            reference: label,
            what: "image config",
            reason: format!(
                "manifest.json lists {} layers but rootfs.diff_ids has {} entries",
                entry.layers.len(),
                config.diff_ids.len()
            ),
        });
    }

    let chain = chain_ids(&config.diff_ids);
    let mut layers = Vec::with_capacity(entry.layers.len());
    for ((path, diff_id), chain_id) in entry.layers.iter().zip(&config.diff_ids).zip(chain) {
        let (digest, size) = members.file(path)?;
        let compression = detect_compression(content, &digest)?;
        // An uncompressed layer's digest is its diff ID. Checking it now
        // fails early, before the unpack checks it again.
        if compression == Compression::None && &digest != diff_id {
            return Err(ImageError::DigestMismatch {
                expected: diff_id.to_string(),
                actual: digest.to_string(),
            });
        }
        layers.push(PlannedLayer {
            digest,
            media_type: compression.oci_media_type().to_string(),
            size,
            compression,
            diff_id: diff_id.clone(),
            chain_id,
        });
    }

    // A docker save archive has no manifest, so write the OCI manifest that
    // describes the same config and layers. Every image then has one.
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size },
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type,
            "digest": l.digest.to_string(),
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest)
        .map_err(|e| invalid(format!("failed to encode the manifest of {label}: {e}")))?;
    let manifest_digest = Digest::sha256_of(&manifest_bytes);
    leases.add(Resource::Blob(manifest_digest.clone()));
    content.write_bytes(
        Expected {
            reference: &label,
            digest: &manifest_digest,
            size: None,
        },
        &manifest_bytes,
    )?;

    Ok(ImagePlan {
        repo_tags: repo_tags(entry)?,
        repo_digests: Vec::new(),
        manifest_digest,
        manifest_media_type: OCI_MANIFEST.to_string(),
        manifest_size: manifest_bytes.len() as u64,
        config_digest,
        config_size,
        config,
        layers,
    })
}

fn detect_compression(content: &ContentStore, digest: &Digest) -> Result<Compression, ImageError> {
    let mut blob = content.open(digest)?;
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut blob, &mut magic)
        .map_err(ImageError::storage("read blob", content.blob_path(digest)))?;
    Ok(Compression::detect(&magic[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_are_normalized() {
        assert_eq!(
            normalize_member("./blobs//sha256/ab").expect("valid"),
            "blobs/sha256/ab"
        );
        assert_eq!(
            normalize_member("manifest.json").expect("valid"),
            "manifest.json"
        );
    }

    #[test]
    fn escaping_member_paths_are_rejected() {
        for path in ["/etc/passwd", "../x", "blobs/../../x"] {
            let err = normalize_member(path).expect_err("escaping path");
            assert!(
                matches!(err, ImageError::InvalidArchive { .. }),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn symlink_targets_resolve_inside_the_archive() {
        assert_eq!(
            resolve_symlink("abc/layer.tar", "../def/layer.tar").expect("inside"),
            "def/layer.tar"
        );
        assert!(resolve_symlink("abc/layer.tar", "../../etc/passwd").is_err());
        assert!(resolve_symlink("abc/layer.tar", "/etc/passwd").is_err());
    }

    #[test]
    fn bare_ref_name_is_only_a_tag() {
        let annotations = BTreeMap::from([(OCI_REF_NAME.to_string(), "latest".to_string())]);
        assert!(image_name(&annotations).expect("no error").is_none());

        let annotations = BTreeMap::from([(OCI_REF_NAME.to_string(), "busybox:1.36".to_string())]);
        let name = image_name(&annotations).expect("valid").expect("a name");
        assert_eq!(
            name.tagged().as_deref(),
            Some("docker.io/library/busybox:1.36")
        );
    }

    #[test]
    fn containerd_name_wins_over_ref_name() {
        let annotations = BTreeMap::from([
            (OCI_REF_NAME.to_string(), "latest".to_string()),
            (
                CONTAINERD_NAME.to_string(),
                "registry.local:5000/app:v2".to_string(),
            ),
        ]);
        let name = image_name(&annotations).expect("valid").expect("a name");
        assert_eq!(name.tagged().as_deref(), Some("registry.local:5000/app:v2"));
    }

    #[test]
    fn blob_paths_name_their_digest() {
        let digest = Digest::sha256_of(b"x");
        assert_eq!(
            blob_digest_of(&format!("blobs/sha256/{}", digest.hex())),
            Some(digest)
        );
        assert_eq!(blob_digest_of("blobs/sha256/not-hex"), None);
        assert_eq!(blob_digest_of("abc/layer.tar"), None);
    }
}
