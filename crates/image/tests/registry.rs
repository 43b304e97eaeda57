//! The registry client against a real Docker registry 2.8 (Debian's
//! `docker-registry`) that each test starts on a free loopback port.
//!
//! Tests print a message and return early when the registry binary is
//! missing, so a skip never looks like a pass in the output.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hatoba_image::registry::{BlobStream, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, RegistryClient};
use hatoba_image::{Credentials, ImageConfig, ImageError, Reference, RegistryConfig};
use serde_json::json;
use sha2::{Digest as _, Sha256};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const HTPASSWD_BIN: &str = "/usr/bin/htpasswd";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REPO: &str = "hatoba/test";

/// A registry process. Drop kills it by PID and waits for it.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// Credentials the registry requires, if it has htpasswd auth.
    login: Option<(String, String)>,
}

impl Registry {
    /// Starts an anonymous registry, or returns `None` (after printing why)
    /// when the binary is missing.
    async fn start() -> Option<Self> {
        Self::start_with(None).await
    }

    /// Starts a registry that requires `user`/`password` by basic auth.
    async fn start_with_login(user: &str, password: &str) -> Option<Self> {
        if !Path::new(HTPASSWD_BIN).exists() {
            eprintln!("SKIPPED: {HTPASSWD_BIN} is missing (apt-get install apache2-utils)");
            return None;
        }
        Self::start_with(Some((user.to_string(), password.to_string()))).await
    }

    async fn start_with(login: Option<(String, String)>) -> Option<Self> {
        if !Path::new(REGISTRY_BIN).exists() {
            eprintln!("SKIPPED: {REGISTRY_BIN} is missing (apt-get install docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let auth = match &login {
            Some((user, password)) => htpasswd_section(dir.path(), user, password),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");

        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut registry = Self {
            child,
            port,
            dir,
            login,
        };
        registry.wait_until_listening().await;
        Some(registry)
    }

    /// Waits, for a bounded number of tries, until the port accepts
    /// connections.
    async fn wait_until_listening(&mut self) {
        for _ in 0..400 {
            if let Some(status) = self.child.try_wait().expect("poll registry") {
                panic!("registry exited with {status}: {}", self.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "registry did not listen on port {}: {}",
            self.port,
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn base(&self) -> String {
        format!("http://{}", self.host())
    }

    fn credentials(&self) -> Option<Credentials> {
        self.login.as_ref().map(|(username, password)| Credentials {
            username: username.clone(),
            password: password.clone(),
            ..Credentials::default()
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Only the child this guard started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a bcrypt htpasswd file and returns the registry's auth section.
fn htpasswd_section(dir: &Path, user: &str, password: &str) -> String {
    let output = Command::new(HTPASSWD_BIN)
        .args(["-Bbn", user, password])
        .output()
        .expect("run htpasswd");
    assert!(output.status.success(), "htpasswd failed: {output:?}");
    let path: PathBuf = dir.join("htpasswd");
    std::fs::write(&path, &output.stdout).expect("write htpasswd");
    format!(
        "auth:\n  htpasswd:\n    realm: hatoba-test\n    path: {}\n",
        path.display()
    )
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Returns the Go name of this machine's architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A small image: one gzip layer holding `hello.txt` with `text`.
struct TestImage {
    layer: Vec<u8>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl TestImage {
    fn new(text: &str, arch: &str) -> Self {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "hello.txt", text.as_bytes())
            .expect("tar entry");
        let tar = tar.into_inner().expect("tar");
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&tar).expect("gzip");
        let layer = gzip.finish().expect("gzip end");

        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [sha256(&tar)] },
        }))
        .expect("config json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": sha256(&config), "size": config.len() },
            "layers": [{ "mediaType": LAYER_GZIP, "digest": sha256(&layer), "size": layer.len() }],
        }))
        .expect("manifest json");
        Self {
            layer,
            config,
            manifest,
        }
    }

    fn manifest_digest(&self) -> String {
        sha256(&self.manifest)
    }

    /// Pushes the blobs and the manifest, tagged `tag`.
    async fn push(&self, registry: &Registry, tag: &str) {
        let pusher = Pusher::new(registry);
        pusher.blob(&self.layer).await;
        pusher.blob(&self.config).await;
        pusher.manifest(tag, OCI_MANIFEST, &self.manifest).await;
    }
}

/// Pushes with the plain distribution API: monolithic blob uploads and
/// manifest PUTs.
struct Pusher {
    http: reqwest::Client,
    base: String,
    login: Option<(String, String)>,
}

impl Pusher {
    fn new(registry: &Registry) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: registry.base(),
            login: registry.login.clone(),
        }
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.login {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        }
    }

    async fn blob(&self, bytes: &[u8]) {
        let start = format!("{}/v2/{REPO}/blobs/uploads/", self.base);
        let response = self
            .authed(self.http.post(&start))
            .send()
            .await
            .expect("start upload");
        assert_eq!(response.status(), 202, "start upload: {response:?}");
        let location = response.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        let mut url = reqwest::Url::parse(&start)
            .expect("upload url")
            .join(&location)
            .expect("location url");
        url.query_pairs_mut().append_pair("digest", &sha256(bytes));
        let response = self
            .authed(self.http.put(url))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("finish upload");
        assert_eq!(response.status(), 201, "finish upload: {response:?}");
    }

    async fn manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) {
        let url = format!("{}/v2/{REPO}/manifests/{reference}", self.base);
        let response = self
            .authed(self.http.put(url))
            .header("content-type", media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("put manifest");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 201, "put manifest: {body}");
    }
}

