//! The CRI ImageService of `hatoba daemon`, driven through a real gRPC client
//! over the daemon's socket against the testenv registries.
//!
//! Every test starts its own daemon, so the tests run in parallel and share
//! only the registries. They need root and `hatoba-testenv up`; without
//! them they print `skipped:` and return.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::{
    Harness, basic_auth, blob_path, chain_ids, daemon_options, entries, files_below, fixture,
    hex_of, host_platform, paths_named_below, pull_image, snapshot_dir, test_env,
};
use hatoba_testenv::env::TestEnv;
use hatoba_testenv::proxy::Proxy;
use k8s_cri::v1::{AuthConfig, Image};
use tonic::Code;

/// Returns whether `images` has an image with ID `id`.
fn has_image(images: &[Image], id: &str) -> bool {
    images.iter().any(|image| image.id == id)
}

/// Returns a reference to fixture `name` through `proxy` instead of the
/// open registry.
fn proxied_reference(env: &TestEnv, proxy: &Proxy, name: &str) -> String {
    let fixture = fixture(env, name);
    format!(
        "{}/{}:{}",
        proxy.host(),
        fixture.repository(),
        fixture.tag()
    )
}

/// Pulls fixture `name` on a fresh daemon and checks what every pull must
/// give: the image ID as image ref, the image listed under its tag, and a
/// snapshot per layer. Returns the harness for further checks.
async fn pull_fixture(env: &TestEnv, name: &str) -> Harness {
    let fixture = fixture(env, name);
    let mut harness = Harness::start(env).await;

    let image_ref = harness.pull_ok(&fixture.reference).await;

    assert_eq!(
        image_ref, fixture.config_digest,
        "PullImage of {name} should return the image ID, the config digest"
    );
    let listed = harness.list(None).await;
    let image = listed
        .iter()
        .find(|image| image.id == fixture.config_digest)
        .unwrap_or_else(|| {
            panic!(
                "ListImages should show {name} as {}, got {listed:?}",
                fixture.config_digest
            )
        });
    assert!(
        image.repo_tags.contains(&fixture.reference),
        "{name} should be listed under {}, got {:?}",
        fixture.reference,
        image.repo_tags
    );
    let store = harness.store();
    for chain_id in chain_ids(&fixture.layers) {
        let dir = snapshot_dir(&store, &chain_id);
        assert!(
            dir.is_dir(),
            "a snapshot directory {} should exist for {name}",
            dir.display()
        );
    }
    harness
}

/// Returns the snapshot directory of layer `index` of fixture `name`.
fn layer_snapshot(
    harness: &Harness,
    env: &TestEnv,
    name: &str,
    index: usize,
) -> std::path::PathBuf {
    let chain = chain_ids(&fixture(env, name).layers);
    snapshot_dir(&harness.store(), &chain[index])
}

/// Returns the snapshot directory of the top layer of fixture `name`.
fn top_snapshot(harness: &Harness, env: &TestEnv, name: &str) -> std::path::PathBuf {
    let layers = fixture(env, name).layers.len();
    layer_snapshot(harness, env, name, layers - 1)
}

// ---------------------------------------------------------------------------
// Pulling each fixture
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pull_busybox_unpacks_busybox() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "busybox").await;

    let busybox = layer_snapshot(&harness, &env, "busybox", 0).join("bin/busybox");
    assert!(
        busybox.is_file(),
        "the busybox snapshot should contain {}",
        busybox.display()
    );
}

#[tokio::test]
async fn pull_busybox_records_digest_reference() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    let status = harness.status(&busybox.reference, false).await;

    let image = status.image.expect("ImageStatus should find busybox");
    let digest_reference = format!(
        "{}/{}@{}",
        busybox.registry(),
        busybox.repository(),
        busybox.top_digest
    );
    assert!(
        image.repo_digests.contains(&digest_reference),
        "repo_digests should contain {digest_reference}, got {:?}",
        image.repo_digests
    );
}

#[tokio::test]
async fn pull_multilayer_stores_overlay_whiteouts() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "multilayer").await;
    let top = layer_snapshot(&harness, &env, "multilayer", 2);

    let whiteout = std::fs::symlink_metadata(top.join("data/remove-me"))
        .expect("the top multilayer snapshot should contain a whiteout for data/remove-me");
    assert!(
        whiteout.file_type().is_char_device(),
        "the whiteout data/remove-me should be a character device"
    );
    assert_eq!(
        whiteout.rdev(),
        0,
        "the whiteout device number should be 0:0"
    );

    let mut opaque = [0u8; 8];
    let length = rustix::fs::lgetxattr(top.join("data/dir"), "trusted.overlay.opaque", &mut opaque)
        .expect("data/dir in the top snapshot should carry trusted.overlay.opaque");
    assert_eq!(
        &opaque[..length],
        b"y",
        "trusted.overlay.opaque should be y"
    );

    assert!(
        top.join("data/dir/new-c").is_file(),
        "the opaque directory should contain new-c"
    );
}

