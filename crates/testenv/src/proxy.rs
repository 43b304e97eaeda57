//! A fault-injection HTTP/1.1 reverse proxy in front of a loopback registry.
//!
//! A test points the daemon at `127.0.0.1:<proxy port>/<repository>` and the
//! proxy forwards every request to the registry. On the way it counts
//! requests per method and path, can throttle response bodies so a pull can
//! be interrupted in the middle, and can hold blob requests until released.
//! The proxy runs on its own thread and runtime, so a test that blocks its
//! own runtime does not stall it, and it stops when dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Headers that describe one connection and must not be forwarded.
const HOP_BY_HOP_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Chunks per second of a throttled body, so it arrives in steady small
/// pieces instead of one burst per second.
const THROTTLE_CHUNKS_PER_SECOND: u64 = 10;

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid upstream address {upstream:?}, expected ip:port: {source}")]
    InvalidUpstream {
        upstream: String,
        #[source]
        source: std::net::AddrParseError,
    },

    #[error(
        "upstream {upstream} is not a loopback address; the test proxy only forwards to loopback"
    )]
    UpstreamNotLoopback { upstream: SocketAddr },

    #[error("failed to bind the proxy listener on 127.0.0.1: {source}")]
    Bind {
        #[source]
        source: io::Error,
    },

    #[error("failed to build the proxy runtime: {source}")]
    Runtime {
        #[source]
        source: io::Error,
    },

    #[error("failed to start the proxy thread: {source}")]
    Thread {
        #[source]
        source: io::Error,
    },
}

/// The number of requests seen for one method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestCount {
    pub method: String,
    pub path: String,
    pub count: usize,
}