fn client(config: &ImageConfig) -> RegistryClient {
    RegistryClient::new(config).expect("registry client")
}

fn reference(text: &str) -> Reference {
    Reference::parse(text).expect("reference")
}

async fn read_all(mut blob: BlobStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    while let Some(chunk) = blob.next_chunk().await.expect("blob chunk") {
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

#[tokio::test]
async fn resolves_tag_and_streams_blobs() {
    let Some(registry) = Registry::start().await else {
        return;
    };
    let image = TestImage::new("hello", host_arch());
    image.push(&registry, "v1").await;

    let client = client(&ImageConfig::default());
    let r = reference(&format!("{}/{REPO}:v1", registry.host()));
    let resolved = client.resolve(&r, None).await.expect("resolve");

    assert_eq!(resolved.top_digest, image.manifest_digest());
    assert_eq!(resolved.manifest_digest, image.manifest_digest());
    assert_eq!(resolved.manifest_media_type, OCI_MANIFEST);
    assert_eq!(resolved.manifest_bytes, image.manifest);
    assert_eq!(resolved.manifest.config.digest, sha256(&image.config));
    assert_eq!(resolved.manifest.layers.len(), 1);

    let layer = &resolved.manifest.layers[0];
    let blob = client
        .fetch_blob(&r, &layer.digest, None)
        .await
        .expect("fetch layer");
    assert_eq!(blob.size, Some(image.layer.len() as u64));
    assert_eq!(read_all(blob).await, image.layer);
}

#[tokio::test]
async fn index_resolves_to_host_platform() {
    let Some(registry) = Registry::start().await else {
        return;
    };
    let native = TestImage::new("native", host_arch());
    let foreign = TestImage::new("foreign", "mips64");
    native.push(&registry, "native").await;
    foreign.push(&registry, "foreign").await;

    let entry = |image: &TestImage, arch: &str| {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest_digest(),
            "size": image.manifest.len(),
            "platform": { "os": "linux", "architecture": arch },
        })
    };
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry(&foreign, "mips64"), entry(&native, host_arch())],
    }))
    .expect("index json");
    Pusher::new(&registry)
        .manifest("multi", OCI_INDEX, &index)
        .await;

    let client = client(&ImageConfig::default());
    let r = reference(&format!("{}/{REPO}:multi", registry.host()));
    let resolved = client.resolve(&r, None).await.expect("resolve index");
    assert_eq!(resolved.top_digest, sha256(&index));
    assert_eq!(resolved.manifest_digest, native.manifest_digest());
    assert_eq!(resolved.manifest_bytes, native.manifest);

    let other_platform = ImageConfig {
        platform: "linux/s390x".into(),
        ..ImageConfig::default()
    };
    let result = RegistryClient::new(&other_platform)
        .expect("client")
        .resolve(&r, None)
        .await;
    assert!(
        matches!(&result, Err(ImageError::PlatformNotFound { platform, .. }) if platform == "linux/s390x"),
        "{result:?}"
    );
}

#[tokio::test]
async fn resolves_a_digest_reference_and_keeps_its_digest() {
    let Some(registry) = Registry::start().await else {
        return;
    };
    let image = TestImage::new("pinned", host_arch());
    image.push(&registry, "v1").await;

    let digest = image.manifest_digest();
    let r = reference(&format!("{}/{REPO}@{digest}", registry.host()));
    let resolved = client(&ImageConfig::default())
        .resolve(&r, None)
        .await
        .expect("resolve");
    assert_eq!(resolved.top_digest, digest);
    assert_eq!(resolved.manifest_digest, digest);
}