#[tokio::test]
async fn pull_multilayer_keeps_file_metadata() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "multilayer").await;
    let data = layer_snapshot(&harness, &env, "multilayer", 1).join("data");

    let keep = std::fs::symlink_metadata(data.join("keep")).expect("data/keep should exist");
    let hardlink =
        std::fs::symlink_metadata(data.join("hardlink")).expect("data/hardlink should exist");
    assert_eq!(
        hardlink.ino(),
        keep.ino(),
        "data/hardlink should be a hard link to data/keep"
    );

    let link = std::fs::read_link(data.join("link")).expect("data/link should be a symlink");
    assert_eq!(link, Path::new("keep"), "data/link should point at keep");

    let setuid = std::fs::symlink_metadata(data.join("setuid")).expect("data/setuid should exist");
    assert_eq!(
        setuid.permissions().mode() & 0o7777,
        0o4755,
        "data/setuid should keep mode 4755"
    );
    assert_eq!(
        setuid.uid(),
        1000,
        "data/setuid should be owned by uid 1000"
    );
    assert_eq!(
        setuid.gid(),
        1000,
        "data/setuid should be owned by gid 1000"
    );

    let mut value = [0u8; 64];
    let length = rustix::fs::lgetxattr(data.join("keep"), "user.hatoba", &mut value)
        .expect("data/keep should carry the xattr user.hatoba");
    assert_eq!(
        &value[..length],
        b"fixture",
        "user.hatoba on data/keep should be fixture"
    );
}

#[tokio::test]
async fn pull_multiarch_selects_host_platform() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "multiarch").await;

    let platform_file = top_snapshot(&harness, &env, "multiarch").join("platform");
    let platform = std::fs::read_to_string(&platform_file)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", platform_file.display()));
    let platform = platform.trim();
    let host = host_platform();
    assert!(
        platform == host || platform.starts_with(&format!("{host}/")),
        "the multiarch snapshot should be for {host}, its /platform says {platform:?}"
    );
}

#[tokio::test]
async fn pull_multiarch_records_index_digest() {
    let Some(env) = test_env() else { return };
    let multiarch = fixture(&env, "multiarch");
    let mut harness = pull_fixture(&env, "multiarch").await;

    let image = harness
        .status(&multiarch.reference, false)
        .await
        .image
        .expect("ImageStatus should find multiarch");

    let index_reference = format!(
        "{}/{}@{}",
        multiarch.registry(),
        multiarch.repository(),
        multiarch.top_digest
    );
    assert!(
        image.repo_digests.contains(&index_reference),
        "repo_digests should contain the index digest reference {index_reference}, got {:?}",
        image.repo_digests
    );
    let (algorithm, hex) = multiarch
        .top_digest
        .split_once(':')
        .expect("the index digest has an algorithm");
    let index_blob = harness
        .daemon
        .root()
        .join("images/blobs")
        .join(algorithm)
        .join(hex);
    assert!(
        index_blob.is_file(),
        "the image index should be stored at {}",
        index_blob.display()
    );

    // The size counts the index too, as containerd's does.
    let blobs = harness.daemon.root().join("images/blobs");
    let blob_size = |digest: &str| {
        let (algorithm, hex) = digest.split_once(':').expect("digest with an algorithm");
        std::fs::metadata(blobs.join(algorithm).join(hex))
            .unwrap_or_else(|error| panic!("blob {digest} should be stored: {error}"))
            .len()
    };
    let expected: u64 = [
        &multiarch.top_digest,
        &multiarch.manifest_digest,
        &multiarch.config_digest,
    ]
    .into_iter()
    .chain(multiarch.layers.iter().map(|layer| &layer.digest))
    .map(|digest| blob_size(digest))
    .sum();
    assert_eq!(
        image.size, expected,
        "size of index, manifest, config and layers"
    );
}

#[tokio::test]
async fn pull_restores_missing_blob_of_kept_snapshot() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;
    let (algorithm, hex) = busybox.layers[0]
        .digest
        .split_once(':')
        .expect("the layer digest has an algorithm");
    let blob = harness
        .daemon
        .root()
        .join("images/blobs")
        .join(algorithm)
        .join(hex);
    // What a collection racing with a pull could leave: the snapshot is
    // kept for another image while the blob is gone.
    std::fs::remove_file(&blob).expect("remove the layer blob");

    harness.pull_ok(&busybox.reference).await;

    assert!(
        blob.is_file(),
        "pulling again should fetch the missing blob {}",
        blob.display()
    );
}

