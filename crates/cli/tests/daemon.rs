//! `hatoba daemon`: start, locking, config errors, shutdown and the CRI
//! RuntimeService it serves today.
//!
//! These tests need root but not the testenv registries. Without root they
//! print `skipped:` and return.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;

use common::{HATOBA, Harness};
use hatoba_testenv::daemon::{Daemon, DaemonError, DaemonOptions};
use k8s_cri::v1::{RunPodSandboxRequest, StatusRequest, VersionRequest};
use prost::Message as _;
use tonic::Code;

/// Returns whether the test runs as root, and prints `skipped:` when not.
fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    eprintln!("skipped: {test} needs root (it runs hatoba daemon)");
    false
}

/// Starts a daemon that needs no registry.
async fn start_daemon() -> Harness {
    Harness::start_with(DaemonOptions::new(HATOBA)).await
}

/// Starts a daemon with `options` that is expected to exit at once, and
/// returns its exit status and log.
async fn start_expecting_exit(options: DaemonOptions) -> (std::process::ExitStatus, String) {
    match Daemon::start(options).await {
        Err(DaemonError::Exited {
            status, log_tail, ..
        }) => (status, log_tail),
        Err(error) => panic!("the daemon should exit at start, but: {error}"),
        Ok(daemon) => panic!(
            "the daemon should fail to start, but it responds on {}",
            daemon.socket().display()
        ),
    }
}

#[tokio::test]
async fn version_reports_hatoba_and_cri_v1() {
    if !is_root() {
        return;
    }
    let mut harness = start_daemon().await;

    let version = harness
        .runtime
        .version(VersionRequest::default())
        .await
        .expect("Version should succeed")
        .into_inner();

    assert_eq!(
        version.runtime_name, "hatoba",
        "runtime_name should be hatoba"
    );
    assert_eq!(
        version.runtime_api_version, "v1",
        "runtime_api_version should be v1"
    );
    assert_eq!(
        version.runtime_version,
        env!("CARGO_PKG_VERSION"),
        "runtime_version should be the crate version"
    );
}

#[tokio::test]
async fn status_reports_runtime_and_network() {
    if !is_root() {
        return;
    }
    let mut harness = start_daemon().await;

    let status = harness
        .runtime
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status should succeed")
        .into_inner()
        .status
        .expect("Status should carry a runtime status");

    let condition = |name: &str| {
        status
            .conditions
            .iter()
            .find(|condition| condition.r#type == name)
            .unwrap_or_else(|| panic!("Status should report {name}, got {:?}", status.conditions))
    };
    assert!(
        condition("RuntimeReady").status,
        "RuntimeReady should be true"
    );
    let network = condition("NetworkReady");
    assert!(
        !network.status,
        "NetworkReady should be false until networking exists"
    );
    assert!(
        !network.reason.is_empty(),
        "NetworkReady false should come with a reason"
    );
}

#[tokio::test]
async fn run_pod_sandbox_is_unimplemented() {
    if !is_root() {
        return;
    }
    let mut harness = start_daemon().await;

    let status = harness
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest::default())
        .await
        .expect_err("RunPodSandbox should fail");

    assert_eq!(
        status.code(),
        Code::Unimplemented,
        "expected Unimplemented, got {status:?}"
    );
    assert!(
        status.message().contains("RunPodSandbox"),
        "the message should name RunPodSandbox, got {:?}",
        status.message()
    );
}

#[tokio::test]
async fn start_on_held_socket_names_holder() {
    if !is_root() {
        return;
    }
    let mut first = start_daemon().await;
    let first_pid = first.daemon.pid().expect("the first daemon runs");

    let (status, log) =
        start_expecting_exit(DaemonOptions::new(HATOBA).socket(first.daemon.socket())).await;

    assert!(
        !status.success(),
        "the second daemon should exit with an error, got {status}"
    );
    assert!(
        log.contains(&first_pid.to_string()),
        "the second daemon should name the holder pid {first_pid}, its log:\n{log}"
    );
    let version = first.runtime.version(VersionRequest::default()).await;
    assert!(
        version.is_ok(),
        "the first daemon should still answer on its socket, got {version:?}"
    );
}

