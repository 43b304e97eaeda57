//! The OCI distribution client: resolves a reference to the manifest of
//! this node's platform and streams blobs, through mirrors, plain-HTTP
//! registries and basic or bearer-token auth.
//!
//! Only the pull side of the OCI distribution spec 1.1 is spoken; it was
//! checked against Docker's registry 2.8 and Docker Hub.

mod auth;
mod manifest;
#[cfg(test)]
mod test_server;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, WWW_AUTHENTICATE,
};
use reqwest::{Response, StatusCode};
use serde::Deserialize;

pub use manifest::{
    DOCKER_CONFIG, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, Document, Index,
    LAYER_MEDIA_TYPES, Manifest, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Platform, parse_document,
    select_platform,
};

use crate::reference::{DOCKER_HUB, check_digest, normalize_registry, split_host_port};
use crate::{Credentials, ImageConfig, ImageError, Reference, RegistryConfig};
use manifest::{MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};

/// API host of Docker Hub, which references call `docker.io`.
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Time allowed for connecting to a registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time after which a stalled response body fails. There is no total
/// timeout, because a large layer may take long on a slow link.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Maximum nesting of image indexes, which the OCI spec allows.
const MAX_INDEX_DEPTH: usize = 4;

/// Maximum size of an error body read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

const USER_AGENT: &str = concat!("hatoba/", env!("CARGO_PKG_VERSION"));

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// Registry error codes that mean the requested manifest does not exist.
const NOT_FOUND_CODES: [&str; 3] = ["MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"];

/// A client of registries for one image service. Keep one per service,
/// because it contains the connection pools and the token cache.
pub struct RegistryClient {
    http: reqwest::Client,
    /// A client that skips TLS verification, built only when a registry's
    /// settings ask for it.
    insecure_http: Option<reqwest::Client>,
    /// Endpoints of the registries that have settings, by registry host.
    routes: BTreeMap<String, Route>,
    platform: Platform,
    auth: auth::AuthCache,
    /// When each failing mirror was last logged, and how many failures
    /// were not logged since.
    mirror_warnings: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Shortest time between two warnings about the same failing mirror: a
/// mirror that is down fails every blob of every pull.
const MIRROR_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// The result of resolving a reference: the platform manifest and the
/// digest of the referenced content.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Digest of what the reference names: the index if there is one, else
    /// the manifest. This is the digest of the image's `repo_digests`.
    pub top_digest: String,
    /// The image index as the registry sent it, when the reference names an
    /// index; its digest is `top_digest`.
    pub index_bytes: Option<Vec<u8>>,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// The manifest as the registry sent it; its digest is `manifest_digest`.
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
}

/// The body of one blob, read chunk by chunk. The caller verifies size and
/// digest while it writes the chunks.
#[derive(Debug)]
pub struct BlobStream {
    /// Size the registry announced, if it did.
    pub size: Option<u64>,
    registry: String,
    digest: String,
    response: Response,
}

impl BlobStream {
    /// Returns the next chunk of the blob, or `None` at its end. A read that
    /// stalls for 60 seconds fails with `RegistryUnavailable`.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ImageError> {
        self.response
            .chunk()
            .await
            .map_err(|e| ImageError::RegistryUnavailable {
                registry: self.registry.clone(),
                reason: format!("reading blob {} failed: {}", self.digest, error_chain(e)),
            })
    }

    /// Turns the blob into a stream of chunks.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, ImageError>> + Send + 'static {
        futures::stream::try_unfold(self, |mut blob| async move {
            Ok(blob.next_chunk().await?.map(|chunk| (chunk, blob)))
        })
    }
}

/// The endpoints of one registry: its mirrors in order, then the registry
/// itself.
#[derive(Debug, Clone)]
struct Route {
    mirrors: Vec<Endpoint>,
    registry: Endpoint,
}

/// One base URL that serves the `/v2/` API.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `scheme://host[:port][/prefix]`, without a trailing slash.
    base: String,
    insecure: bool,
}

