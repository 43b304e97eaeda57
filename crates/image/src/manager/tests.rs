//! Tests of the manager's store operations: open-time cleanup, find,
//! remove with garbage collection, load of OCI and docker archives, and
//! disk usage. Pulls from a real registry are tested in `tests/pull.rs`.

use std::io::Write;

use serde_json::json;
use tar::{EntryType, Header};

use super::*;
use crate::store::Images;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

// --- fixtures ---

/// Builds a layer tar of regular files, and directories for paths ending in `/`.
fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = Header::new_gnu();
        let kind = if path.ends_with('/') {
            EntryType::Directory
        } else {
            EntryType::Regular
        };
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        builder
            .append_data(&mut header, path, *data)
            .expect("append layer entry");
    }
    builder.into_inner().expect("finish layer")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("finish gzip")
}

fn sha(bytes: &[u8]) -> String {
    Digest::sha256_of(bytes).to_string()
}

fn hex_of(bytes: &[u8]) -> String {
    Digest::sha256_of(bytes).hex().to_string()
}

/// A complete OCI image: gzip layers, config and manifest.
struct TestImage {
    /// Uncompressed layer tars, lowest first.
    tars: Vec<Vec<u8>>,
    /// Compressed layer blobs, lowest first.
    blobs: Vec<Vec<u8>>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl TestImage {
    fn new(layers: &[&[(&str, &[u8])]], user: &str) -> Self {
        Self::from_tars(layers.iter().map(|files| layer_tar(files)).collect(), user)
    }

    fn from_tars(tars: Vec<Vec<u8>>, user: &str) -> Self {
        let blobs: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
        let config = serde_json::to_vec(&json!({
            "created": "2024-01-02T03:04:05Z",
            "architecture": "amd64",
            "os": "linux",
            "config": { "User": user, "Cmd": ["/bin/sh"] },
            "rootfs": { "type": "layers", "diff_ids": tars.iter().map(|t| sha(t)).collect::<Vec<_>>() },
        }))
        .expect("encode config");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(&config),
                "size": config.len(),
            },
            "layers": blobs.iter().map(|b| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(b),
                "size": b.len(),
            })).collect::<Vec<_>>(),
        }))
        .expect("encode manifest");
        Self {
            tars,
            blobs,
            config,
            manifest,
        }
    }

    fn id(&self) -> String {
        sha(&self.config)
    }
}

/// An archive under construction.
struct ArchiveTar {
    builder: tar::Builder<Vec<u8>>,
}

impl ArchiveTar {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        self.builder
            .append_data(&mut header, path, data)
            .expect("append archive member");
        self
    }

    /// Appends a member with a raw path, bypassing the `tar` crate's checks.
    fn raw_file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_entry_type(EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        self.builder
            .append(&header, data)
            .expect("append raw member");
        self
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        self.builder
            .append_link(&mut header, path, target)
            .expect("append symlink member");
        self
    }

    fn blob(&mut self, bytes: &[u8]) -> &mut Self {
        self.file(&format!("blobs/sha256/{}", hex_of(bytes)), bytes)
    }

    fn image_blobs(&mut self, image: &TestImage) -> &mut Self {
        self.blob(&image.manifest).blob(&image.config);
        for blob in &image.blobs {
            self.blob(blob);
        }
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().expect("finish archive")
    }
}

/// Builds an OCI image layout archive of `images` with their annotations.
fn oci_archive(images: &[(&TestImage, serde_json::Value)]) -> Vec<u8> {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": images.iter().map(|(image, annotations)| json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&image.manifest),
            "size": image.manifest.len(),
            "annotations": annotations,
        })).collect::<Vec<_>>(),
    });
    let mut archive = ArchiveTar::new();
    archive
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file(
            "index.json",
            &serde_json::to_vec(&index).expect("encode index"),
        );
    for (image, _) in images {
        archive.image_blobs(image);
    }
    archive.finish()
}

/// Builds a `docker save` archive in the legacy layout, with `<id>.json`
/// configs and uncompressed `<id>/layer.tar` layers.
fn docker_archive(image: &TestImage, tags: &[&str]) -> Vec<u8> {
    let mut archive = ArchiveTar::new();
    let config_path = format!("{}.json", hex_of(&image.config));
    archive.file(&config_path, &image.config);
    let mut layer_paths = Vec::new();
    for tar in &image.tars {
        let path = format!("{}/layer.tar", hex_of(tar));
        archive.file(&path, tar);
        layer_paths.push(path);
    }
    let manifest = json!([{ "Config": config_path, "RepoTags": tags, "Layers": layer_paths }]);
    archive.file(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("encode manifest.json"),
    );
    archive.finish()
}