#[tokio::test]
async fn start_on_held_root_names_holder() {
    if !is_root() {
        return;
    }
    let first = start_daemon().await;
    let first_pid = first.daemon.pid().expect("the first daemon runs");

    let (status, log) =
        start_expecting_exit(DaemonOptions::new(HATOBA).root(first.daemon.root())).await;

    assert!(
        !status.success(),
        "the second daemon should exit with an error, got {status}"
    );
    assert!(
        log.contains(&first_pid.to_string()),
        "the second daemon should name the holder pid {first_pid}, its log:\n{log}"
    );
}

#[tokio::test]
async fn config_unknown_key_is_named() {
    if !is_root() {
        return;
    }

    let (status, log) =
        start_expecting_exit(DaemonOptions::new(HATOBA).extra_config("no_such_key = true")).await;

    assert_eq!(
        status.code(),
        Some(1),
        "the daemon should exit with code 1, got {status}"
    );
    assert!(
        log.contains("no_such_key"),
        "the error should name no_such_key, log:\n{log}"
    );
}

#[tokio::test]
async fn config_unknown_image_key_is_named() {
    if !is_root() {
        return;
    }

    let (status, log) = start_expecting_exit(
        DaemonOptions::new(HATOBA).extra_config("[image]\nno_such_image_key = 1"),
    )
    .await;

    assert!(!status.success(), "the daemon should fail, got {status}");
    assert!(
        log.contains("no_such_image_key"),
        "the error should name no_such_image_key, log:\n{log}"
    );
}

#[tokio::test]
async fn config_bad_log_format_is_named() {
    if !is_root() {
        return;
    }

    let (status, log) =
        start_expecting_exit(DaemonOptions::new(HATOBA).extra_config("log_format = \"yaml\""))
            .await;

    assert_eq!(
        status.code(),
        Some(1),
        "the daemon should exit with code 1, got {status}"
    );
    assert!(
        log.contains("log_format"),
        "the error should name log_format, log:\n{log}"
    );
}

#[tokio::test]
async fn config_zero_downloads_is_named() {
    if !is_root() {
        return;
    }

    let (status, log) = start_expecting_exit(
        DaemonOptions::new(HATOBA).extra_config("[image]\nmax_concurrent_downloads = 0"),
    )
    .await;

    assert!(!status.success(), "the daemon should fail, got {status}");
    assert!(
        log.contains("max_concurrent_downloads"),
        "the error should name max_concurrent_downloads, log:\n{log}"
    );
}

#[tokio::test]
async fn config_relative_root_is_named() {
    if !is_root() {
        return;
    }

    let (status, log) =
        start_expecting_exit(DaemonOptions::new(HATOBA).root("relative/root")).await;

    assert!(!status.success(), "the daemon should fail, got {status}");
    assert!(
        log.contains("relative/root"),
        "the error should name the relative root, log:\n{log}"
    );
}

#[test]
fn config_missing_file_is_named() {
    let missing = std::env::temp_dir().join(format!("hatoba-missing-{}.toml", std::process::id()));

    let output = Command::new(HATOBA)
        .arg("daemon")
        .arg("--config")
        .arg(&missing)
        .output()
        .expect("hatoba should run");

    assert_eq!(
        output.status.code(),
        Some(1),
        "the daemon should exit with code 1"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&missing.display().to_string()),
        "the error should name {}, stderr:\n{stderr}",
        missing.display()
    );
}