#[tokio::test]
async fn pull_zstd_unpacks_zstd_layers() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "zstd").await;

    let marker = top_snapshot(&harness, &env, "zstd").join("zstd-marker");
    assert!(
        marker.exists(),
        "the zstd snapshot should contain {}",
        marker.display()
    );
}

#[tokio::test]
async fn pull_uncompressed_unpacks_plain_tar_layers() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "uncompressed").await;

    let busybox = layer_snapshot(&harness, &env, "uncompressed", 0).join("bin/busybox");
    assert!(
        busybox.is_file(),
        "the uncompressed snapshot should contain {}",
        busybox.display()
    );
}

#[tokio::test]
async fn pull_docker_schema2_succeeds() {
    let Some(env) = test_env() else { return };
    pull_fixture(&env, "docker").await;
}

#[tokio::test]
async fn pull_docker_list_selects_host_platform() {
    let Some(env) = test_env() else { return };
    pull_fixture(&env, "docker-list").await;
}

#[tokio::test]
async fn pull_shared_unpacks_its_own_layer() {
    let Some(env) = test_env() else { return };
    let harness = pull_fixture(&env, "shared").await;

    let marker = top_snapshot(&harness, &env, "shared").join("shared-marker");
    assert!(
        marker.exists(),
        "the shared snapshot should contain {}",
        marker.display()
    );
}

#[tokio::test]
async fn pull_second_tag_adds_the_tag() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let Some(alias) = busybox.aliases.first() else {
        panic!("the busybox fixture should have a second tag (1.35) in env.json");
    };
    let mut harness = pull_fixture(&env, "busybox").await;

    let image_ref = harness.pull_ok(alias).await;

    assert_eq!(
        image_ref, busybox.config_digest,
        "the second tag should resolve to the same image ID"
    );
    let listed = harness.list(None).await;
    assert_eq!(
        listed.len(),
        1,
        "two tags of one image should list one image"
    );
    assert!(
        listed[0].repo_tags.contains(alias),
        "repo_tags should contain {alias}, got {:?}",
        listed[0].repo_tags
    );
    assert!(
        listed[0].repo_tags.contains(&busybox.reference),
        "repo_tags should still contain {}, got {:?}",
        busybox.reference,
        listed[0].repo_tags
    );
}

// ---------------------------------------------------------------------------
// ListImages, ImageStatus, RemoveImage, ImageFsInfo
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_images_returns_every_image() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let shared = fixture(&env, "shared");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;
    harness.pull_ok(&shared.reference).await;

    let listed = harness.list(None).await;

    assert_eq!(
        listed.len(),
        2,
        "ListImages should return two images, got {listed:?}"
    );
    assert!(
        has_image(&listed, &busybox.config_digest),
        "busybox should be listed"
    );
    assert!(
        has_image(&listed, &shared.config_digest),
        "shared should be listed"
    );
}

#[tokio::test]
async fn list_images_filter_matches_one_image() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let shared = fixture(&env, "shared");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;
    harness.pull_ok(&shared.reference).await;

    let listed = harness.list(Some(&busybox.reference)).await;

    assert_eq!(
        listed.len(),
        1,
        "the filter should match one image, got {listed:?}"
    );
    assert_eq!(
        listed[0].id, busybox.config_digest,
        "the filter should match busybox"
    );
}

#[tokio::test]
async fn list_images_starts_empty() {
    let Some(env) = test_env() else { return };
    let mut harness = Harness::start(&env).await;

    let listed = harness.list(None).await;

    assert!(
        listed.is_empty(),
        "a new daemon should list no image, got {listed:?}"
    );
}

#[tokio::test]
async fn image_status_finds_by_tag() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    let image = harness.status(&busybox.reference, false).await.image;

    assert_eq!(
        image.map(|image| image.id),
        Some(busybox.config_digest.clone()),
        "ImageStatus by tag should find busybox"
    );
}

#[tokio::test]
async fn image_status_finds_by_id() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    let image = harness.status(&busybox.config_digest, false).await.image;

    assert_eq!(
        image.map(|image| image.id),
        Some(busybox.config_digest.clone()),
        "ImageStatus by ID should find busybox"
    );
}