struct TestStore {
    dir: tempfile::TempDir,
    manager: ImageManager,
}

impl TestStore {
    async fn open() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let manager = open_at(dir.path()).await;
        Self { dir, manager }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    async fn load_bytes(&self, archive: &[u8]) -> Result<Vec<ImageRecord>, ImageError> {
        let path = self
            .dir
            .path()
            .join(format!("archive-{}.tar", crate::content::random_name()));
        fs::write(&path, archive).expect("write archive");
        let result = self.manager.load(&path).await;
        fs::remove_file(&path).expect("remove archive");
        result
    }

    fn blob_count(&self) -> usize {
        fs::read_dir(self.root().join("blobs/sha256"))
            .expect("list blobs")
            .count()
    }

    fn snapshot_count(&self) -> usize {
        fs::read_dir(self.root().join("snapshots"))
            .expect("list snapshots")
            .count()
    }
}

async fn open_at(dir: &Path) -> ImageManager {
    ImageManager::open(ImageConfig {
        root: dir.join("store"),
        ..ImageConfig::default()
    })
    .await
    .expect("open store")
}

// --- load ---

#[tokio::test]
async fn load_oci_archive_stores_named_image() {
    let store = TestStore::open().await;
    let image = TestImage::new(
        &[
            &[("etc/", b""), ("etc/os-release", b"ID=one\n")],
            &[("bin/tool", b"#!/bin/sh\n")],
        ],
        "1000",
    );
    let archive = oci_archive(&[(
        &image,
        json!({ "io.containerd.image.name": "registry.test:5000/team/app:v1",
                "org.opencontainers.image.ref.name": "v1" }),
    )]);

    let records = store.load_bytes(&archive).await.expect("load");

    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.id, image.id());
    assert_eq!(record.config_digest, image.id());
    assert_eq!(
        record.repo_tags,
        vec!["registry.test:5000/team/app:v1".to_string()]
    );
    assert_eq!(
        record.repo_digests,
        vec![format!(
            "registry.test:5000/team/app@{}",
            sha(&image.manifest)
        )]
    );
    assert_eq!(record.manifest_digest, sha(&image.manifest));
    assert_eq!(record.user, "1000");
    assert_eq!(record.created.as_deref(), Some("2024-01-02T03:04:05Z"));
    let expected_size =
        image.manifest.len() + image.config.len() + image.blobs.iter().map(Vec::len).sum::<usize>();
    assert_eq!(record.size, expected_size as u64);
    assert_eq!(record.layers.len(), 2);
    assert_eq!(record.layers[0].diff_id, sha(&image.tars[0]));
    assert_eq!(
        record.layers[0].chain_id,
        sha(&image.tars[0]),
        "the first chain ID is the diff ID"
    );

    let dirs = store.manager.snapshot_dirs(record);
    assert_eq!(
        fs::read(dirs[0].join("etc/os-release")).expect("lower layer"),
        b"ID=one\n"
    );
    assert_eq!(
        fs::read(dirs[1].join("bin/tool")).expect("upper layer"),
        b"#!/bin/sh\n"
    );

    assert_eq!(store.manager.list(), vec![record.clone()]);
    let config = store.manager.image_config(record).expect("image config");
    assert_eq!(config["config"]["User"], "1000");
    // oci-layout and index.json were stored while loading, then collected.
    assert_eq!(store.blob_count(), 2 + image.blobs.len());
}

#[tokio::test]
async fn load_unnamed_image_by_id() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let archive = oci_archive(&[(
        &image,
        json!({ "org.opencontainers.image.ref.name": "latest" }),
    )]);

    let records = store.load_bytes(&archive).await.expect("load");

    assert!(records[0].repo_tags.is_empty());
    assert!(records[0].repo_digests.is_empty());
    let found = store.manager.find(&image.id()).expect("find by id");
    assert_eq!(found.map(|r| r.id), Some(image.id()));
}