#[tokio::test]
async fn unknown_tag_and_repository_are_not_found() {
    let Some(registry) = Registry::start().await else {
        return;
    };
    TestImage::new("x", host_arch()).push(&registry, "v1").await;
    let client = client(&ImageConfig::default());

    for name in [format!("{REPO}:nope"), "hatoba/absent:v1".to_string()] {
        let r = reference(&format!("{}/{name}", registry.host()));
        let result = client.resolve(&r, None).await;
        assert!(
            matches!(&result, Err(ImageError::NotFound { reference }) if *reference == r.to_string()),
            "{result:?}"
        );
    }

    let r = reference(&format!("{}/{REPO}:v1", registry.host()));
    let missing = sha256(b"no such blob");
    let result = client.fetch_blob(&r, &missing, None).await;
    assert!(
        matches!(&result, Err(ImageError::Registry { reason, .. }) if reason.contains(&missing)),
        "{result:?}"
    );
}

#[tokio::test]
async fn nothing_listening_makes_the_registry_unavailable() {
    let host = format!("127.0.0.1:{}", free_port());
    let r = reference(&format!("{host}/{REPO}:v1"));
    let result = client(&ImageConfig::default()).resolve(&r, None).await;
    match result {
        Err(ImageError::RegistryUnavailable { registry, reason }) => {
            assert_eq!(registry, host);
            assert!(reason.contains(&format!("http://{host}/v2/")), "{reason}");
        }
        other => panic!("expected RegistryUnavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn basic_auth_registry_needs_the_right_password() {
    let Some(registry) = Registry::start_with_login("puller", "s3cret").await else {
        return;
    };
    let image = TestImage::new("private", host_arch());
    image.push(&registry, "v1").await;
    let client = client(&ImageConfig::default());
    let r = reference(&format!("{}/{REPO}:v1", registry.host()));

    let wrong = Credentials {
        username: "puller".into(),
        password: "wrong".into(),
        ..Credentials::default()
    };
    for credentials in [None, Some(&wrong)] {
        let result = client.resolve(&r, credentials).await;
        assert!(
            matches!(&result, Err(ImageError::Unauthenticated { registry: host, .. }) if *host == registry.host()),
            "{result:?}"
        );
    }

    let right = registry.credentials();
    let resolved = client
        .resolve(&r, right.as_ref())
        .await
        .expect("resolve with login");
    assert_eq!(resolved.manifest_digest, image.manifest_digest());
    let layer = &resolved.manifest.layers[0].digest;
    let blob = client
        .fetch_blob(&r, layer, right.as_ref())
        .await
        .expect("fetch with login");
    assert_eq!(read_all(blob).await, image.layer);
}

#[tokio::test]
async fn mirrors_fall_through_to_registry() {
    let Some(origin) = Registry::start().await else {
        return;
    };
    let Some(mirror) = Registry::start().await else {
        return;
    };
    let image = TestImage::new("origin", host_arch());
    image.push(&origin, "v1").await;

    // The first mirror refuses connections, the second lacks the image.
    let settings = RegistryConfig {
        mirrors: vec![format!("http://127.0.0.1:{}", free_port()), mirror.base()],
        plain_http: true,
        ..RegistryConfig::default()
    };
    let config = ImageConfig {
        registries: [(origin.host(), settings)].into_iter().collect(),
        ..ImageConfig::default()
    };
    let client = client(&config);
    let r = reference(&format!("{}/{REPO}:v1", origin.host()));
    let resolved = client
        .resolve(&r, None)
        .await
        .expect("resolve through mirrors");
    assert_eq!(resolved.manifest_digest, image.manifest_digest());
    let layer = &resolved.manifest.layers[0].digest;
    let blob = client
        .fetch_blob(&r, layer, None)
        .await
        .expect("blob from origin");
    assert_eq!(read_all(blob).await, image.layer);

    // Once the mirror has the tag, its manifest is used.
    let mirrored = TestImage::new("mirrored", host_arch());
    mirrored.push(&mirror, "v1").await;
    let resolved = client.resolve(&r, None).await.expect("resolve from mirror");
    assert_eq!(resolved.manifest_digest, mirrored.manifest_digest());
}