#[tokio::test]
async fn image_status_finds_by_digest_reference() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;
    let digest_reference = format!(
        "{}/{}@{}",
        busybox.registry(),
        busybox.repository(),
        busybox.manifest_digest
    );

    let image = harness.status(&digest_reference, false).await.image;

    assert_eq!(
        image.map(|image| image.id),
        Some(busybox.config_digest.clone()),
        "ImageStatus by {digest_reference} should find busybox"
    );
}

#[tokio::test]
async fn image_status_unknown_image_is_empty() {
    let Some(env) = test_env() else { return };
    let mut harness = Harness::start(&env).await;

    let status = harness
        .status(&format!("{}/testenv/not-pulled:latest", env.open), false)
        .await;

    assert!(
        status.image.is_none(),
        "ImageStatus of an unknown image should return no image"
    );
}

#[tokio::test]
async fn image_status_verbose_includes_config() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    let status = harness.status(&busybox.reference, true).await;

    let diff_ids: Vec<serde_json::Value> = busybox
        .layers
        .iter()
        .map(|layer| serde_json::Value::from(layer.diff_id.clone()))
        .collect();
    let has_config = status.info.values().any(|value| {
        serde_json::from_str::<serde_json::Value>(value)
            .is_ok_and(|json| contains_rootfs(&json, &diff_ids))
    });
    assert!(
        has_config,
        "verbose ImageStatus info should contain the image config with rootfs.diff_ids {diff_ids:?}, got {:?}",
        status.info
    );
}

/// Returns whether `json` or an object nested in it has
/// `rootfs.diff_ids == diff_ids`, as an image config does.
fn contains_rootfs(json: &serde_json::Value, diff_ids: &[serde_json::Value]) -> bool {
    match json {
        serde_json::Value::Object(map) => {
            map.get("rootfs")
                .and_then(|rootfs| rootfs.get("diff_ids"))
                .and_then(|ids| ids.as_array())
                .is_some_and(|ids| ids.as_slice() == diff_ids)
                || map.values().any(|value| contains_rootfs(value, diff_ids))
        }
        serde_json::Value::Array(values) => {
            values.iter().any(|value| contains_rootfs(value, diff_ids))
        }
        _ => false,
    }
}

#[tokio::test]
async fn image_status_numeric_user_sets_uid() {
    let Some(env) = test_env() else { return };
    let multilayer = fixture(&env, "multilayer");
    let mut harness = pull_fixture(&env, "multilayer").await;

    let image = harness
        .status(&multilayer.reference, false)
        .await
        .image
        .expect("ImageStatus should find multilayer");

    assert_eq!(
        image.uid.map(|uid| uid.value),
        Some(1000),
        "multilayer's config User 1000 should be reported as uid 1000"
    );
    assert_eq!(
        image.username, "",
        "a numeric user should leave username empty"
    );
}

#[tokio::test]
async fn image_status_without_user_sets_no_uid() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    let image = harness
        .status(&busybox.reference, false)
        .await
        .image
        .expect("ImageStatus should find busybox");

    assert_eq!(image.uid, None, "busybox has no config User, so no uid");
    assert_eq!(
        image.username, "",
        "busybox has no config User, so no username"
    );
}

#[tokio::test]
async fn image_status_reports_size() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    let image = harness
        .status(&busybox.reference, false)
        .await
        .image
        .expect("ImageStatus should find busybox");

    let layer_bytes: u64 = busybox.layers.iter().map(|layer| layer.size).sum();
    assert!(image.size > 0, "the image size should not be 0");
    assert!(
        image.size >= layer_bytes,
        "the image size {} should cover the layer blobs ({layer_bytes} bytes)",
        image.size
    );
}

/// Pulls busybox, removes it by `name_of(fixture)` and checks it is gone.
async fn assert_remove_by(name_of: impl Fn(&hatoba_testenv::env::Fixture) -> String) {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;
    let name = name_of(busybox);

    let removed = harness.remove(&name).await;

    assert!(
        removed.is_ok(),
        "RemoveImage {name} should succeed, got {removed:?}"
    );
    let status = harness.status(&busybox.config_digest, false).await;
    assert!(
        status.image.is_none(),
        "busybox should be gone after RemoveImage {name}"
    );
    let listed = harness.list(None).await;
    assert!(
        listed.is_empty(),
        "no image should be listed after RemoveImage {name}, got {listed:?}"
    );
}

#[tokio::test]
async fn remove_image_by_id() {
    assert_remove_by(|busybox| busybox.config_digest.clone()).await;
}

#[tokio::test]
async fn remove_image_by_tag() {
    assert_remove_by(|busybox| busybox.reference.clone()).await;
}

#[tokio::test]
async fn remove_image_by_digest_reference() {
    assert_remove_by(|busybox| {
        format!(
            "{}/{}@{}",
            busybox.registry(),
            busybox.repository(),
            busybox.manifest_digest
        )
    })
    .await;
}