#[tokio::test]
async fn load_resolves_nested_index_to_host_platform() {
    let store = TestStore::open().await;
    let host = TestImage::new(&[&[("arch", b"host")]], "");
    let platform = store.manager.inner.registry.platform().clone();
    // The other entry's blobs are not in the archive: choosing it would fail.
    let other = TestImage::new(&[&[("arch", b"other")]], "");
    let nested = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.manifest.v1+json",
              "digest": sha(&other.manifest), "size": other.manifest.len(),
              "platform": { "os": "linux", "architecture": "s390x" } },
            { "mediaType": "application/vnd.oci.image.manifest.v1+json",
              "digest": sha(&host.manifest), "size": host.manifest.len(),
              "platform": { "os": platform.os, "architecture": platform.architecture,
                            "variant": platform.variant } },
        ],
    }))
    .expect("encode nested index");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": sha(&nested), "size": nested.len(),
                        "annotations": { "io.containerd.image.name": "multi:1" } }],
    });
    let archive = ArchiveTar::new()
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file(
            "index.json",
            &serde_json::to_vec(&index).expect("encode index"),
        )
        .blob(&nested)
        .image_blobs(&host)
        .finish();

    let records = store
        .load_bytes(&archive)
        .await
        .expect("load multi-platform archive");

    let record = &records[0];
    assert_eq!(record.id, host.id());
    assert_eq!(record.manifest_digest, sha(&host.manifest));
    assert_eq!(
        record.repo_digests,
        vec![format!("docker.io/library/multi@{}", sha(&nested))],
        "the repo digest names the index"
    );
    let index_digest = Digest::parse(&sha(&nested)).expect("digest");
    assert!(
        store.manager.inner.content.contains(&index_digest),
        "the index blob is kept with the image"
    );
}

#[tokio::test]
async fn load_gzip_compressed_archive() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let archive = gzip(&oci_archive(&[(
        &image,
        json!({ "org.opencontainers.image.ref.name": "busybox:gz" }),
    )]));

    let records = store.load_bytes(&archive).await.expect("load gzip archive");

    assert_eq!(
        records[0].repo_tags,
        vec!["docker.io/library/busybox:gz".to_string()]
    );
}

#[tokio::test]
async fn load_docker_archive_with_shared_layer_symlink() {
    let store = TestStore::open().await;
    let image = TestImage::new(
        &[
            &[("etc/", b""), ("etc/hostname", b"docker\n")],
            &[("x", b"2")],
        ],
        "nobody",
    );
    let mut archive = ArchiveTar::new();
    let config_path = format!("{}.json", hex_of(&image.config));
    archive.file(&config_path, &image.config);
    archive.file("first/layer.tar", &image.tars[0]);
    archive.file("second/layer.tar", &image.tars[1]);
    // Docker links a layer it already wrote instead of writing it twice.
    archive.symlink("third/layer.tar", "../second/layer.tar");
    let manifest = json!([{
        "Config": config_path,
        "RepoTags": ["busybox:saved", "example.com/app:1"],
        "Layers": ["first/layer.tar", "third/layer.tar"],
    }]);
    archive.file(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("encode"),
    );
    let archive = archive.finish();

    let records = store
        .load_bytes(&archive)
        .await
        .expect("load docker archive");

    let record = &records[0];
    assert_eq!(record.id, image.id());
    assert_eq!(
        record.repo_tags,
        vec![
            "docker.io/library/busybox:saved".to_string(),
            "example.com/app:1".to_string()
        ]
    );
    assert!(record.repo_digests.is_empty());
    assert_eq!(
        record.layers[0].digest,
        sha(&image.tars[0]),
        "uncompressed: digest is diff ID"
    );
    assert_eq!(
        record.layers[1].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(record.user, "nobody");
    let dirs = store.manager.snapshot_dirs(record);
    assert_eq!(
        fs::read(dirs[0].join("etc/hostname")).expect("layer file"),
        b"docker\n"
    );
    let manifest = Digest::parse(&record.manifest_digest).expect("manifest digest");
    assert!(
        store.manager.inner.content.contains(&manifest),
        "the manifest written for it is stored"
    );
}

#[tokio::test]
async fn load_legacy_docker_archive() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let records = store
        .load_bytes(&docker_archive(&image, &["legacy:1"]))
        .await
        .expect("load");
    assert_eq!(
        records[0].repo_tags,
        vec!["docker.io/library/legacy:1".to_string()]
    );
}

