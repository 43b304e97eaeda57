//! Images made by other tools, pulled through hatoba's CRI socket. umoci
//! builds an OCI layout with a whiteout. skopeo converts fixtures to Docker
//! schema 2 and to zstd layers, and writes OCI and `docker save` archives for
//! `hatoba image load`. buildah builds an image from scratch. The last
//! section pins what crictl users see from containerd 1.6.20, compared by
//! hand with crictl 1.26.1.
//!
//! Images go to the open testenv registry under `interop/`, with repository
//! names unique to the run (pid and time), so reruns never collide. The
//! tests need root and `hatoba-testenv up`, like the other integration
//! tests, and the tools: a missing tool prints `skipped:` and fails the test
//! under `CI=true`.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{HATOBA, Harness, fixture, hex_of, paths_named_below, snapshot_dir, test_env};
use serde_json::Value;

const OCI_GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

// ---------------------------------------------------------------------------
// Tools, scratch directories and names
// ---------------------------------------------------------------------------

/// Returns whether every tool in `tools` (binary, Debian package) is on
/// PATH. Prints `skipped:` for the first missing one, or fails under
/// `CI=true`, where scripts/install-deps has installed them.
fn tools_present(tools: &[(&str, &str)]) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    for (binary, package) in tools {
        if find_on_path(binary).is_none() {
            let reason = format!(
                "{test} needs {binary}, which is not on PATH (apt-get install {package}, or scripts/install-deps)"
            );
            if std::env::var("CI").is_ok_and(|value| value == "true") {
                panic!("CI=true requires the tools: {reason}");
            }
            eprintln!("skipped: {reason}");
            return false;
        }
    }
    true
}

fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// Returns a name part unique to this run and this call: pid, time and a
/// counter, so parallel tests and reruns push to different repositories.
fn unique() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{count}", std::process::id())
}

/// A directory for one test's tool files. Dropping it removes the
/// directory with everything the tools wrote into it.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("hatoba-interop-{label}-{}", unique()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        // An empty registries.conf keeps skopeo and buildah from expanding
        // short names to registries on the internet.
        std::fs::write(
            path.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap_or_else(|error| panic!("cannot write registries.conf: {error}"));
        // An empty auth file of their own keeps the tools away from root's.
        std::fs::write(path.join("auth.json"), "{\"auths\": {}}\n")
            .unwrap_or_else(|error| panic!("cannot write auth.json: {error}"));
        Self { path }
    }

    fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Runs `program` with `args` in this directory and returns its stdout,
    /// failing the test with the command and its stderr when it fails.
    ///
    /// Every address except loopback goes to a closed loopback proxy port,
    /// so no tool can reach beyond this machine.
    fn run<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|arg| arg.as_ref().to_owned())
            .collect();
        let closed_proxy = "http://127.0.0.1:9";
        let output = Command::new(program)
            .args(&args)
            .current_dir(&self.path)
            .env("CONTAINERS_REGISTRIES_CONF", self.join("registries.conf"))
            .env("REGISTRY_AUTH_FILE", self.join("auth.json"))
            .env("HTTP_PROXY", closed_proxy)
            .env("HTTPS_PROXY", closed_proxy)
            .env("http_proxy", closed_proxy)
            .env("https_proxy", closed_proxy)
            .env("NO_PROXY", "127.0.0.1,localhost,::1")
            .env("no_proxy", "127.0.0.1,localhost,::1")
            .output()
            .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
        assert!(
            output.status.success(),
            "{program} {args:?} should succeed, got {}; stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("cannot remove {}: {error}", self.path.display());
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}

// ---------------------------------------------------------------------------
// Reading OCI layouts and hatoba's view of an image
// ---------------------------------------------------------------------------

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    serde_json::from_slice(&text)
        .unwrap_or_else(|error| panic!("{} is not JSON: {error}", path.display()))
}

/// The manifest of one tag of an OCI image layout.
struct LayoutImage {
    manifest_digest: String,
    manifest: Value,
}