#[tokio::test]
async fn remove_image_unknown_succeeds() {
    let Some(env) = test_env() else { return };
    let mut harness = Harness::start(&env).await;

    let removed = harness
        .remove(&format!("{}/testenv/never-pulled:latest", env.open))
        .await;

    assert!(
        removed.is_ok(),
        "RemoveImage of an unknown image should succeed as the CRI requires, got {removed:?}"
    );
}

#[tokio::test]
async fn remove_image_twice_succeeds() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;
    harness
        .remove(&busybox.reference)
        .await
        .expect("the first RemoveImage should succeed");

    let removed = harness.remove(&busybox.reference).await;

    assert!(
        removed.is_ok(),
        "a second RemoveImage should succeed, got {removed:?}"
    );
}

#[tokio::test]
async fn image_fs_info_grows_after_pull() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = Harness::start(&env).await;
    let before = harness.image_fs_used_bytes().await;

    harness.pull_ok(&busybox.reference).await;

    let after = harness.image_fs_used_bytes().await;
    assert!(
        after > before,
        "ImageFsInfo used bytes should grow after a pull: before {before}, after {after}"
    );
}

// ---------------------------------------------------------------------------
// Short names and mirrors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pull_short_name_uses_docker_io_mirror() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    // The endpoint is a closed loopback port, so a failing mirror can never
    // send the test to the real Docker Hub.
    let options = daemon_options(&env).extra_config(&format!(
        "[image.registries.\"docker.io\"]\nmirrors = [\"http://{}\"]\nendpoint = \"http://{}\"",
        env.open,
        closed_loopback_port()
    ));
    let mut harness = Harness::start_with(options).await;

    let image_ref = harness.pull_ok("testenv/busybox").await;

    assert_eq!(
        image_ref, busybox.config_digest,
        "testenv/busybox through the mirror should be the busybox fixture"
    );
    let listed = harness.list(None).await;
    assert!(
        listed.iter().any(|image| image
            .repo_tags
            .iter()
            .any(|tag| tag == "docker.io/testenv/busybox:latest")),
        "the image should be listed as docker.io/testenv/busybox:latest, got {listed:?}"
    );
}

#[tokio::test]
async fn pull_short_name_uses_docker_io_endpoint() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let options = daemon_options(&env).extra_config(&format!(
        "[image.registries.\"docker.io\"]\nendpoint = \"http://{}\"",
        env.open
    ));
    let mut harness = Harness::start_with(options).await;

    let image_ref = harness.pull_ok("testenv/busybox:latest").await;

    assert_eq!(
        image_ref, busybox.config_digest,
        "testenv/busybox through the docker.io endpoint should be the busybox fixture"
    );
}

/// Returns a loopback `host:port` that was just free: nothing listens there.
fn closed_loopback_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a loopback port")
        .to_string()
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pull_unknown_repository_is_not_found() {
    let Some(env) = test_env() else { return };
    let mut harness = Harness::start(&env).await;
    let reference = format!("{}/testenv/does-not-exist:latest", env.open);

    let status = harness.pull_fails_with(&reference, Code::NotFound).await;
    assert!(
        status.message().contains("testenv/does-not-exist"),
        "the message should name the reference, got {:?}",
        status.message()
    );
}

#[tokio::test]
async fn pull_unknown_tag_is_not_found() {
    let Some(env) = test_env() else { return };
    let mut harness = Harness::start(&env).await;
    let reference = format!("{}/testenv/busybox:no-such-tag", env.open);

    let status = harness.pull_fails_with(&reference, Code::NotFound).await;
    assert!(
        status.message().contains("no-such-tag"),
        "the message should name the tag, got {:?}",
        status.message()
    );
}

#[tokio::test]
async fn pull_malformed_reference_is_invalid() {
    let Some(env) = test_env() else { return };
    let mut harness = Harness::start(&env).await;
    // The loopback registry prefix keeps a parser bug from sending a
    // request to Docker Hub.
    for reference in [
        format!("{}/Bad//Name", env.open),
        format!("{}/testenv/busybox:tag with space", env.open),
    ] {
        let status = harness
            .pull(&reference)
            .await
            .expect_err("the pull should fail");

        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{reference:?} should be rejected with InvalidArgument, got {status:?}"
        );
    }
}