#[tokio::test]
async fn load_rejects_tampered_blob() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let mut archive = ArchiveTar::new();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": sha(&image.manifest), "size": image.manifest.len() }],
    });
    archive
        .file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .file("index.json", &serde_json::to_vec(&index).expect("encode"))
        .blob(&image.manifest)
        .blob(&image.config)
        // The layer's bytes do not match the name they are stored under.
        .file(
            &format!("blobs/sha256/{}", hex_of(&image.blobs[0])),
            b"tampered layer",
        );
    let archive = archive.finish();

    let err = store.load_bytes(&archive).await.expect_err("tampered blob");

    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(store.manager.list().is_empty());
    let layer = Digest::parse(&sha(&image.blobs[0])).expect("digest");
    assert!(!store.manager.inner.content.contains(&layer));
}

#[tokio::test]
async fn load_rejects_wrong_docker_layer() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let other = layer_tar(&[("b", b"2")]);
    let mut archive = ArchiveTar::new();
    let config_path = format!("{}.json", hex_of(&image.config));
    archive
        .file(&config_path, &image.config)
        .file("l/layer.tar", &other);
    let manifest =
        json!([{ "Config": config_path, "RepoTags": ["x:1"], "Layers": ["l/layer.tar"] }]);
    archive.file(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("encode"),
    );

    let err = store
        .load_bytes(&archive.finish())
        .await
        .expect_err("wrong layer");

    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(store.manager.list().is_empty());
}

#[tokio::test]
async fn load_rejects_escaping_member_paths() {
    let store = TestStore::open().await;
    for path in ["../evil", "/etc/evil", "blobs/../../evil"] {
        let archive = ArchiveTar::new().raw_file(path, b"x").finish();
        let err = store
            .load_bytes(&archive)
            .await
            .expect_err("escaping member");
        assert!(
            matches!(err, ImageError::InvalidArchive { .. }),
            "{path}: {err}"
        );
    }
    let outside = store.dir.path().join("evil");
    assert!(!outside.exists());
}

#[tokio::test]
async fn load_rejects_symlink_out_of_the_archive() {
    let store = TestStore::open().await;
    let archive = ArchiveTar::new()
        .symlink("a/layer.tar", "../../etc/passwd")
        .finish();
    let err = store
        .load_bytes(&archive)
        .await
        .expect_err("escaping symlink");
    assert!(matches!(err, ImageError::InvalidArchive { .. }), "{err}");
}

#[tokio::test]
async fn load_rejects_archive_without_index_or_manifest() {
    let store = TestStore::open().await;
    let archive = ArchiveTar::new().file("README", b"not an image").finish();
    let err = store.load_bytes(&archive).await.expect_err("no image");
    assert!(matches!(err, ImageError::InvalidArchive { .. }), "{err}");
    assert_eq!(store.blob_count(), 0, "the stored member was collected");
}

#[tokio::test]
async fn load_rejects_unsafe_layer_and_stores_nothing() {
    let store = TestStore::open().await;
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = Header::new_gnu();
    header.as_old_mut().name[..5].copy_from_slice(b"../x\0");
    header.set_entry_type(EntryType::Regular);
    header.set_size(1);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    builder.append(&header, &b"x"[..]).expect("append");
    let hostile = builder.into_inner().expect("finish");

    let image = TestImage::from_tars(vec![hostile], "");
    let archive = oci_archive(&[(&image, json!({ "io.containerd.image.name": "hostile:1" }))]);

    let err = store.load_bytes(&archive).await.expect_err("hostile layer");

    assert!(matches!(err, ImageError::UnsafeLayerEntry { .. }), "{err}");
    assert!(store.manager.list().is_empty());
    assert_eq!(store.snapshot_count(), 0, "no snapshot and no tmp dir");
    assert!(!store.root().join("x").exists());
    assert!(!store.root().join("snapshots/x").exists());
}

// --- find, remove, tags ---