#[tokio::test]
async fn sigterm_exits_zero_and_removes_socket() {
    if !is_root() {
        return;
    }
    let mut harness = start_daemon().await;
    let socket = harness.daemon.socket().to_path_buf();

    let status = harness
        .daemon
        .stop()
        .await
        .expect("the daemon should stop on SIGTERM");

    assert_eq!(
        status.code(),
        Some(0),
        "the daemon should exit 0 on SIGTERM, got {status}"
    );
    assert!(
        !socket.exists(),
        "the socket {} should be removed",
        socket.display()
    );
}

#[tokio::test]
async fn socket_has_mode_0660() {
    if !is_root() {
        return;
    }
    let harness = start_daemon().await;

    let metadata =
        std::fs::symlink_metadata(harness.daemon.socket()).expect("the socket should exist");

    assert!(
        metadata.file_type().is_socket(),
        "the socket path should be a socket"
    );
    assert_eq!(
        metadata.permissions().mode() & 0o777,
        0o660,
        "the socket mode should be 0660"
    );
}

#[tokio::test]
async fn restart_serves_from_a_new_process() {
    if !is_root() {
        return;
    }
    let mut harness = start_daemon().await;
    let first_pid = harness.daemon.pid();

    harness
        .daemon
        .restart()
        .await
        .expect("the daemon should restart");
    harness.reconnect().await;

    assert_ne!(
        harness.daemon.pid(),
        first_pid,
        "a new process should serve after the restart"
    );
    let version = harness.runtime.version(VersionRequest::default()).await;
    assert!(
        version.is_ok(),
        "the restarted daemon should answer Version, got {version:?}"
    );
}

/// Sends `Version` as crictl before v1.31 does over a unix socket, with the
/// socket path as `:authority`, and returns the response headers, the
/// response message and the trailers.
async fn version_with_path_authority(socket: &std::path::Path) -> (Vec<(String, String)>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len())
            .expect("small frame")
            .to_be_bytes();
        let mut frame = length[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    let authority = socket.to_str().expect("UTF-8 socket path");
    let headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/runtime.v1.RuntimeService/Version"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let block = loona_hpack::Encoder::new().encode(
        headers
            .iter()
            .map(|(name, value)| (name.as_bytes(), value.as_bytes())),
    );
    let message = VersionRequest {
        version: "v1".into(),
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(
        &u32::try_from(message.len())
            .expect("small message")
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);

    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    request.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    request.extend(frame(0x0, 0x1, 1, &body)); // DATA, END_STREAM
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to the daemon socket");
    stream.write_all(&request).await.expect("send the request");

    // Read frames until the trailers (HEADERS with END_STREAM) or a reset.
    let mut decoder = loona_hpack::Decoder::new();
    let mut fields = Vec::new();
    let mut data = Vec::new();
    loop {
        let mut header = [0u8; 9];
        stream
            .read_exact(&mut header)
            .await
            .expect("read a frame header");
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; length];
        stream
            .read_exact(&mut payload)
            .await
            .expect("read a frame payload");
        let (kind, flags) = (header[3], header[4]);
        match kind {
            0x4 if flags & 0x1 == 0 => {
                // Acknowledge the server's SETTINGS, as every client must.
                stream
                    .write_all(&frame(0x4, 0x1, 0, &[]))
                    .await
                    .expect("send SETTINGS ACK");
            }
            0x1 => {
                let decoded = decoder.decode(&payload).expect("decode response headers");
                fields.extend(decoded.into_iter().map(|(name, value)| {
                    (
                        String::from_utf8_lossy(&name).into_owned(),
                        String::from_utf8_lossy(&value).into_owned(),
                    )
                }));
                if flags & 0x1 != 0 {
                    break;
                }
            }
            0x0 => data.extend_from_slice(&payload),
            0x3 => panic!("the daemon reset the stream with error code {payload:?}"),
            0x7 => panic!("the daemon closed the connection (GOAWAY {payload:?})"),
            _ => {}
        }
    }
    (fields, data)
}

