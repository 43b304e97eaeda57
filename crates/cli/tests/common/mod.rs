//! Shared setup for the integration tests: the root and test environment
//! gate, a daemon per test with a CRI client, and helpers that read the
//! image store on disk.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hatoba_testenv::daemon::{Daemon, DaemonOptions};
use hatoba_testenv::env::{EnvError, Fixture, Layer, TestEnv};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, Image, ImageFilter, ImageFsInfoRequest, ImageSpec, ImageStatusRequest,
    ImageStatusResponse, ListImagesRequest, PullImageRequest, RemoveImageRequest,
};
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::transport::Channel;

/// Path of the `hatoba` binary that cargo built for these tests.
pub const HATOBA: &str = env!("CARGO_BIN_EXE_hatoba");

/// Bound of one CRI call, so a hung daemon fails its test instead of hanging
/// the suite. The slowest pull, of the 64 MiB fixture, took seconds in a
/// debug build on loopback.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Returns the test environment, or prints `skipped: <reason>` and returns
/// `None` when the test cannot run here: not root, or the test environment
/// is not up. Under CI (`CI=true`) a missing environment fails the test.
pub fn test_env() -> Option<TestEnv> {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: {test} needs root (it runs hatoba daemon and unpacks layers)");
        return None;
    }
    match TestEnv::load() {
        Ok(env) => Some(env),
        Err(error @ EnvError::NotRunning { .. }) => {
            if std::env::var("CI").is_ok_and(|value| value == "true") {
                panic!("CI=true requires the test environment for {test}: {error}");
            }
            eprintln!("skipped: {test}: {error}");
            None
        }
        Err(error) => panic!("cannot read the test environment for {test}: {error}"),
    }
}

/// Returns daemon options with plain HTTP to the three testenv registries.
pub fn daemon_options(env: &TestEnv) -> DaemonOptions {
    DaemonOptions::new(HATOBA)
        .plain_http_registry(env.open.clone())
        .plain_http_registry(env.basic.clone())
        .plain_http_registry(env.token.clone())
}

/// Returns the fixture `name`, failing the test with the known names if
/// env.json lacks it.
pub fn fixture<'a>(env: &'a TestEnv, name: &str) -> &'a Fixture {
    env.fixture(name)
        .unwrap_or_else(|error| panic!("fixture {name} is required: {error}"))
}

/// A daemon of one test and CRI clients connected to it.
pub struct Harness {
    pub daemon: Daemon,
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl Harness {
    /// Starts a daemon for the testenv registries and connects to it.
    pub async fn start(env: &TestEnv) -> Self {
        Self::start_with(daemon_options(env)).await
    }

    /// Starts a daemon with `options` and connects to it.
    pub async fn start_with(options: DaemonOptions) -> Self {
        let daemon = Daemon::start(options)
            .await
            .unwrap_or_else(|error| panic!("hatoba daemon should start: {error}"));
        let (runtime, images) = daemon
            .connect()
            .await
            .unwrap_or_else(|error| panic!("CRI client should connect: {error}"));
        Self {
            daemon,
            runtime,
            images,
        }
    }

    /// Reconnects the clients, after a restart of the daemon.
    pub async fn reconnect(&mut self) {
        let (runtime, images) = self
            .daemon
            .connect()
            .await
            .unwrap_or_else(|error| panic!("CRI client should reconnect: {error}"));
        self.runtime = runtime;
        self.images = images;
    }

    /// Returns `<root>/images`, the image store.
    pub fn store(&self) -> PathBuf {
        self.daemon.root().join("images")
    }

    /// Calls PullImage and returns the image ref of the response.
    pub async fn pull(&mut self, reference: &str) -> Result<String, Status> {
        pull_image(&mut self.images, reference, None).await
    }

    /// Calls PullImage with `auth` and returns the image ref of the response.
    pub async fn pull_with_auth(
        &mut self,
        reference: &str,
        auth: AuthConfig,
    ) -> Result<String, Status> {
        pull_image(&mut self.images, reference, Some(auth)).await
    }

    /// Pulls `reference` and fails the test if the pull fails.
    pub async fn pull_ok(&mut self, reference: &str) -> String {
        self.pull(reference)
            .await
            .unwrap_or_else(|status| panic!("PullImage {reference} should succeed: {status:?}"))
    }

    /// Pulls `reference`, fails the test unless the pull fails with `code`,
    /// and returns the status.
    pub async fn pull_fails_with(&mut self, reference: &str, code: tonic::Code) -> Status {
        let status = self
            .pull(reference)
            .await
            .expect_err("the pull should fail");
        assert_eq!(
            status.code(),
            code,
            "pulling {reference} should fail with {code:?}, got {status:?}"
        );
        status
    }

    /// Calls ListImages, with a filter on `filter` when given.
    pub async fn list(&mut self, filter: Option<&str>) -> Vec<Image> {
        let request = ListImagesRequest {
            filter: filter.map(|name| ImageFilter {
                image: Some(image_spec(name)),
            }),
        };
        within("ListImages", self.images.list_images(request))
            .await
            .unwrap_or_else(|status| panic!("ListImages should succeed: {status:?}"))
            .into_inner()
            .images
    }

    /// Calls ImageStatus for `name`.
    pub async fn status(&mut self, name: &str, verbose: bool) -> ImageStatusResponse {
        let request = ImageStatusRequest {
            image: Some(image_spec(name)),
            verbose,
        };
        within("ImageStatus", self.images.image_status(request))
            .await
            .unwrap_or_else(|status| panic!("ImageStatus {name} should succeed: {status:?}"))
            .into_inner()
    }

    /// Calls RemoveImage for `name`.
    pub async fn remove(&mut self, name: &str) -> Result<(), Status> {
        let request = RemoveImageRequest {
            image: Some(image_spec(name)),
        };
        within("RemoveImage", self.images.remove_image(request))
            .await
            .map(|_| ())
    }

    /// Calls ImageFsInfo and returns the used bytes of the first image
    /// filesystem.
    pub async fn image_fs_used_bytes(&mut self) -> u64 {
        let response = within(
            "ImageFsInfo",
            self.images.image_fs_info(ImageFsInfoRequest {}),
        )
        .await
        .unwrap_or_else(|status| panic!("ImageFsInfo should succeed: {status:?}"))
        .into_inner();
        let filesystem = response
            .image_filesystems
            .first()
            .unwrap_or_else(|| panic!("ImageFsInfo should report an image filesystem"));
        filesystem
            .used_bytes
            .as_ref()
            .unwrap_or_else(|| panic!("ImageFsInfo should report used bytes"))
            .value
    }
}

/// Calls PullImage on `images` and returns the image ref of the response.
pub async fn pull_image(
    images: &mut ImageServiceClient<Channel>,
    reference: &str,
    auth: Option<AuthConfig>,
) -> Result<String, Status> {
    let request = PullImageRequest {
        image: Some(image_spec(reference)),
        auth,
        sandbox_config: None,
    };
    within("PullImage", images.pull_image(request))
        .await
        .map(|response| response.into_inner().image_ref)
}

/// Builds the CRI image spec for `image`.
pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
        ..ImageSpec::default()
    }
}