#[tokio::test]
async fn find_matches_ids_prefixes_tags_and_digests() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let archive = oci_archive(&[(
        &image,
        json!({ "io.containerd.image.name": "docker.io/library/busybox:latest" }),
    )]);
    store.load_bytes(&archive).await.expect("load");
    let id = image.id();
    let hex = id.trim_start_matches("sha256:").to_string();
    let manifest = sha(&image.manifest);

    let names = [
        id.clone(),
        hex.clone(),
        hex[..12].to_string(),
        hex[..4].to_string(),
        format!("sha256:{}", &hex[..12]),
        "busybox".to_string(),
        "busybox:latest".to_string(),
        "docker.io/library/busybox:latest".to_string(),
        format!("busybox@{manifest}"),
        format!("docker.io/library/busybox@{manifest}"),
    ];
    for name in names {
        let found = store.manager.find(&name).expect("find");
        assert_eq!(found.map(|r| r.id), Some(id.clone()), "{name}");
    }

    for name in [
        "busybox:other",
        "alpine",
        &format!("sha256:{}", "0".repeat(64)),
    ] {
        assert!(store.manager.find(name).expect("find").is_none(), "{name}");
    }
    assert!(matches!(
        store.manager.find("Not A Reference"),
        Err(ImageError::InvalidReference { .. })
    ));
}

/// Returns a record with only an ID (`sha256:<hex>`) and tags, for lookups.
fn bare_record(hex: &str, tags: &[&str]) -> ImageRecord {
    ImageRecord {
        id: format!("sha256:{hex}"),
        repo_tags: tags.iter().map(|tag| tag.to_string()).collect(),
        repo_digests: vec![],
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

#[test]
fn ambiguous_id_prefix_is_an_error() {
    let record = |hex: String| bare_record(&hex, &[]);
    let a = record(format!("abcd{}", "1".repeat(60)));
    let b = record(format!("abcd{}", "2".repeat(60)));
    let images = Images::from([(a.id.clone(), a.clone()), (b.id.clone(), b)]);

    let err = find_in(&images, "abcd").expect_err("ambiguous prefix");
    match err {
        ImageError::InvalidReference { reason, .. } => {
            assert!(reason.contains("ambiguous"), "{reason}")
        }
        other => panic!("expected InvalidReference, got {other:?}"),
    }
    let found = find_in(&images, "abcd1").expect("unique prefix");
    assert_eq!(found.map(|r| r.id), Some(a.id));
}

#[tokio::test]
async fn loading_a_stored_image_keeps_its_content() {
    let store = TestStore::open().await;
    let image = TestImage::new(&[&[("a", b"1")]], "");
    let oci = oci_archive(&[(
        &image,
        json!({ "io.containerd.image.name": "docker.io/library/first:latest" }),
    )]);
    let first = store.load_bytes(&oci).await.expect("load OCI archive");

    // The docker archive carries the same config with uncompressed layers
    // and a manifest the loader builds.
    let loaded = store
        .load_bytes(&docker_archive(&image, &["second:latest"]))
        .await
        .expect("load docker archive");

    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].repo_tags, ["docker.io/library/second:latest"]);
    let stored = store
        .manager
        .find("second")
        .expect("find second")
        .expect("second is stored");
    assert_eq!(stored.manifest_digest, first[0].manifest_digest);
    assert_eq!(stored.layers, first[0].layers);
    assert_eq!(stored.size, first[0].size);
    assert_eq!(
        stored.repo_tags,
        [
            "docker.io/library/first:latest",
            "docker.io/library/second:latest"
        ]
    );
    let layer = &first[0].layers[0].digest;
    let layer_blob = store
        .root()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    assert!(layer_blob.is_file(), "the first load's layer {layer} stays");
}

#[tokio::test]
async fn load_rejects_layer_size_that_lies() {
    let store = TestStore::open().await;
    let mut image = TestImage::new(&[&[("a", b"1")]], "");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&image.manifest).expect("parse manifest");
    manifest["layers"][0]["size"] = json!(1u64 << 62);
    image.manifest = serde_json::to_vec(&manifest).expect("encode manifest");
    let archive = oci_archive(&[(
        &image,
        json!({ "io.containerd.image.name": "docker.io/library/liar:latest" }),
    )]);

    let err = store
        .load_bytes(&archive)
        .await
        .expect_err("a layer size that differs from the blob must be rejected");

    assert!(
        matches!(
            err,
            ImageError::InvalidContent {
                what: "descriptor",
                ..
            }
        ),
        "{err}"
    );
    assert!(store.manager.list().is_empty(), "nothing is loaded");
}