#[tokio::test]
async fn socket_path_authority_is_accepted() {
    if !is_root() {
        return;
    }
    let harness = start_daemon().await;

    let (fields, data) = version_with_path_authority(harness.daemon.socket()).await;

    assert!(
        fields.contains(&("grpc-status".to_owned(), "0".to_owned())),
        "Version should succeed, got headers and trailers {fields:?}"
    );
    let response = k8s_cri::v1::VersionResponse::decode(data.get(5..).unwrap_or_default())
        .expect("a VersionResponse message");
    assert_eq!(response.runtime_name, "hatoba");
}

/// A directory under the system temporary directory, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("hatoba-{name}-{}", std::process::id()));
        // A directory left by an earlier run with the same PID is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        Self(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn config_log_level_typo_is_named() {
    let mut options = DaemonOptions::new(HATOBA);
    options.log_level = "warning".to_owned();

    let (status, log) = start_expecting_exit(options).await;

    assert_eq!(
        status.code(),
        Some(1),
        "the daemon should exit with code 1, got {status}"
    );
    assert!(
        log.contains("invalid log_level: \"warning\" is not a level or target=level"),
        "the error should name log_level and the directive, log:\n{log}"
    );
    assert!(
        log.contains("trace, debug, info, warn, error, off"),
        "the error should list the levels, log:\n{log}"
    );
}

#[test]
fn rust_log_typo_is_named() {
    let dir = ScratchDir::new("rust-log");
    let config = dir.0.join("config.toml");
    // Paths under /dev/null cannot be created, so a daemon that accepted
    // the filter stops right after instead of serving.
    std::fs::write(
        &config,
        "socket = \"/dev/null/hatoba.sock\"\nroot = \"/dev/null/root\"\nstate = \"/dev/null/state\"\n",
    )
    .expect("write config");

    let output = Command::new(HATOBA)
        .arg("daemon")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "inf")
        .output()
        .expect("hatoba should run");

    assert_eq!(
        output.status.code(),
        Some(1),
        "the daemon should exit with code 1"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid RUST_LOG: \"inf\" is not a level or target=level"),
        "the error should name RUST_LOG and the directive, stderr:\n{stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "the error should be one line, stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn unknown_socket_group_names_the_config_file() {
    let (status, log) = start_expecting_exit(
        DaemonOptions::new(HATOBA).extra_config("socket_group = \"hatoba-no-such-group\""),
    )
    .await;

    assert_eq!(
        status.code(),
        Some(1),
        "the daemon should exit with code 1, got {status}"
    );
    assert!(
        log.contains("config.toml: invalid socket_group: \"hatoba-no-such-group\""),
        "the error should start with the config file and name socket_group, log:\n{log}"
    );
}

#[tokio::test]
async fn new_socket_dir_gets_mode_0711() {
    if !is_root() {
        return;
    }
    let dir = ScratchDir::new("socket-dir");
    // The umask is per process: set it for the daemon alone, keeping its PID.
    let wrapper = dir.0.join("hatoba-umask-077");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\numask 077\nexec '{HATOBA}' \"$@\"\n"),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .expect("make the wrapper executable");
    let socket_dir = dir.0.join("run/hatoba");

    let harness =
        Harness::start_with(DaemonOptions::new(&wrapper).socket(socket_dir.join("hatoba.sock")))
            .await;

    for created in [
        dir.0.join("run"),
        socket_dir,
        harness.daemon.state().to_owned(),
    ] {
        let mode = std::fs::metadata(&created)
            .unwrap_or_else(|error| panic!("{} should exist: {error}", created.display()))
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o7777,
            0o711,
            "{} should have mode 0711, got {:o}",
            created.display(),
            mode & 0o7777
        );
    }
    let socket_mode = std::fs::metadata(harness.daemon.socket())
        .expect("the socket should exist")
        .permissions()
        .mode();
    assert_eq!(socket_mode & 0o777, 0o660, "the socket mode should be 0660");
}