/// Builds a CRI AuthConfig with a username and password.
pub fn basic_auth(username: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: username.to_owned(),
        password: password.to_owned(),
        ..AuthConfig::default()
    }
}

/// Awaits a CRI call, failing the test if it does not finish within
/// [`CALL_TIMEOUT`].
pub async fn within<T>(call: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{call} did not finish within {CALL_TIMEOUT:?}"))
}

/// Computes the chain IDs of `layers` as the OCI image spec defines them:
/// the first is the first diff ID, each next one is
/// `sha256(previous + " " + diff ID)`.
pub fn chain_ids(layers: &[Layer]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(layers.len());
    for layer in layers {
        let next = match chain.last() {
            None => layer.diff_id.clone(),
            Some(previous) => format!(
                "sha256:{:x}",
                Sha256::digest(format!("{previous} {}", layer.diff_id).as_bytes())
            ),
        };
        chain.push(next);
    }
    chain
}

/// Returns the hex part of a `sha256:<hex>` digest.
pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Returns the snapshot directory of a chain ID in the store at `store`.
pub fn snapshot_dir(store: &Path, chain_id: &str) -> PathBuf {
    store.join("snapshots").join(hex_of(chain_id))
}

/// Returns the path of a blob in the store at `store`.
pub fn blob_path(store: &Path, digest: &str) -> PathBuf {
    store.join("blobs").join("sha256").join(hex_of(digest))
}

/// Lists the entries of `dir`, none when it is missing.
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(read) => read
            .map(|entry| entry.expect("read directory entry").path())
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => panic!("cannot list {}: {error}", dir.display()),
    }
}

/// Lists every non-directory below `dir`, without following symlinks.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for path in entries(&current) {
            let metadata = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|error| panic!("cannot stat {}: {error}", path.display()));
            if metadata.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// Lists every path below `dir` whose file name starts with `prefix`,
/// without following symlinks.
pub fn paths_named_below(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for path in entries(&current) {
            if path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(prefix))
            {
                found.push(path.clone());
            }
            let metadata = std::fs::symlink_metadata(&path)
                .unwrap_or_else(|error| panic!("cannot stat {}: {error}", path.display()));
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    found
}

/// Returns the host platform as the fixtures name it: `linux/amd64`,
/// `linux/arm64`, `linux/arm`.
pub fn host_platform() -> String {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{architecture}")
}