#[test]
fn name_wins_over_id_prefix() {
    let record = |hex: String, tag: &str| bare_record(&hex, &[tag]);
    let prefixed = record(
        format!("cafe{}", "1".repeat(60)),
        "docker.io/library/other:latest",
    );
    let named = record("2".repeat(64), "docker.io/library/cafe:latest");
    // A repository named `sha256` must not capture `sha256:cafe`.
    let decoy = record("3".repeat(64), "docker.io/library/sha256:cafe");
    let images = Images::from([
        (prefixed.id.clone(), prefixed.clone()),
        (named.id.clone(), named.clone()),
        (decoy.id.clone(), decoy),
    ]);

    let found = find_in(&images, "cafe").expect("find cafe");
    assert_eq!(found.map(|r| r.id), Some(named.id), "the name cafe wins");
    let found = find_in(&images, "sha256:cafe").expect("find sha256:cafe");
    assert_eq!(
        found.map(|r| r.id),
        Some(prefixed.id),
        "sha256: marks an ID"
    );
}

#[tokio::test]
async fn remove_frees_only_unshared_content() {
    let store = TestStore::open().await;
    let shared: &[(&str, &[u8])] = &[("base", b"shared base layer")];
    let first = TestImage::new(&[shared, &[("one", b"1")]], "");
    let second = TestImage::new(&[shared, &[("two", b"2")]], "");
    store
        .load_bytes(&oci_archive(&[
            (&first, json!({ "io.containerd.image.name": "first:1" })),
            (&second, json!({ "io.containerd.image.name": "second:1" })),
        ]))
        .await
        .expect("load both");
    assert_eq!(store.snapshot_count(), 3);
    let shared_layer = Digest::parse(&sha(&first.blobs[0])).expect("digest");
    let first_only = Digest::parse(&sha(&first.blobs[1])).expect("digest");

    let removed = store.manager.remove("first:1").await.expect("remove");

    assert_eq!(removed.map(|r| r.id), Some(first.id()));
    assert_eq!(store.snapshot_count(), 2, "the shared base snapshot stays");
    assert!(store.manager.inner.content.contains(&shared_layer));
    assert!(!store.manager.inner.content.contains(&first_only));
    let second_record = store
        .manager
        .find("second:1")
        .expect("find")
        .expect("second stays");
    for dir in store.manager.snapshot_dirs(&second_record) {
        assert!(dir.is_dir(), "{} must stay", dir.display());
    }

    assert!(
        store
            .manager
            .remove("first:1")
            .await
            .expect("remove again")
            .is_none()
    );
    store
        .manager
        .remove("second:1")
        .await
        .expect("remove second");
    assert_eq!(store.snapshot_count(), 0);
    assert_eq!(store.blob_count(), 0);
}

#[tokio::test]
async fn tag_moves_to_a_newly_loaded_image() {
    let store = TestStore::open().await;
    let old = TestImage::new(&[&[("v", b"old")]], "");
    let new = TestImage::new(&[&[("v", b"new")]], "");
    store
        .load_bytes(&docker_archive(&old, &["app:latest", "app:1"]))
        .await
        .expect("load old");
    store
        .load_bytes(&docker_archive(&new, &["app:latest"]))
        .await
        .expect("load new");

    let latest = store
        .manager
        .find("app:latest")
        .expect("find")
        .expect("latest");
    assert_eq!(latest.id, new.id());
    let app1 = store.manager.find("app:1").expect("find").expect("app:1");
    assert_eq!(app1.id, old.id());
    assert_eq!(app1.repo_tags, vec!["docker.io/library/app:1".to_string()]);

    // Loading another image as app:1 leaves the old one nameless: it goes.
    let newest = TestImage::new(&[&[("v", b"newest")]], "");
    store
        .load_bytes(&docker_archive(&newest, &["app:1"]))
        .await
        .expect("load newest");
    assert!(store.manager.find(&old.id()).expect("find").is_none());
    assert_eq!(store.manager.list().len(), 2);
}

/// Fails to compile if a long-running call cannot be moved into
/// `tokio::spawn`, as the CRI layer does with pulls and loads.
#[allow(dead_code)]
fn futures_are_send(manager: &ImageManager, path: &Path) {
    fn is_send<T: Send>(_: T) {}
    is_send(manager.pull("busybox", None, None));
    is_send(manager.load(path));
    is_send(manager.remove("busybox"));
    is_send(manager.fs_usage());
}