impl RegistryClient {
    /// Builds a client from the image settings: the platform that indexes
    /// resolve to and each registry's mirrors, scheme and TLS checks.
    pub fn new(config: &ImageConfig) -> Result<Self, ImageError> {
        let platform = match config.platform.as_str() {
            "" => Platform::host(),
            text => Platform::parse(text).map_err(|reason| invalid_config("platform", reason))?,
        };

        let mut routes = BTreeMap::new();
        for (host, settings) in &config.registries {
            let key = normalize_registry(host);
            if routes.contains_key(&key) {
                let reason = format!("another section also names registry {key:?}");
                return Err(invalid_config(&format!("registries.{host:?}"), reason));
            }
            routes.insert(key, configured_route(host, settings)?);
        }

        let any_insecure = config.registries.values().any(|r| r.insecure_skip_verify);
        let insecure_http = any_insecure.then(|| build_http(true)).transpose()?;

        Ok(Self {
            http: build_http(false)?,
            insecure_http,
            routes,
            platform,
            auth: auth::AuthCache::default(),
            mirror_warnings: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the platform that image indexes resolve to.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Resolves a reference to a platform manifest: fetches the manifest by
    /// tag or digest, follows an image index to the manifest of this
    /// client's platform, and verifies every digest on the way.
    pub async fn resolve(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<Resolved, ImageError> {
        let session = self.session(reference, credentials);
        let name = match (&reference.digest, &reference.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag.as_str(),
            (None, None) => "latest",
        };
        let top = session
            .manifest(name, reference.digest.as_deref(), None)
            .await?;
        let top_digest = top.digest.clone();
        let index_bytes = match top.document {
            Document::Index(_) => Some(top.bytes.clone()),
            Document::Manifest(_) => None,
        };

        let mut current = top;
        for _ in 0..MAX_INDEX_DEPTH {
            let index = match current.document {
                Document::Manifest(manifest) => {
                    return Ok(Resolved {
                        top_digest,
                        index_bytes,
                        manifest_digest: current.digest,
                        manifest_media_type: manifest.media_type.clone(),
                        manifest_bytes: current.bytes,
                        manifest,
                    });
                }
                Document::Index(index) => index,
            };
            let child = select_platform(&index, &self.platform).ok_or_else(|| {
                ImageError::PlatformNotFound {
                    reference: reference.to_string(),
                    platform: self.platform.to_string(),
                }
            })?;
            current = session
                .manifest(&child.digest, Some(&child.digest), Some(child.size))
                .await?;
        }
        Err(ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "image index",
            reason: format!("indexes are nested more than {MAX_INDEX_DEPTH} deep"),
        })
    }

    /// Starts streaming one blob of the reference's repository. Redirects
    /// to storage hosts are followed without the `Authorization` header.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &str,
        credentials: Option<&Credentials>,
    ) -> Result<BlobStream, ImageError> {
        // The digest becomes part of a URL path.
        check_digest(digest).map_err(|reason| ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "blob digest",
            reason,
        })?;

        let session = self.session(reference, credentials);
        for mirror in &session.route.mirrors {
            match session.blob_from(mirror, digest).await {
                Ok(blob) => return Ok(blob),
                Err(error) => session.skip_mirror(mirror, &error),
            }
        }
        session.blob_from(&session.route.registry, digest).await
    }

    /// Starts the requests of one operation on one reference.
    fn session<'a>(
        &'a self,
        reference: &'a Reference,
        credentials: Option<&'a Credentials>,
    ) -> Session<'a> {
        let route = match self.routes.get(&reference.registry) {
            Some(route) => route.clone(),
            None => default_route(&reference.registry),
        };
        Session {
            client: self,
            reference,
            credentials,
            route,
            scope: format!("repository:{}:pull", reference.repository),
        }
    }

    /// Returns whether a failure of `mirror` should be logged now, with the
    /// number of failures not logged since the last warning.
    fn mirror_warning_due(&self, mirror: &str) -> Option<u64> {
        let now = Instant::now();
        let mut warnings = self
            .mirror_warnings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match warnings.get_mut(mirror) {
            Some((last, suppressed)) if now.duration_since(*last) < MIRROR_WARNING_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                warnings.insert(mirror.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    fn http_for(&self, endpoint: &Endpoint) -> &reqwest::Client {
        match (&self.insecure_http, endpoint.insecure) {
            (Some(insecure), true) => insecure,
            _ => &self.http,
        }
    }
}

/// Builds the route of a registry that has settings.
fn configured_route(host: &str, settings: &RegistryConfig) -> Result<Route, ImageError> {
    let insecure = settings.insecure_skip_verify;
    let mirrors = settings
        .mirrors
        .iter()
        .enumerate()
        .map(|(i, mirror)| {
            url_endpoint(
                &format!("registries.{host:?}.mirrors[{i}]"),
                mirror,
                insecure,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let registry = if settings.endpoint.is_empty() {
        let scheme = if settings.plain_http { "http" } else { "https" };
        Endpoint {
            base: format!("{scheme}://{}", api_host(&normalize_registry(host))),
            insecure,
        }
    } else {
        let setting = format!("registries.{host:?}.endpoint");
        url_endpoint(&setting, &settings.endpoint, insecure)?
    };
    Ok(Route { mirrors, registry })
}

/// Checks an endpoint URL from the settings (a mirror or a registry's own
/// endpoint): http or https, a host, no credentials, query or fragment.
fn url_endpoint(setting: &str, mirror: &str, insecure: bool) -> Result<Endpoint, ImageError> {
    let setting = || setting.to_string();
    let url = reqwest::Url::parse(mirror)
        .map_err(|e| invalid_config(&setting(), format!("{mirror:?} is not a URL: {e}")))?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    if !plain {
        let reason = format!("{mirror:?} must be http(s)://host[:port][/path]");
        return Err(invalid_config(&setting(), reason));
    }
    Ok(Endpoint {
        base: url.as_str().trim_end_matches('/').to_string(),
        insecure,
    })
}

/// Builds the route of a registry without settings: HTTPS, except plain
/// HTTP for loopback hosts, as containerd and Docker do.
fn default_route(registry: &str) -> Route {
    let scheme = if is_loopback(registry) {
        "http"
    } else {
        "https"
    };
    Route {
        mirrors: Vec::new(),
        registry: Endpoint {
            base: format!("{scheme}://{}", api_host(registry)),
            insecure: false,
        },
    }
}

/// Returns whether a `host[:port]` names this machine.
fn is_loopback(registry: &str) -> bool {
    let Some((host, _)) = split_host_port(registry) else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Returns the host that serves a registry's API.
fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

fn build_http(insecure: bool) -> Result<reqwest::Client, ImageError> {
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .danger_accept_invalid_certs(insecure)
        .build()
        .map_err(|e| {
            invalid_config(
                "registries",
                format!("cannot build the HTTP client: {}", error_chain(e)),
            )
        })
}

fn invalid_config(setting: &str, reason: String) -> ImageError {
    ImageError::InvalidConfig {
        setting: setting.to_string(),
        reason,
    }
}

/// A manifest or index as fetched and verified.
struct Fetched {
    digest: String,
    bytes: Vec<u8>,
    document: Document,
}

/// The object of a failed request, which decides the error it maps to.
enum Target<'a> {
    /// A manifest and the reference that names it.
    Manifest {
        manifest_ref: &'a str,
    },
    Blob {
        digest: &'a str,
    },
}

/// The requests of one resolve or blob fetch.
struct Session<'a> {
    client: &'a RegistryClient,
    reference: &'a Reference,
    credentials: Option<&'a Credentials>,
    route: Route,
    /// Token scope: pull access to the reference's repository.
    scope: String,
}

impl Session<'_> {
    /// Fetches and verifies a manifest by tag or digest, trying the mirrors
    /// first. `expected` and `size` come from the digest reference or the
    /// index entry that named it.
    async fn manifest(
        &self,
        name: &str,
        expected: Option<&str>,
        size: Option<u64>,
    ) -> Result<Fetched, ImageError> {
        for mirror in &self.route.mirrors {
            match self.manifest_from(mirror, name, expected, size).await {
                Ok(fetched) => return Ok(fetched),
                Err(error) => self.skip_mirror(mirror, &error),
            }
        }
        self.manifest_from(&self.route.registry, name, expected, size)
            .await
    }

    async fn manifest_from(
        &self,
        endpoint: &Endpoint,
        name: &str,
        expected: Option<&str>,
        size: Option<u64>,
    ) -> Result<Fetched, ImageError> {
        let manifest_ref = match expected {
            Some(digest) if self.reference.digest.as_deref() != Some(digest) => {
                self.reference.with_digest(digest)
            }
            _ => self.reference.to_string(),
        };
        let response = self
            .get(
                endpoint,
                &format!("manifests/{name}"),
                Some(MANIFEST_ACCEPT),
            )
            .await?;
        if !response.status().is_success() {
            return Err(self
                .status_error(
                    response,
                    Target::Manifest {
                        manifest_ref: &manifest_ref,
                    },
                )
                .await);
        }

        // A registry that contains only a schema 1 manifest may send it despite
        // the `Accept` header.
        let content_type = header_text(&response, &CONTENT_TYPE);
        if let Some(media_type) = content_type.filter(|t| manifest::is_schema1(t)) {
            return Err(ImageError::UnsupportedMediaType {
                reference: manifest_ref,
                media_type,
            });
        }
        let header_digest = header_text(&response, &DOCKER_CONTENT_DIGEST);
        let url = response.url().to_string();
        let bytes = read_limited(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| self.manifest_read_error(&manifest_ref, &url, e))?;

        let digest = verify_manifest(&manifest_ref, &bytes, expected, size, header_digest)?;
        let document = parse_document(&manifest_ref, &bytes)?;
        Ok(Fetched {
            digest,
            bytes,
            document,
        })
    }

    async fn blob_from(&self, endpoint: &Endpoint, digest: &str) -> Result<BlobStream, ImageError> {
        let response = self.get(endpoint, &format!("blobs/{digest}"), None).await?;
        if !response.status().is_success() {
            return Err(self.status_error(response, Target::Blob { digest }).await);
        }
        Ok(BlobStream {
            size: response.content_length(),
            registry: self.reference.registry.clone(),
            digest: digest.to_string(),
            response,
        })
    }

    /// Sends `GET /v2/<repository>/<path>`, anonymously or with a cached
    /// authorization first, then once more with the authorization that the
    /// registry's 401 challenge requires.
    async fn get(
        &self,
        endpoint: &Endpoint,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Response, ImageError> {
        let url = format!("{}/v2/{}/{path}", endpoint.base, self.reference.repository);
        let key = auth::CacheKey::new(&endpoint.base, &self.scope, self.credentials);
        let cached = self.client.auth.get(&key);

        let response = self.send(endpoint, &url, accept, cached.clone()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        if cached.is_some() {
            self.client.auth.remove(&key);
        }

        let (authorization, expires) = self.authorize(endpoint, &response).await?;
        let response = self
            .send(endpoint, &url, accept, Some(authorization.clone()))
            .await?;
        if !matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            self.client.auth.put(key, authorization, expires);
        }
        Ok(response)
    }

    async fn send(
        &self,
        endpoint: &Endpoint,
        url: &str,
        accept: Option<&str>,
        authorization: Option<HeaderValue>,
    ) -> Result<Response, ImageError> {
        tracing::debug!(registry = %self.reference.registry, url, "GET");
        let mut request = self.client.http_for(endpoint).get(url);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request.send().await.map_err(|e| self.send_error(url, e))
    }

    /// Handles a 401: reads its challenges and returns the `Authorization`
    /// value they require, with its expiry (`None` for basic credentials).
    async fn authorize(
        &self,
        endpoint: &Endpoint,
        response: &Response,
    ) -> Result<(HeaderValue, Option<Instant>), ImageError> {
        let header = response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        let challenges = auth::parse_challenges(&header)
            .map_err(|reason| self.registry_error(format!("invalid WWW-Authenticate: {reason}")))?;

        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            return self.bearer(endpoint, bearer).await;
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            return self.basic().map(|header| (header, None));
        }
        let reason = format!(
            "{} returned 401 without a basic or bearer challenge",
            endpoint.base
        );
        Err(self.unauthenticated(reason))
    }

    /// Returns a bearer token: the caller's registry token, or one from the
    /// token server the challenge names.
    async fn bearer(
        &self,
        endpoint: &Endpoint,
        challenge: &auth::Challenge,
    ) -> Result<(HeaderValue, Option<Instant>), ImageError> {
        let registry_token = self.credentials.map(|c| c.registry_token.as_str());
        if let Some(token) = registry_token.filter(|t| !t.is_empty()) {
            let header = auth::bearer_header(token).map_err(|r| self.unauthenticated(r))?;
            return Ok((header, None));
        }

        let challenge = auth::BearerChallenge::from_challenge(challenge)
            .map_err(|reason| self.registry_error(format!("invalid bearer challenge: {reason}")))?;
        let mut scopes = vec![self.scope.clone()];
        scopes.extend(challenge.scope.clone().filter(|scope| *scope != self.scope));
        let http = self.client.http_for(endpoint);
        let (header, expires) = auth::fetch_token(http, &challenge, &scopes, self.credentials)
            .await
            .map_err(|e| {
                let reference = self.reference.to_string();
                auth::token_error(
                    e,
                    &self.reference.registry,
                    &reference,
                    &challenge.realm,
                    self.credentials.is_some(),
                )
            })?;
        Ok((header, Some(expires)))
    }

    fn basic(&self) -> Result<HeaderValue, ImageError> {
        match self.credentials.filter(|c| !c.username.is_empty()) {
            Some(credentials) => {
                auth::basic_header(credentials).map_err(|r| self.unauthenticated(r))
            }
            None => Err(self.unauthenticated(
                "the registry requires a username and password, and none were given: \
                 add pull credentials"
                    .into(),
            )),
        }
    }

    /// Turns an error response into the error of what was requested.
    async fn status_error(&self, response: Response, target: Target<'_>) -> ImageError {
        let status = response.status();
        let url = response.url().to_string();
        let body = read_limited(response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        let errors = registry_errors(&body);
        let detail = describe_status(status, &errors);

        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            let hint = if auth::has_credentials(self.credentials) {
                "check the pull credentials"
            } else {
                "no credentials were given: the image may be private or may not exist"
            };
            return self.unauthenticated(format!("{url} returned {detail}: {hint}"));
        }
        let unknown = status == StatusCode::NOT_FOUND
            || errors
                .iter()
                .any(|e| NOT_FOUND_CODES.contains(&e.code.as_str()));
        match target {
            Target::Manifest { manifest_ref } if unknown => ImageError::NotFound {
                reference: manifest_ref.to_string(),
            },
            Target::Blob { digest } if unknown => {
                self.registry_error(format!("blob {digest} not found: {url} returned {detail}"))
            }
            _ => self.registry_error(format!("{url} returned {detail}")),
        }
    }

    fn manifest_read_error(&self, manifest_ref: &str, url: &str, error: ReadError) -> ImageError {
        match error {
            ReadError::TooLarge(limit) => ImageError::InvalidContent {
                reference: manifest_ref.to_string(),
                what: "manifest",
                reason: format!("{url} sent more than {limit} bytes"),
            },
            ReadError::Transfer(reason) => ImageError::RegistryUnavailable {
                registry: self.reference.registry.clone(),
                reason: format!("reading the manifest from {url} failed: {reason}"),
            },
        }
    }

    /// Maps a failed request: no connection, a timeout or a broken
    /// connection makes the registry unavailable.
    fn send_error(&self, url: &str, error: reqwest::Error) -> ImageError {
        let registry_side = error.is_redirect() || error.is_builder();
        let reason = format!("{url}: {}", error_chain(error));
        if registry_side {
            return self.registry_error(reason);
        }
        ImageError::RegistryUnavailable {
            registry: self.reference.registry.clone(),
            reason,
        }
    }

    /// Logs why a mirror was skipped. The error is not returned, so this log
    /// line is the only place it shows.
    fn skip_mirror(&self, mirror: &Endpoint, error: &ImageError) {
        let registry = &self.reference.registry;
        if matches!(error, ImageError::NotFound { .. }) {
            tracing::debug!(registry, mirror = %mirror.base, %error, "mirror lacks the content");
            return;
        }
        let Some(suppressed) = self.client.mirror_warning_due(&mirror.base) else {
            return;
        };
        tracing::warn!(
            registry,
            mirror = %mirror.base,
            %error,
            suppressed,
            "mirror failed, trying the next endpoint"
        );
    }

    fn unauthenticated(&self, reason: String) -> ImageError {
        ImageError::Unauthenticated {
            registry: self.reference.registry.clone(),
            reference: self.reference.to_string(),
            reason,
        }
    }

    fn registry_error(&self, reason: String) -> ImageError {
        ImageError::Registry {
            registry: self.reference.registry.clone(),
            reference: self.reference.to_string(),
            reason,
        }
    }
}

/// Checks a fetched manifest against the digest and size that named it,
/// and against `Docker-Content-Digest`, and returns its digest.
fn verify_manifest(
    manifest_ref: &str,
    bytes: &[u8],
    expected: Option<&str>,
    size: Option<u64>,
    header_digest: Option<String>,
) -> Result<String, ImageError> {
    let digest = match expected {
        Some(expected) => {
            manifest::verify_digest(expected, bytes)?;
            expected.to_string()
        }
        None => manifest::digest_like("sha256:", bytes),
    };
    // The header is only the registry's claim. It must match, but never
    // replaces the hash of the bytes.
    if let Some(header) = header_digest.filter(|h| check_digest(h).is_ok()) {
        manifest::verify_digest(&header, bytes)?;
    }
    let length = bytes.len() as u64;
    if let Some(size) = size.filter(|&size| size != length) {
        return Err(ImageError::InvalidContent {
            reference: manifest_ref.to_string(),
            what: "manifest",
            reason: format!("manifest {digest} has {length} bytes, the index says {size}"),
        });
    }
    Ok(digest)
}

/// One entry of a registry's `{"errors": [...]}` body.
#[derive(Deserialize)]
struct RegistryErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct RegistryErrorBody {
    #[serde(default)]
    errors: Vec<RegistryErrorEntry>,
}

/// Reads the error entries of a registry error body, none if it has none.
fn registry_errors(body: &[u8]) -> Vec<RegistryErrorEntry> {
    serde_json::from_slice::<RegistryErrorBody>(body)
        .map(|body| body.errors)
        .unwrap_or_default()
}

/// Renders `404 Not Found (MANIFEST_UNKNOWN: manifest unknown)`.
fn describe_status(status: StatusCode, errors: &[RegistryErrorEntry]) -> String {
    if errors.is_empty() {
        return status.to_string();
    }
    let entries: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.code, e.message))
        .collect();
    format!("{status} ({})", entries.join("; "))
}

/// The failure of a bounded body read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Transfer(String),
}