/// A running reverse proxy. Dropping it stops the listener and every
/// connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on `127.0.0.1:0` that forwards to `upstream`, a
    /// loopback `ip:port` such as `127.0.0.1:5000`.
    pub fn start(upstream: &str) -> Result<Self, ProxyError> {
        let upstream_addr: SocketAddr =
            upstream
                .parse()
                .map_err(|source| ProxyError::InvalidUpstream {
                    upstream: upstream.to_owned(),
                    source,
                })?;
        if !upstream_addr.ip().is_loopback() {
            return Err(ProxyError::UpstreamNotLoopback {
                upstream: upstream_addr,
            });
        }

        let listener =
            StdTcpListener::bind("127.0.0.1:0").map_err(|source| ProxyError::Bind { source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ProxyError::Bind { source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ProxyError::Bind { source })?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ProxyError::Runtime { source })?;
        let shared = Arc::new(Shared {
            upstream: upstream_addr,
            addr,
            counts: Mutex::new(BTreeMap::new()),
            body_bytes: Mutex::new(BTreeMap::new()),
            throttle: AtomicU64::new(0),
            gate: watch::Sender::new(false),
            held_requests: AtomicUsize::new(0),
        });
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("test-proxy-{}", addr.port()))
            .spawn(move || runtime.block_on(serve(listener, thread_shared, shutdown_rx)))
            .map_err(|source| ProxyError::Thread { source })?;

        Ok(Self {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Returns the address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns the proxy's `host:port`, the registry part of references
    /// pulled through it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Returns how many `method` requests for `path` arrived so far.
    pub fn count(&self, method: &str, path: &str) -> usize {
        let counts = self
            .shared
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts
            .get(&(method.to_owned(), path.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Returns the request counts, sorted by path and then method.
    pub fn requests(&self) -> Vec<RequestCount> {
        let counts = self
            .shared
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut requests: Vec<RequestCount> = counts
            .iter()
            .map(|((method, path), count)| RequestCount {
                method: method.clone(),
                path: path.clone(),
                count: *count,
            })
            .collect();
        requests.sort_by(|a, b| (&a.path, &a.method).cmp(&(&b.path, &b.method)));
        requests
    }

    /// Returns the response body bytes sent so far for blob `digest` on
    /// any repository.
    pub fn blob_bytes_sent(&self, digest: &str) -> u64 {
        let suffix = format!("/blobs/{digest}");
        let body_bytes = self
            .shared
            .body_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        body_bytes
            .iter()
            .filter(|(path, _)| path.ends_with(&suffix))
            .map(|(_, bytes)| *bytes)
            .sum()
    }

    /// Limits every response body from now on to `bytes_per_second`, and
    /// `None` removes the limit. Bodies already streaming follow the change.
    pub fn set_throttle(&self, bytes_per_second: Option<u64>) {
        self.shared
            .throttle
            .store(bytes_per_second.unwrap_or(0), Ordering::Relaxed);
    }

    /// Holds every blob request that arrives from now on before forwarding
    /// it, until [`Proxy::release_blobs`].
    pub fn pause_blobs(&self) {
        self.shared.gate.send_replace(true);
    }

    /// Lets held and future blob requests through.
    pub fn release_blobs(&self) {
        self.shared.gate.send_replace(false);
    }

    /// Returns how many blob requests are held right now.
    pub fn held_requests(&self) -> usize {
        self.shared.held_requests.load(Ordering::Relaxed)
    }

    /// Polls `condition` until it is true or `timeout` passes, and returns
    /// whether it became true.
    pub async fn wait_until(&self, timeout: Duration, condition: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Held requests would otherwise wait for a release that never comes.
        self.release_blobs();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// State shared by the proxy handle and its connections.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    addr: SocketAddr,
    /// Requests per (method, path).
    counts: Mutex<BTreeMap<(String, String), usize>>,
    /// Response body bytes sent per path.
    body_bytes: Mutex<BTreeMap<String, u64>>,
    /// Bytes per second for response bodies, or 0 for no limit.
    throttle: AtomicU64,
    /// True while blob requests are held.
    gate: watch::Sender<bool>,
    /// Blob requests held right now.
    held_requests: AtomicUsize,
}

impl Shared {
    fn record_request(&self, method: &str, path: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts
            .entry((method.to_owned(), path.to_owned()))
            .or_insert(0) += 1;
    }

    fn record_body_bytes(&self, path: &str, bytes: u64) {
        let mut body_bytes = self
            .body_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *body_bytes.entry(path.to_owned()).or_insert(0) += bytes;
    }

    /// Waits while blob requests are paused. The held count drops again
    /// even when the client goes away and this future is dropped.
    async fn wait_at_gate(&self) {
        struct HeldRequest<'a>(&'a AtomicUsize);
        impl Drop for HeldRequest<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }

        let mut gate = self.gate.subscribe();
        if !*gate.borrow_and_update() {
            return;
        }
        self.held_requests.fetch_add(1, Ordering::Relaxed);
        let _held_request = HeldRequest(&self.held_requests);
        // The sender lives in `self`, so the channel cannot close here.
        let _ = gate.wait_for(|paused| !*paused).await;
    }
}

/// Accepts connections until `shutdown` fires or its sender is dropped.
async fn serve(listener: StdTcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("test proxy: cannot register listener: {error}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Accept errors (EMFILE and the like) are transient, so back off briefly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        handle(Arc::clone(&shared), request)
                    });
                    // A client that hangs up mid-body ends its connection with an error.
                    // Interrupted-pull tests do that on purpose, so it is not reported.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Counts the request, pauses it at the gate if it is for a blob, and
/// forwards it. Upstream failures become a 502 response.
async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    shared.record_request(&method, &path);
    if path.contains("/blobs/") {
        shared.wait_at_gate().await;
    }
    match forward(&shared, request, &path).await {
        Ok(response) => Ok(response),
        Err(error) => {
            let mut response = Response::new(ProxyBody::full(format!(
                "test proxy: upstream {} failed: {error}\n",
                shared.upstream
            )));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}

/// Sends `request` to the upstream on a new connection and streams the
/// response back through a pump task that counts and throttles the body.
async fn forward(
    shared: &Arc<Shared>,
    request: Request<Incoming>,
    path: &str,
) -> Result<Response<ProxyBody>, ForwardError> {
    let stream = TcpStream::connect(shared.upstream)
        .await
        .map_err(ForwardError::Connect)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(ForwardError::Http)?;
    tokio::spawn(connection);
    let mut sender = sender;

    let (mut parts, body) = request.into_parts();
    parts.uri = origin_form(&parts.uri);
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&shared.upstream.to_string()) {
        parts.headers.insert(header::HOST, host);
    }
    let response = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(ForwardError::Http)?;

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    rewrite_location(&mut parts.headers, shared.upstream, shared.addr);

    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(pump_body(
        Arc::clone(shared),
        path.to_owned(),
        body,
        tx,
        sender,
    ));
    Ok(Response::from_parts(parts, ProxyBody::channel(rx)))
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
}

/// Copies the upstream body into `tx` in chunks, sleeping between chunks
/// while a throttle is set. `_sender` keeps the upstream request handle
/// alive until the body is read.
async fn pump_body<S>(
    shared: Arc<Shared>,
    path: String,
    mut body: Incoming,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    _sender: S,
) {
    loop {
        let frame = match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return,
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                let _ = tx.send(Err(io::Error::other(error))).await;
                return;
            }
        };
        // Registries send no trailers; other frame kinds are dropped.
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        while !data.is_empty() {
            let rate = shared.throttle.load(Ordering::Relaxed);
            let chunk_len = if rate == 0 {
                data.len()
            } else {
                let per_chunk = (rate / THROTTLE_CHUNKS_PER_SECOND).max(1);
                data.len()
                    .min(usize::try_from(per_chunk).unwrap_or(usize::MAX))
            };
            let chunk = data.split_to(chunk_len);
            if tx.send(Ok(chunk)).await.is_err() {
                // The client hung up.
                return;
            }
            shared.record_body_bytes(&path, chunk_len as u64);
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(chunk_len as f64 / rate as f64)).await;
            }
        }
    }
}