// --- open and usage ---

#[tokio::test]
async fn open_removes_leftovers_of_interrupted_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = TestImage::new(&[&[("kept", b"yes")]], "");
    {
        let manager = open_at(dir.path()).await;
        let path = dir.path().join("archive.tar");
        fs::write(
            &path,
            oci_archive(&[(&image, json!({ "io.containerd.image.name": "kept:1" }))]),
        )
        .expect("write archive");
        manager.load(&path).await.expect("load");
    }
    let root = dir.path().join("store");
    // What a killed pull leaves: an ingest file, an unfinished snapshot, a
    // verified blob and a complete snapshot that no record names yet.
    fs::write(root.join("ingest/0011223344556677"), b"partial").expect("ingest file");
    fs::create_dir(root.join("snapshots/tmp-0011223344556677")).expect("tmp snapshot");
    let orphan_blob = root.join(format!("blobs/sha256/{}", hex_of(b"orphan")));
    fs::write(&orphan_blob, b"orphan").expect("orphan blob");
    let orphan_snapshot = root.join(format!("snapshots/{}", hex_of(b"orphan chain")));
    fs::create_dir(&orphan_snapshot).expect("orphan snapshot");
    fs::create_dir_all(root.join("trash/x")).expect("trash");

    let manager = open_at(dir.path()).await;

    assert_eq!(
        fs::read_dir(root.join("ingest")).expect("ingest").count(),
        0
    );
    assert!(!root.join("snapshots/tmp-0011223344556677").exists());
    assert!(!orphan_blob.exists());
    assert!(!orphan_snapshot.exists());
    assert!(!root.join("trash/x").exists());
    let record = manager
        .find("kept:1")
        .expect("find")
        .expect("image survives reopen");
    for dir in manager.snapshot_dirs(&record) {
        assert!(dir.is_dir());
    }
    manager.image_config(&record).expect("config blob survives");
}

#[tokio::test]
async fn fs_usage_counts_bytes_and_inodes() {
    let store = TestStore::open().await;
    let empty = store
        .manager
        .fs_usage()
        .await
        .expect("usage of empty store");
    let image = TestImage::new(&[&[("big", &[1u8; 64 * 1024])]], "");
    store
        .load_bytes(&oci_archive(&[(
            &image,
            json!({ "io.containerd.image.name": "big:1" }),
        )]))
        .await
        .expect("load");

    let usage = store.manager.fs_usage().await.expect("usage");

    assert_eq!(usage.mountpoint, store.root());
    assert!(
        usage.used_bytes >= empty.used_bytes + 64 * 1024,
        "{usage:?}"
    );
    assert!(usage.inodes_used > empty.inodes_used, "{usage:?}");
}

#[tokio::test]
async fn loaded_image_keeps_ownership_when_root() {
    if !is_root() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let store = TestStore::open().await;
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_size(1);
    header.set_mode(0o4750);
    header.set_uid(65534);
    header.set_gid(65534);
    header.set_mtime(0);
    builder
        .append_data(&mut header, "bin/tool", &b"x"[..])
        .expect("append");
    let tar = builder.into_inner().expect("finish");
    let docker = {
        let config = serde_json::to_vec(&json!({
            "rootfs": { "type": "layers", "diff_ids": [sha(&tar)] },
        }))
        .expect("encode");
        let config_path = format!("{}.json", hex_of(&config));
        let manifest =
            json!([{ "Config": config_path, "RepoTags": ["owned:1"], "Layers": ["l/layer.tar"] }]);
        ArchiveTar::new()
            .file(&config_path, &config)
            .file("l/layer.tar", &tar)
            .file(
                "manifest.json",
                &serde_json::to_vec(&manifest).expect("encode"),
            )
            .finish()
    };

    let records = store.load_bytes(&docker).await.expect("load");

    let dirs = store.manager.snapshot_dirs(&records[0]);
    let meta = fs::metadata(dirs[0].join("bin/tool")).expect("stat");
    assert_eq!(meta.uid(), 65534);
    assert_eq!(meta.mode() & 0o7777, 0o4750);
}