#[tokio::test]
async fn pull_unreachable_registry_is_unavailable() {
    let Some(env) = test_env() else { return };
    let registry = closed_loopback_port();
    let mut harness =
        Harness::start_with(daemon_options(&env).plain_http_registry(registry.clone())).await;

    let status = harness
        .pull_fails_with(
            &format!("{registry}/testenv/busybox:latest"),
            Code::Unavailable,
        )
        .await;
    assert!(
        status.message().contains(&registry),
        "the message should name the registry {registry}, got {:?}",
        status.message()
    );
}

/// Pulls fixture `name` with `auth` and expects Unauthenticated.
async fn assert_unauthenticated(name: &str, auth: Option<AuthConfig>) {
    let Some(env) = test_env() else { return };
    let reference = fixture(&env, name).reference.clone();
    let mut harness = Harness::start(&env).await;

    let status = pull_image(&mut harness.images, &reference, auth)
        .await
        .expect_err("the pull should fail");

    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "pulling {reference} should fail with Unauthenticated, got {status:?}"
    );
    let listed = harness.list(None).await;
    assert!(
        listed.is_empty(),
        "a rejected pull should store no image, got {listed:?}"
    );
}

/// Pulls fixture `name` with `auth` and expects the image.
async fn assert_authenticated(name: &str, auth: impl Fn(&TestEnv) -> AuthConfig) {
    let Some(env) = test_env() else { return };
    let private = fixture(&env, name);
    let mut harness = Harness::start(&env).await;

    let image_ref = harness
        .pull_with_auth(&private.reference, auth(&env))
        .await
        .unwrap_or_else(|status| {
            panic!(
                "pulling {} with the right credentials should succeed: {status:?}",
                private.reference
            )
        });

    assert_eq!(
        image_ref, private.config_digest,
        "pulling {} should return its image ID",
        private.reference
    );
}

#[tokio::test]
async fn pull_basic_wrong_password_is_unauthenticated() {
    assert_unauthenticated(
        "basic-private",
        Some(basic_auth("hatoba", "wrong-password")),
    )
    .await;
}

#[tokio::test]
async fn pull_basic_anonymous_is_unauthenticated() {
    assert_unauthenticated("basic-private", None).await;
}

#[tokio::test]
async fn pull_basic_with_credentials_succeeds() {
    assert_authenticated("basic-private", |env| {
        basic_auth(&env.basic_user, &env.basic_password)
    })
    .await;
}

#[tokio::test]
async fn pull_basic_with_auth_field_succeeds() {
    assert_authenticated("basic-private", |env| AuthConfig {
        auth: base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", env.basic_user, env.basic_password)),
        ..AuthConfig::default()
    })
    .await;
}

#[tokio::test]
async fn pull_token_wrong_password_is_unauthenticated() {
    assert_unauthenticated(
        "token-private",
        Some(basic_auth("hatoba", "wrong-password")),
    )
    .await;
}

#[tokio::test]
async fn pull_token_anonymous_is_unauthenticated() {
    assert_unauthenticated("token-private", None).await;
}

#[tokio::test]
async fn pull_token_with_credentials_succeeds() {
    assert_authenticated("token-private", |env| {
        basic_auth(&env.token_user, &env.token_password)
    })
    .await;
}

// ---------------------------------------------------------------------------
// Malicious and corrupt content
// ---------------------------------------------------------------------------

/// Returns whether `message` contains `word` as a whole word.
fn names_word(message: &str, word: &str) -> bool {
    message
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
        .any(|token| token == word)
}

/// Returns the link count of `path`, 0 if it does not exist.
fn link_count(path: &str) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| m.nlink())
        .unwrap_or(0)
}

/// Pulls the evil fixture `name` and checks that the pull fails naming
/// `entry`, that nothing escaped the store and that nothing was kept.
async fn assert_evil_fixture_is_rejected(name: &str, entry: &str) {
    let Some(env) = test_env() else { return };
    let evil = fixture(&env, name);
    let mut harness = Harness::start(&env).await;
    let hostname_links = link_count("/etc/hostname");

    let status = harness
        .pull(&evil.reference)
        .await
        .expect_err("the pull should fail");

    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument | Code::FailedPrecondition
        ),
        "{name} should fail with InvalidArgument or FailedPrecondition, got {status:?}"
    );
    assert!(
        names_word(status.message(), entry),
        "the message should name the entry {entry}, got {:?}",
        status.message()
    );
    let escaped = paths_named_below(harness.daemon.dir(), "escaped-");
    assert!(
        escaped.is_empty(),
        "no escaped-* file should exist in the daemon's directory, found {escaped:?}"
    );
    for dir in ["/", "/tmp", "/etc"] {
        let escaped: Vec<_> = entries(Path::new(dir))
            .into_iter()
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with("escaped-"))
            })
            .collect();
        assert!(
            escaped.is_empty(),
            "no escaped-* file should exist in {dir}, found {escaped:?}"
        );
    }
    assert_eq!(
        link_count("/etc/hostname"),
        hostname_links,
        "the link count of /etc/hostname should not change"
    );
    let listed = harness.list(None).await;
    assert!(
        listed.is_empty(),
        "no image should be listed after {name}, got {listed:?}"
    );
    let store = harness.store();
    let evil_chain = chain_ids(&evil.layers)
        .pop()
        .expect("the fixture has layers");
    let snapshot = snapshot_dir(&store, &evil_chain);
    assert!(
        !snapshot.exists(),
        "no snapshot should exist for the evil layer at {}",
        snapshot.display()
    );
    let leftovers = paths_named_below(&store.join("snapshots"), "tmp-");
    assert!(
        leftovers.is_empty(),
        "no temporary snapshot should be left, found {leftovers:?}"
    );
}