/// Reads a whole response body, refusing more than `limit` bytes whatever
/// `Content-Length` claims.
async fn read_limited(mut response: Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(ReadError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ReadError::Transfer(error_chain(e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn header_text(response: &Response, name: &HeaderName) -> Option<String> {
    let value = response.headers().get(name)?.to_str().ok()?;
    // `Content-Type` may carry parameters (`; charset=utf-8`).
    Some(value.split(';').next().unwrap_or(value).trim().to_string())
}

/// Joins a request error and its sources. The URL is dropped because every
/// caller names it already. The cause (refused, timed out, DNS) is in the
/// sources.
fn error_chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::test_server::{TestResponse, TestServer};
    use super::*;

    fn config(registries: &[(&str, RegistryConfig)]) -> ImageConfig {
        ImageConfig {
            registries: registries
                .iter()
                .map(|(host, settings)| (host.to_string(), settings.clone()))
                .collect(),
            ..ImageConfig::default()
        }
    }

    fn route(client: &RegistryClient, reference: &str) -> Route {
        let reference = Reference::parse(reference).expect("reference");
        client.session(&reference, None).route
    }

    #[test]
    fn docker_hub_uses_its_api_host_over_https() {
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let route = route(&client, "busybox");
        assert_eq!(route.registry.base, "https://registry-1.docker.io");
        assert!(route.mirrors.is_empty());
    }

    #[test]
    fn loopback_registries_default_to_plain_http() {
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        for (reference, base) in [
            ("127.0.0.1:5000/a", "http://127.0.0.1:5000"),
            ("127.1.2.3:80/a", "http://127.1.2.3:80"),
            ("localhost/a", "http://localhost"),
            ("[::1]:5000/a", "http://[::1]:5000"),
            ("quay.io/a", "https://quay.io"),
            ("10.0.0.1:5000/a", "https://10.0.0.1:5000"),
        ] {
            assert_eq!(route(&client, reference).registry.base, base, "{reference}");
        }
    }

    #[test]
    fn sections_naming_one_registry_are_rejected() {
        let mut config = ImageConfig::default();
        for host in ["LocalHost:5000", "localhost:5000"] {
            config
                .registries
                .insert(host.into(), RegistryConfig::default());
        }

        let result = RegistryClient::new(&config);

        assert!(
            matches!(result, Err(ImageError::InvalidConfig { ref reason, .. }) if reason.contains("localhost:5000")),
            "{:?}",
            result.err()
        );
    }

    #[test]
    fn mirror_warnings_are_rate_limited() {
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let mirror = "http://127.0.0.1:6000";

        assert_eq!(
            client.mirror_warning_due(mirror),
            Some(0),
            "the first failure is logged"
        );
        assert_eq!(client.mirror_warning_due(mirror), None);
        assert_eq!(client.mirror_warning_due(mirror), None);
        assert_eq!(
            client.mirror_warning_due("http://127.0.0.1:6001"),
            Some(0),
            "another mirror has its own limit"
        );

        // Once the interval has passed, the next warning counts the silent ones.
        if let Some((last, _)) = client.mirror_warnings.lock().expect("lock").get_mut(mirror) {
            *last = last
                .checked_sub(MIRROR_WARNING_INTERVAL)
                .expect("the clock has run for longer than the interval");
        }
        assert_eq!(client.mirror_warning_due(mirror), Some(2));
    }

    #[test]
    fn settings_choose_scheme_mirrors_and_tls_checks() {
        let mirrored = RegistryConfig {
            mirrors: vec![
                "http://127.0.0.1:5001/".into(),
                "https://mirror.example/prefix".into(),
            ],
            insecure_skip_verify: true,
            ..RegistryConfig::default()
        };
        let plain = RegistryConfig {
            plain_http: true,
            ..RegistryConfig::default()
        };
        let client = RegistryClient::new(&config(&[
            ("index.docker.io", mirrored),
            ("reg.lan", plain),
        ]))
        .expect("client");
        assert!(client.insecure_http.is_some());

        let hub = route(&client, "busybox");
        let bases: Vec<_> = hub.mirrors.iter().map(|m| m.base.as_str()).collect();
        assert_eq!(
            bases,
            ["http://127.0.0.1:5001", "https://mirror.example/prefix"]
        );
        assert!(hub.registry.insecure && hub.mirrors.iter().all(|m| m.insecure));
        assert_eq!(
            route(&client, "reg.lan/app").registry.base,
            "http://reg.lan"
        );
    }

    #[test]
    fn configured_loopback_registry_follows_its_settings() {
        let client = RegistryClient::new(&config(&[("127.0.0.1:5000", RegistryConfig::default())]))
            .expect("client");
        assert_eq!(
            route(&client, "127.0.0.1:5000/a").registry.base,
            "https://127.0.0.1:5000"
        );
        assert!(client.insecure_http.is_none());
    }

    #[test]
    fn bad_mirror_urls_and_platforms_are_config_errors() {
        for mirror in [
            "mirror.example",
            "ftp://mirror.example",
            "https://u:p@m.example",
            "http://m/?q=1",
        ] {
            let settings = RegistryConfig {
                mirrors: vec![mirror.into()],
                ..RegistryConfig::default()
            };
            let result = RegistryClient::new(&config(&[("docker.io", settings)]));
            assert!(
                matches!(result, Err(ImageError::InvalidConfig { ref setting, .. }) if setting.contains("mirrors[0]")),
                "{mirror}"
            );
        }
        let bad_platform = ImageConfig {
            platform: "amd64".into(),
            ..ImageConfig::default()
        };
        assert!(matches!(
            RegistryClient::new(&bad_platform),
            Err(ImageError::InvalidConfig { setting, .. }) if setting == "platform"
        ));
    }

    #[test]
    fn configured_platform_replaces_the_host_one() {
        let arm = ImageConfig {
            platform: "linux/arm/v6".into(),
            ..ImageConfig::default()
        };
        let client = RegistryClient::new(&arm).expect("client");
        assert_eq!(client.platform().to_string(), "linux/arm/v6");
    }

    #[test]
    fn registry_error_bodies_are_described() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        let errors = registry_errors(body);
        assert_eq!(
            describe_status(StatusCode::NOT_FOUND, &errors),
            "404 Not Found (MANIFEST_UNKNOWN: manifest unknown)"
        );
        assert!(registry_errors(b"<html>").is_empty());
        assert_eq!(
            describe_status(StatusCode::BAD_GATEWAY, &[]),
            "502 Bad Gateway"
        );
    }

    #[test]
    fn manifest_verification_checks_digest_header_and_size() {
        let bytes = b"{}";
        let digest = manifest::digest_like("sha256:", bytes);
        let other = manifest::digest_like("sha256:", b"[]");

        assert_eq!(
            verify_manifest("r", bytes, None, None, None).expect("ok"),
            digest
        );
        assert!(verify_manifest("r", bytes, Some(&digest), Some(2), Some(digest.clone())).is_ok());
        assert!(matches!(
            verify_manifest("r", bytes, Some(&other), None, None),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify_manifest("r", bytes, None, None, Some(other)),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify_manifest("r", bytes, Some(&digest), Some(3), None),
            Err(ImageError::InvalidContent { .. })
        ));
        // A header that is not a digest is ignored, not trusted.
        assert!(verify_manifest("r", bytes, None, None, Some("garbage".into())).is_ok());
    }

    /// Returns a valid manifest with one gzip layer.
    fn manifest_bytes() -> Vec<u8> {
        let sha = |n: &str| format!("sha256:{}", n.repeat(64));
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": sha("1"), "size": 2 },
            "layers": [{ "mediaType": LAYER_MEDIA_TYPES[1], "digest": sha("2"), "size": 11 }],
        }))
        .expect("manifest json")
    }

    /// Starts a registry that wants a bearer token from its own `/token`
    /// endpoint and redirects blobs to `storage`.
    async fn token_registry(storage: SocketAddr) -> TestServer {
        let manifest = manifest_bytes();
        TestServer::start("127.0.0.1", move |request, addr| {
            let path = request.target.split('?').next().unwrap_or_default();
            let authorized = request.header("authorization") == Some("Bearer tok-1");
            match path {
                "/token" if request.header("authorization") == Some("Basic d3Jvbmc6d3Jvbmc=") => {
                    TestResponse::new(401)
                }
                "/token" => TestResponse::new(200).body(r#"{"token":"tok-1","expires_in":300}"#),
                _ if !authorized => TestResponse::new(401).header(
                    "www-authenticate",
                    format!(r#"Bearer realm="http://{addr}/token",service="test-registry",scope="repository:a/b:pull""#),
                ),
                p if p.starts_with("/v2/a/b/manifests/") => TestResponse::new(200)
                    .header("content-type", OCI_MANIFEST)
                    .body(manifest.clone()),
                p if p.starts_with("/v2/a/b/blobs/") => {
                    TestResponse::new(307).header("location", format!("http://{storage}/storage/blob"))
                }
                _ => TestResponse::new(404),
            }
        })
        .await
    }

    #[tokio::test]
    async fn bearer_token_is_fetched_once_and_reused() {
        let registry = token_registry("127.0.0.1:9".parse().expect("addr")).await;
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let reference = Reference::parse(&format!("{}/a/b:v1", registry.addr)).expect("reference");

        for _ in 0..2 {
            let resolved = client.resolve(&reference, None).await.expect("resolve");
            assert_eq!(resolved.manifest_bytes, manifest_bytes());
        }

        let requests = registry.requests();
        let tokens: Vec<_> = requests
            .iter()
            .filter(|r| r.target.starts_with("/token"))
            .collect();
        assert_eq!(tokens.len(), 1, "{requests:?}");
        assert!(
            tokens[0].target.contains("service=test-registry"),
            "{}",
            tokens[0].target
        );
        assert!(
            tokens[0].target.contains("scope=repository%3Aa%2Fb%3Apull"),
            "{}",
            tokens[0].target
        );
        assert_eq!(tokens[0].header("authorization"), None);
        // Anonymous try, token, retry with the token, then the cached token.
        assert_eq!(requests.len(), 4, "{requests:?}");
    }

    #[tokio::test]
    async fn blob_redirect_to_another_host_drops_the_authorization() {
        let storage = TestServer::start("127.0.0.2", |_, _| {
            TestResponse::new(200).body("layer bytes")
        })
        .await;
        let registry = token_registry(storage.addr).await;
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let reference = Reference::parse(&format!("{}/a/b:v1", registry.addr)).expect("reference");

        let digest = format!("sha256:{}", "2".repeat(64));
        let mut blob = client
            .fetch_blob(&reference, &digest, None)
            .await
            .expect("fetch blob");
        let mut bytes = Vec::new();
        while let Some(chunk) = blob.next_chunk().await.expect("chunk") {
            bytes.extend_from_slice(&chunk);
        }
        assert_eq!(bytes, b"layer bytes");

        let blob_requests: Vec<_> = registry
            .requests()
            .into_iter()
            .filter(|r| r.target.starts_with("/v2/a/b/blobs/"))
            .collect();
        assert_eq!(
            blob_requests.last().and_then(|r| r.header("authorization")),
            Some("Bearer tok-1")
        );
        let stored = storage.requests();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].header("authorization"), None);
    }

    #[tokio::test]
    async fn token_server_refusing_credentials_is_unauthenticated() {
        let registry = token_registry("127.0.0.1:9".parse().expect("addr")).await;
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let reference = Reference::parse(&format!("{}/a/b:v1", registry.addr)).expect("reference");
        let wrong = Credentials {
            username: "wrong".into(),
            password: "wrong".into(),
            ..Credentials::default()
        };
        let result = client.resolve(&reference, Some(&wrong)).await;
        assert!(
            matches!(&result, Err(ImageError::Unauthenticated { reason, .. }) if reason.contains("/token")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn registry_token_skips_token_server() {
        let registry = token_registry("127.0.0.1:9".parse().expect("addr")).await;
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let reference = Reference::parse(&format!("{}/a/b:v1", registry.addr)).expect("reference");
        let token = Credentials {
            registry_token: "tok-1".into(),
            ..Credentials::default()
        };
        client
            .resolve(&reference, Some(&token))
            .await
            .expect("resolve");
        assert!(
            registry
                .requests()
                .iter()
                .all(|r| !r.target.starts_with("/token"))
        );
    }

    #[tokio::test]
    async fn mismatched_manifest_digest_is_rejected() {
        let registry = token_registry("127.0.0.1:9".parse().expect("addr")).await;
        let client = RegistryClient::new(&ImageConfig::default()).expect("client");
        let wrong = format!("sha256:{}", "e".repeat(64));
        let reference =
            Reference::parse(&format!("{}/a/b@{wrong}", registry.addr)).expect("reference");
        let result = client.resolve(&reference, None).await;
        assert!(
            matches!(&result, Err(ImageError::DigestMismatch { expected, .. }) if *expected == wrong),
            "{result:?}"
        );
    }
}