/// Reduces a request URI to its path and query, the form an origin server
/// expects.
fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map(|path| path.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP_HEADERS {
        headers.remove(*name);
    }
}

/// Points absolute `Location` URLs at the upstream back at the proxy, so
/// redirects and upload URLs keep going through it.
fn rewrite_location(headers: &mut HeaderMap, upstream: SocketAddr, proxy: SocketAddr) {
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let upstream_prefix = format!("http://{upstream}");
    let Some(rest) = location.strip_prefix(&upstream_prefix) else {
        return;
    };
    if let Ok(value) = HeaderValue::from_str(&format!("http://{proxy}{rest}")) {
        headers.insert(header::LOCATION, value);
    }
}

/// A response body: a fixed message or the chunks a pump task sends.
struct ProxyBody {
    source: BodySource,
}

enum BodySource {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, io::Error>>),
}

impl ProxyBody {
    fn full(text: String) -> Self {
        Self {
            source: BodySource::Full(Some(Bytes::from(text))),
        }
    }

    fn channel(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Self {
        Self {
            source: BodySource::Channel(rx),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().source {
            BodySource::Full(bytes) => {
                Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes))))
            }
            BodySource::Channel(rx) => rx
                .poll_recv(cx)
                .map(|item| item.map(|chunk| chunk.map(Frame::data))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Starts a one-shot HTTP server on loopback that responds to every request
    /// with `body` and a Location header at itself, and returns its address.
    fn start_origin(body: &'static [u8]) -> SocketAddr {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLocation: http://{addr}/v2/next\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        addr
    }

    /// Sends a GET for `path` to `addr` and returns the raw response.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let stream = TcpStream::connect(addr).await.expect("connect to proxy");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, ProxyBody>(TokioIo::new(stream))
                .await
                .expect("handshake with proxy");
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(ProxyBody::full(String::new()))
            .expect("request builds");
        let response = sender
            .send_request(request)
            .await
            .expect("the proxy responds");
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.expect("body frame").into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        format!("{location}\n{}", String::from_utf8_lossy(&bytes))
    }

    #[test]
    fn start_rejects_non_loopback_upstream() {
        let result = Proxy::start("192.0.2.1:5000");
        assert!(
            matches!(result, Err(ProxyError::UpstreamNotLoopback { .. })),
            "expected UpstreamNotLoopback, got {result:?}"
        );
    }

    #[tokio::test]
    async fn proxy_forwards_counts_and_rewrites_location() {
        let origin = start_origin(b"hello blob");
        let proxy = Proxy::start(&origin.to_string()).expect("proxy starts");

        let response = get(proxy.addr(), "/v2/repo/blobs/sha256:abc").await;
        let _ = get(proxy.addr(), "/v2/repo/blobs/sha256:abc").await;

        assert_eq!(
            response,
            format!("http://{}/v2/next\nhello blob", proxy.addr()),
            "expected the origin's body and a Location pointing at the proxy"
        );
        assert_eq!(
            proxy.count("GET", "/v2/repo/blobs/sha256:abc"),
            2,
            "expected two counted GETs of the blob"
        );
        assert_eq!(
            proxy.blob_bytes_sent("sha256:abc"),
            20,
            "expected the body bytes of both responses to be counted"
        );
    }

    #[tokio::test]
    async fn paused_blob_requests_wait_until_released() {
        let origin = start_origin(b"data");
        let proxy = Proxy::start(&origin.to_string()).expect("proxy starts");
        proxy.pause_blobs();

        let addr = proxy.addr();
        let pending = tokio::spawn(async move { get(addr, "/v2/repo/blobs/sha256:def").await });
        let held = proxy
            .wait_until(Duration::from_secs(10), |p| p.held_requests() == 1)
            .await;
        assert!(held, "expected the blob request to be held at the gate");
        assert!(!pending.is_finished(), "expected no answer while paused");

        proxy.release_blobs();
        let response = pending.await.expect("request task finishes");
        assert!(
            response.ends_with("\ndata"),
            "expected the body after release, got {response:?}"
        );
        assert_eq!(
            proxy.held_requests(),
            0,
            "expected no held request after release"
        );
    }

    #[tokio::test]
    async fn throttled_body_arrives_complete() {
        let origin = start_origin(b"0123456789abcdefghij");
        let proxy = Proxy::start(&origin.to_string()).expect("proxy starts");
        proxy.set_throttle(Some(100));

        let response = get(proxy.addr(), "/v2/repo/blobs/sha256:slow").await;

        assert!(
            response.ends_with("\n0123456789abcdefghij"),
            "expected the whole body through the throttle, got {response:?}"
        );
    }
}