#[tokio::test]
async fn pull_rejects_dot_dot_entry() {
    assert_evil_fixture_is_rejected("evil-dotdot", "escaped-dotdot").await;
}

#[tokio::test]
async fn pull_rejects_absolute_entry() {
    assert_evil_fixture_is_rejected("evil-absolute", "escaped-absolute").await;
}

#[tokio::test]
async fn pull_rejects_entry_below_symlink() {
    assert_evil_fixture_is_rejected("evil-symlink", "escaped-symlink").await;
}

#[tokio::test]
async fn pull_rejects_escaping_hard_link() {
    assert_evil_fixture_is_rejected("evil-hardlink", "hl").await;
}

#[tokio::test]
async fn pull_corrupt_blob_stores_nothing() {
    let Some(env) = test_env() else { return };
    let corrupt = fixture(&env, "corrupt");
    let mut harness = Harness::start(&env).await;

    let status = harness
        .pull(&corrupt.reference)
        .await
        .expect_err("the pull should fail");

    assert!(
        matches!(status.code(), Code::DataLoss | Code::FailedPrecondition),
        "a corrupt blob should fail with DataLoss or FailedPrecondition, got {status:?}"
    );
    let named = corrupt
        .layers
        .iter()
        .find(|layer| status.message().contains(hex_of(&layer.digest)));
    let Some(named) = named else {
        panic!(
            "the message should name the corrupt layer digest, got {:?}",
            status.message()
        );
    };
    let blob = blob_path(&harness.store(), &named.digest);
    assert!(
        !blob.exists(),
        "no blob should be stored as {}",
        blob.display()
    );
    let ingest = entries(&harness.store().join("ingest"));
    assert!(
        ingest.is_empty(),
        "no ingest file should be left, found {ingest:?}"
    );
    let listed = harness.list(None).await;
    assert!(
        listed.is_empty(),
        "no image should be listed, got {listed:?}"
    );
}

// ---------------------------------------------------------------------------
// Concurrency, garbage collection, crashes and restarts
// ---------------------------------------------------------------------------

#[tokio::test]
async fn pull_concurrent_fetches_each_blob_once() {
    let Some(env) = test_env() else { return };
    let shared = fixture(&env, "shared");
    let proxy = Proxy::start(&env.open).expect("the proxy should start");
    let reference = proxied_reference(&env, &proxy, "shared");
    let harness = Harness::start_with(daemon_options(&env).plain_http_registry(proxy.host())).await;

    // Holding the blobs until all four pulls asked for the manifest makes
    // the pulls overlap instead of running one after another.
    proxy.pause_blobs();
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let mut images = harness.images.clone();
            let reference = reference.clone();
            tokio::spawn(async move { pull_image(&mut images, &reference, None).await })
        })
        .collect();
    let manifest_requests = |proxy: &Proxy| {
        proxy
            .requests()
            .iter()
            .filter(|request| request.path.contains("/manifests/"))
            .map(|request| request.count)
            .sum::<usize>()
    };
    proxy
        .wait_until(Duration::from_secs(60), |proxy| {
            manifest_requests(proxy) >= 4 && proxy.held_requests() >= 1
        })
        .await;
    proxy.release_blobs();

    for pull in pulls {
        let image_ref = pull
            .await
            .expect("the pull task should not panic")
            .unwrap_or_else(|status| panic!("every concurrent pull should succeed: {status:?}"));
        assert_eq!(
            image_ref, shared.config_digest,
            "every concurrent pull should return the image ID"
        );
    }
    let mut digests = vec![shared.config_digest.clone()];
    digests.extend(shared.layers.iter().map(|layer| layer.digest.clone()));
    for digest in digests {
        let path = format!("/v2/{}/blobs/{digest}", shared.repository());
        assert_eq!(
            proxy.count("GET", &path),
            1,
            "blob {digest} should be fetched exactly once, requests: {:?}",
            proxy.requests()
        );
    }
    for request in proxy.requests() {
        if request.method == "GET" && request.path.contains("/blobs/") {
            assert_eq!(request.count, 1, "GET {} should happen once", request.path);
        }
    }
}