impl LayoutImage {
    /// Reads the manifest that `tag` names in the layout at `layout`.
    fn read(layout: &Path, tag: &str) -> Self {
        let index = read_json(&layout.join("index.json"));
        let descriptor = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|descriptor| descriptor["annotations"][OCI_REF_NAME] == tag)
            .unwrap_or_else(|| panic!("{} has no manifest tagged {tag}", layout.display()));
        let manifest_digest = descriptor["digest"]
            .as_str()
            .expect("a descriptor has a digest")
            .to_owned();
        let manifest = read_json(&layout.join("blobs/sha256").join(hex_of(&manifest_digest)));
        Self {
            manifest_digest,
            manifest,
        }
    }

    fn config_digest(&self) -> String {
        self.manifest["config"]["digest"]
            .as_str()
            .expect("a manifest has a config digest")
            .to_owned()
    }

    fn layer_media_types(&self) -> Vec<String> {
        media_types(&self.manifest["layers"])
    }
}

fn media_types(layers: &Value) -> Vec<String> {
    layers
        .as_array()
        .into_iter()
        .flatten()
        .map(|layer| layer["mediaType"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Returns the parsed `info` of a verbose ImageStatus for `name`.
async fn verbose_info(harness: &mut Harness, name: &str) -> Value {
    let status = harness.status(name, true).await;
    assert!(status.image.is_some(), "ImageStatus should find {name}");
    let info = status
        .info
        .get("info")
        .unwrap_or_else(|| panic!("verbose ImageStatus of {name} should carry info"));
    serde_json::from_str(info)
        .unwrap_or_else(|error| panic!("the info of {name} is not JSON: {error}: {info}"))
}

/// Returns the snapshot directories of an image, lowest layer first, from
/// the chain IDs in its verbose ImageStatus.
fn snapshots(harness: &Harness, info: &Value) -> Vec<PathBuf> {
    let store = harness.store();
    info["chainIDs"]
        .as_array()
        .expect("verbose info should list chainIDs")
        .iter()
        .map(|chain_id| snapshot_dir(&store, chain_id.as_str().expect("a chain ID is a string")))
        .collect()
}

fn config_cmd(info: &Value) -> &Value {
    &info["imageSpec"]["config"]["Cmd"]
}

/// Fails unless `path` is an overlay whiteout: a 0:0 character device.
fn assert_whiteout(path: &Path) {
    let metadata = std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("whiteout {} should exist: {error}", path.display()));
    assert!(
        metadata.file_type().is_char_device(),
        "{} should be a character device (an overlay whiteout)",
        path.display()
    );
    assert_eq!(
        metadata.rdev(),
        0,
        "the whiteout {} should have device number 0:0",
        path.display()
    );
}

/// Fails if any `.wh.` file was stored as a file instead of being turned
/// into an overlay whiteout.
fn assert_no_whiteout_files(harness: &Harness) {
    let left = paths_named_below(&harness.store().join("snapshots"), ".wh.");
    assert!(
        left.is_empty(),
        "whiteout entries should become overlay whiteouts, found {left:?}"
    );
}

fn assert_same_size_as_host_busybox(snapshot: &Path) {
    let copied = std::fs::metadata(snapshot.join("bin/busybox"))
        .unwrap_or_else(|error| panic!("bin/busybox should be in {}: {error}", snapshot.display()));
    let host = std::fs::metadata("/bin/busybox").expect("busybox-static provides /bin/busybox");
    assert_eq!(
        copied.len(),
        host.len(),
        "bin/busybox in {} should be the host's /bin/busybox",
        snapshot.display()
    );
}

// ---------------------------------------------------------------------------
// umoci
// ---------------------------------------------------------------------------

#[tokio::test]
async fn umoci_image_keeps_whiteout_and_cmd() {
    let Some(env) = test_env() else { return };
    if !tools_present(&[("umoci", "umoci"), ("skopeo", "skopeo")]) {
        return;
    }
    let scratch = Scratch::new("umoci");
    let layout = format!("{}:v1", path_str(&scratch.join("layout")));

    // Layer 1: busybox and two data files.
    scratch.run(
        "umoci",
        ["init", "--layout", path_str(&scratch.join("layout"))],
    );
    scratch.run("umoci", ["new", "--image", &layout]);
    scratch.run("umoci", ["unpack", "--image", &layout, "first"]);
    let rootfs = scratch.join("first/rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("create bin");
    std::fs::create_dir_all(rootfs.join("data")).expect("create data");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).expect("link sh");
    std::fs::write(rootfs.join("data/keep"), "keep\n").expect("write keep");
    std::fs::write(rootfs.join("data/remove-me"), "gone\n").expect("write remove-me");
    scratch.run("umoci", ["repack", "--image", &layout, "first"]);

    // Layer 2: a deleted file, which umoci writes as data/.wh.remove-me.
    scratch.run("umoci", ["unpack", "--image", &layout, "second"]);
    let rootfs = scratch.join("second/rootfs");
    std::fs::remove_file(rootfs.join("data/remove-me")).expect("delete remove-me");
    std::fs::write(rootfs.join("data/added"), "added\n").expect("write added");
    scratch.run("umoci", ["repack", "--image", &layout, "second"]);
    scratch.run(
        "umoci",
        [
            "config",
            "--image",
            &layout,
            "--config.cmd",
            "sh",
            "--config.cmd",
            "-c",
            "--config.cmd",
            "echo interop",
        ],
    );

    let built = LayoutImage::read(&scratch.join("layout"), "v1");
    assert_eq!(
        built.layer_media_types(),
        [OCI_GZIP_LAYER, OCI_GZIP_LAYER],
        "precondition: umoci should have written two gzip layers"
    );
    let repository = format!("{}/interop/umoci-{}", env.open, unique());
    let reference = format!("{repository}:v1");
    scratch.run(
        "skopeo",
        [
            "copy".to_owned(),
            "--dest-tls-verify=false".to_owned(),
            format!("oci:{layout}"),
            format!("docker://{reference}"),
        ],
    );
    let mut harness = Harness::start(&env).await;

    let image_ref = harness.pull_ok(&reference).await;

    assert_eq!(
        image_ref,
        built.config_digest(),
        "the image ID should be umoci's config digest"
    );
    let image = harness
        .status(&reference, false)
        .await
        .image
        .expect("ImageStatus should find the umoci image");
    let pinned = format!("{repository}@{}", built.manifest_digest);
    assert!(
        image.repo_digests.contains(&pinned),
        "repo_digests should contain {pinned}, got {:?}",
        image.repo_digests
    );
    let info = verbose_info(&mut harness, &reference).await;
    assert_eq!(
        config_cmd(&info),
        &serde_json::json!(["sh", "-c", "echo interop"]),
        "the config Cmd set by umoci config should be in the verbose info"
    );
    let layers = snapshots(&harness, &info);
    assert_eq!(layers.len(), 2, "two layers, two snapshots");
    assert_same_size_as_host_busybox(&layers[0]);
    assert_eq!(
        std::fs::read_to_string(layers[0].join("data/keep")).expect("data/keep"),
        "keep\n"
    );
    assert!(
        layers[0].join("data/remove-me").is_file(),
        "the first layer still has data/remove-me"
    );
    assert_whiteout(&layers[1].join("data/remove-me"));
    assert!(
        layers[1].join("data/added").is_file(),
        "the second layer should add data/added"
    );
    assert_no_whiteout_files(&harness);
}

// ---------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------

#[tokio::test]
async fn skopeo_docker_schema2_conversion_pulls() {
    let Some(env) = test_env() else { return };
    if !tools_present(&[("skopeo", "skopeo")]) {
        return;
    }
    let busybox = fixture(&env, "busybox");
    let scratch = Scratch::new("v2s2");
    let reference = format!("{}/interop/skopeo-v2s2-{}:latest", env.open, unique());
    scratch.run(
        "skopeo",
        [
            "copy".to_owned(),
            "--src-tls-verify=false".to_owned(),
            "--dest-tls-verify=false".to_owned(),
            "--format".to_owned(),
            "v2s2".to_owned(),
            format!("docker://{}", busybox.reference),
            format!("docker://{reference}"),
        ],
    );
    let mut harness = Harness::start(&env).await;

    let image_ref = harness.pull_ok(&reference).await;

    assert_eq!(
        image_ref, busybox.config_digest,
        "converting the manifest keeps the config, so the image ID stays busybox's"
    );
    let info = verbose_info(&mut harness, &reference).await;
    assert_eq!(
        media_types(&info["layers"]),
        [DOCKER_GZIP_LAYER],
        "the pulled manifest should be skopeo's Docker schema 2 conversion"
    );
    assert_ne!(
        info["manifestDigest"], busybox.manifest_digest,
        "the Docker manifest should not be the fixture's OCI manifest"
    );
    let layers = snapshots(&harness, &info);
    assert_same_size_as_host_busybox(&layers[0]);
}

#[tokio::test]
async fn skopeo_zstd_recompression_pulls_with_whiteouts() {
    let Some(env) = test_env() else { return };
    if !tools_present(&[("skopeo", "skopeo")]) {
        return;
    }
    let multilayer = fixture(&env, "multilayer");
    let scratch = Scratch::new("zstd");
    let layout = format!("{}:zstd", path_str(&scratch.join("layout")));
    // Between repositories of one registry skopeo 1.9.3 reuses the gzip
    // blobs instead of recompressing them, so the copy goes through a layout.
    scratch.run(
        "skopeo",
        [
            "copy".to_owned(),
            "--src-tls-verify=false".to_owned(),
            "--dest-compress-format".to_owned(),
            "zstd".to_owned(),
            format!("docker://{}", multilayer.reference),
            format!("oci:{layout}"),
        ],
    );
    let built = LayoutImage::read(&scratch.join("layout"), "zstd");
    assert_eq!(
        built.layer_media_types(),
        [OCI_ZSTD_LAYER; 3],
        "precondition: skopeo should have recompressed every layer with zstd"
    );
    let reference = format!("{}/interop/skopeo-zstd-{}:latest", env.open, unique());
    scratch.run(
        "skopeo",
        [
            "copy".to_owned(),
            "--dest-tls-verify=false".to_owned(),
            format!("oci:{layout}"),
            format!("docker://{reference}"),
        ],
    );
    let mut harness = Harness::start(&env).await;

    let image_ref = harness.pull_ok(&reference).await;

    assert_eq!(
        image_ref, multilayer.config_digest,
        "recompression keeps the diff IDs and the config, so the image ID stays multilayer's"
    );
    let info = verbose_info(&mut harness, &reference).await;
    assert_eq!(media_types(&info["layers"]), [OCI_ZSTD_LAYER; 3]);
    let layers = snapshots(&harness, &info);
    assert_same_size_as_host_busybox(&layers[0]);
    assert_whiteout(&layers[2].join("data/remove-me"));
    assert!(
        layers[2].join("data/dir/new-c").is_file(),
        "the top zstd layer should add data/dir/new-c"
    );
    assert_no_whiteout_files(&harness);
}

// ---------------------------------------------------------------------------
// buildah
// ---------------------------------------------------------------------------

#[tokio::test]
async fn buildah_image_keeps_cmd_and_user() {
    let Some(env) = test_env() else { return };
    if !tools_present(&[("buildah", "buildah")]) {
        return;
    }
    let scratch = Scratch::new("buildah");
    // With root and runroot in the scratch directory and the vfs driver,
    // buildah mounts nothing and writes nothing to /var/lib/containers.
    let root = scratch.join("root");
    let runroot = scratch.join("runroot");
    let storage = [
        "--root",
        path_str(&root),
        "--runroot",
        path_str(&runroot),
        "--storage-driver",
        "vfs",
    ];
    let buildah = |args: &[&str]| scratch.run("buildah", storage.iter().chain(args));
    let name = format!("interop-buildah-{}", unique());

    let container = buildah(&["from", "--name", &name, "scratch"]);
    let container = container.trim();
    buildah(&["copy", container, "/bin/busybox", "/bin/busybox"]);
    buildah(&[
        "config",
        "--cmd",
        r#"["/bin/busybox", "echo", "buildah"]"#,
        "--user",
        "1000:1000",
        container,
    ]);
    let local = format!("localhost/interop/buildah-{}:latest", unique());
    buildah(&["commit", container, &local]);
    let reference = format!("{}/interop/buildah-{}:latest", env.open, unique());
    buildah(&[
        "push",
        "--tls-verify=false",
        &local,
        &format!("docker://{reference}"),
    ]);
    buildah(&["rm", container]);
    let mut harness = Harness::start(&env).await;

    harness.pull_ok(&reference).await;

    let image = harness
        .status(&reference, false)
        .await
        .image
        .expect("ImageStatus should find the buildah image");
    assert_eq!(
        image.uid.map(|uid| uid.value),
        Some(1000),
        "buildah config --user 1000:1000 should give uid 1000"
    );
    let info = verbose_info(&mut harness, &reference).await;
    assert_eq!(
        config_cmd(&info),
        &serde_json::json!(["/bin/busybox", "echo", "buildah"]),
        "the Cmd set by buildah config should be in the verbose info"
    );
    let layers = snapshots(&harness, &info);
    assert_same_size_as_host_busybox(&layers[0]);
}

// ---------------------------------------------------------------------------
// Archives written by skopeo, loaded with `hatoba image load`
// ---------------------------------------------------------------------------

/// Writes fixture multilayer to an archive with skopeo (`transport` is
/// `oci-archive` or `docker-archive`), loads it with `hatoba image load`
/// and checks the image and its whiteouts.
async fn assert_skopeo_archive_loads(transport: &str) {
    let Some(env) = test_env() else { return };
    if !tools_present(&[("skopeo", "skopeo")]) {
        return;
    }
    let multilayer = fixture(&env, "multilayer");
    let scratch = Scratch::new(transport);
    let archive = scratch.join("image.tar");
    let name = format!("{}/interop/loaded-{transport}-{}:v1", env.open, unique());
    scratch.run(
        "skopeo",
        [
            "copy".to_owned(),
            "--src-tls-verify=false".to_owned(),
            format!("docker://{}", multilayer.reference),
            format!("{transport}:{}:{name}", path_str(&archive)),
        ],
    );
    let mut harness = Harness::start(&env).await;

    let output = Command::new(HATOBA)
        .arg("--socket")
        .arg(harness.daemon.socket())
        .args(["image", "load", "-i"])
        .arg(&archive)
        .output()
        .expect("hatoba should run");

    assert!(
        output.status.success(),
        "hatoba image load of skopeo's {transport} should succeed; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&name),
        "hatoba image load should print {name}, got:\n{stdout}"
    );
    let image = harness
        .status(&name, false)
        .await
        .image
        .unwrap_or_else(|| panic!("the loaded image should be found as {name}"));
    assert_eq!(
        image.id, multilayer.config_digest,
        "the loaded image should be multilayer"
    );
    let info = verbose_info(&mut harness, &name).await;
    let layers = snapshots(&harness, &info);
    assert_eq!(layers.len(), 3, "three layers, three snapshots");
    assert_whiteout(&layers[2].join("data/remove-me"));
    assert_no_whiteout_files(&harness);
}

#[tokio::test]
async fn skopeo_oci_archive_loads() {
    assert_skopeo_archive_loads("oci-archive").await;
}

#[tokio::test]
async fn skopeo_docker_archive_loads() {
    assert_skopeo_archive_loads("docker-archive").await;
}

// ---------------------------------------------------------------------------
// What crictl users know from containerd 1.6
// ---------------------------------------------------------------------------

#[tokio::test]
async fn repo_tags_are_sorted_like_containerd() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let Some(alias) = busybox.aliases.first() else {
        panic!("the busybox fixture should have a second tag (1.35) in env.json");
    };
    let mut harness = Harness::start(&env).await;
    // `latest` first, so the order of pulls is not the sorted order.
    harness.pull_ok(&busybox.reference).await;
    harness.pull_ok(alias).await;

    let listed = harness.list(None).await;

    assert_eq!(listed.len(), 1, "two tags of one image are one image");
    let mut sorted = listed[0].repo_tags.clone();
    sorted.sort();
    assert_eq!(
        listed[0].repo_tags, sorted,
        "repo_tags should be sorted, as containerd lists them"
    );
}

#[tokio::test]
async fn short_sha256_id_finds_and_removes() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;
    // The 13 characters of the IMAGE ID column of `crictl images`, written
    // as a digest.
    let truncated = format!("sha256:{}", &hex_of(&busybox.config_digest)[..13]);

    let image = harness.status(&truncated, false).await.image;

    assert_eq!(
        image.map(|image| image.id),
        Some(busybox.config_digest.clone()),
        "ImageStatus {truncated} should find busybox, as containerd does"
    );
    harness
        .remove(&truncated)
        .await
        .unwrap_or_else(|status| panic!("RemoveImage {truncated} should succeed: {status:?}"));
    let listed = harness.list(None).await;
    assert!(
        listed.is_empty(),
        "RemoveImage {truncated} should remove busybox, left {listed:?}"
    );
}

#[tokio::test]
async fn verbose_info_has_containerd_keys() {
    let Some(env) = test_env() else { return };
    let multilayer = fixture(&env, "multilayer");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&multilayer.reference).await;

    let info = verbose_info(&mut harness, &multilayer.reference).await;

    let top = common::chain_ids(&multilayer.layers)
        .pop()
        .expect("multilayer has layers");
    assert_eq!(
        info["chainID"], top,
        "info.chainID should be the top layer's chain ID, as containerd reports it"
    );
    assert_eq!(
        info["imageSpec"]["config"]["User"], "1000",
        "info.imageSpec should be the image config, as containerd reports it"
    );
}