#[tokio::test]
async fn remove_image_keeps_shared_layers() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let shared = fixture(&env, "shared");
    assert_eq!(
        shared.layers[0].digest, busybox.layers[0].digest,
        "precondition: shared and busybox should share their base layer"
    );
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;
    harness.pull_ok(&shared.reference).await;
    let store = harness.store();
    let shared_chain = chain_ids(&shared.layers);
    let shared_top = shared.layers.last().expect("shared has layers");

    harness
        .remove(&shared.reference)
        .await
        .expect("RemoveImage shared should succeed");

    let base_snapshot = snapshot_dir(&store, &shared_chain[0]);
    assert!(
        base_snapshot.is_dir(),
        "the shared base snapshot should remain"
    );
    let base_blob = blob_path(&store, &busybox.layers[0].digest);
    assert!(base_blob.is_file(), "the shared base blob should remain");
    let top_snapshot = snapshot_dir(&store, &shared_chain[shared_chain.len() - 1]);
    assert!(
        !top_snapshot.exists(),
        "the snapshot only shared used should be freed"
    );
    let top_blob = blob_path(&store, &shared_top.digest);
    assert!(
        !top_blob.exists(),
        "the blob used only by shared should be freed"
    );
    let status = harness.status(&busybox.reference, false).await;
    assert!(status.image.is_some(), "busybox should still be there");

    harness
        .remove(&busybox.reference)
        .await
        .expect("RemoveImage busybox should succeed");

    let blobs = files_below(&store.join("blobs"));
    assert!(blobs.is_empty(), "no blob should remain, found {blobs:?}");
    let snapshots = entries(&store.join("snapshots"));
    assert!(
        snapshots.is_empty(),
        "no snapshot should remain, found {snapshots:?}"
    );
}

#[tokio::test]
async fn pull_killed_midway_leaves_nothing() {
    let Some(env) = test_env() else { return };
    let big = fixture(&env, "big");
    let big_layer = big
        .layers
        .iter()
        .max_by_key(|layer| layer.size)
        .expect("big has layers")
        .clone();
    let proxy = Proxy::start(&env.open).expect("the proxy should start");
    proxy.set_throttle(Some(512 * 1024));
    let reference = proxied_reference(&env, &proxy, "big");
    let mut harness =
        Harness::start_with(daemon_options(&env).plain_http_registry(proxy.host())).await;

    let mut images = harness.images.clone();
    let pull_reference = reference.clone();
    let pull = tokio::spawn(async move { pull_image(&mut images, &pull_reference, None).await });
    let midway = proxy
        .wait_until(Duration::from_secs(120), |proxy| {
            proxy.blob_bytes_sent(&big_layer.digest) >= 1024 * 1024
        })
        .await;
    assert!(midway, "the proxy should have sent part of the big layer");
    harness
        .daemon
        .kill()
        .expect("SIGKILL should stop the daemon");
    let interrupted = pull.await.expect("the pull task should not panic");
    assert!(
        interrupted.is_err(),
        "the killed pull should fail, got {interrupted:?}"
    );

    proxy.set_throttle(None);
    harness
        .daemon
        .restart()
        .await
        .expect("the daemon should start again after SIGKILL");
    harness.reconnect().await;

    let listed = harness.list(None).await;
    assert!(
        !has_image(&listed, &big.config_digest),
        "big should not be listed, got {listed:?}"
    );
    let ingest = entries(&harness.store().join("ingest"));
    assert!(
        ingest.is_empty(),
        "no ingest file should be left, found {ingest:?}"
    );
    let blob = blob_path(&harness.store(), &big_layer.digest);
    assert!(!blob.exists(), "the half-fetched blob should not be stored");

    let image_ref = harness.pull_ok(&reference).await;
    assert_eq!(
        image_ref, big.config_digest,
        "a new pull after the restart should return the image ID"
    );
}

#[tokio::test]
async fn restart_keeps_pulled_images() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = pull_fixture(&env, "busybox").await;

    harness
        .daemon
        .restart()
        .await
        .expect("the daemon should restart");
    harness.reconnect().await;

    let listed = harness.list(None).await;
    assert!(
        has_image(&listed, &busybox.config_digest),
        "busybox should be listed after a restart, got {listed:?}"
    );
}
