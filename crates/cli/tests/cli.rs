//! The `hatoba` client commands against a running daemon: exit codes and
//! the key lines of their output.
//!
//! Tests that talk to a daemon need root and `hatoba-testenv up`. Without
//! them they print `skipped:` and return.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{HATOBA, Harness, daemon_options, fixture, hex_of, test_env, within};
use hatoba_testenv::env::TestEnv;
use hatoba_testenv::proxy::Proxy;

/// Runs `hatoba --socket <socket> <args>` and returns its output.
fn hatoba(socket: &Path, args: &[&str]) -> Output {
    Command::new(HATOBA)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run hatoba {args:?}: {error}"))
}

/// Runs `hatoba`, fails the test unless it exits 0, and returns stdout.
fn hatoba_ok(socket: &Path, args: &[&str]) -> String {
    let output = hatoba(socket, args);
    assert!(
        output.status.success(),
        "hatoba {args:?} should exit 0, got {}; stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn client_without_daemon_names_socket() {
    let socket = std::env::temp_dir().join(format!("hatoba-no-daemon-{}.sock", std::process::id()));

    let output = hatoba(&socket, &["version"]);

    assert!(
        !output.status.success(),
        "hatoba version without a daemon should fail"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&socket.display().to_string()),
        "the error should name the socket {}, stderr:\n{stderr}",
        socket.display()
    );
}

#[tokio::test]
async fn version_prints_both_versions() {
    let Some(env) = test_env() else { return };
    let harness = Harness::start(&env).await;

    let stdout = hatoba_ok(harness.daemon.socket(), &["version"]);

    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "hatoba version should print {}, got:\n{stdout}",
        env!("CARGO_PKG_VERSION")
    );
}

#[tokio::test]
async fn socket_from_hatoba_socket_env() {
    let Some(env) = test_env() else { return };
    let harness = Harness::start(&env).await;

    let output = Command::new(HATOBA)
        .arg("version")
        .env("HATOBA_SOCKET", harness.daemon.socket())
        .output()
        .expect("hatoba should run");

    assert!(
        output.status.success(),
        "hatoba version with HATOBA_SOCKET should exit 0; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn info_prints_runtime_conditions() {
    let Some(env) = test_env() else { return };
    let harness = Harness::start(&env).await;

    let stdout = hatoba_ok(harness.daemon.socket(), &["info"]);

    assert!(
        stdout.contains("RuntimeReady"),
        "hatoba info should print the RuntimeReady condition, got:\n{stdout}"
    );
}

#[tokio::test]
async fn image_pull_prints_the_image_id() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let harness = Harness::start(&env).await;

    let stdout = hatoba_ok(
        harness.daemon.socket(),
        &["image", "pull", &busybox.reference],
    );

    assert!(
        stdout.contains(hex_of(&busybox.config_digest)),
        "hatoba image pull should print the image ID {}, got:\n{stdout}",
        busybox.config_digest
    );
}

#[tokio::test]
async fn image_pull_with_creds_succeeds() {
    let Some(env) = test_env() else { return };
    let private = fixture(&env, "basic-private");
    let harness = Harness::start(&env).await;
    let creds = format!("{}:{}", env.basic_user, env.basic_password);

    let stdout = hatoba_ok(
        harness.daemon.socket(),
        &["image", "pull", "--creds", &creds, &private.reference],
    );

    assert!(
        stdout.contains(hex_of(&private.config_digest)),
        "hatoba image pull --creds should print the image ID, got:\n{stdout}"
    );
}

#[tokio::test]
async fn image_pull_unknown_image_fails() {
    let Some(env) = test_env() else { return };
    let harness = Harness::start(&env).await;
    let reference = format!("{}/testenv/does-not-exist:latest", env.open);

    let output = hatoba(harness.daemon.socket(), &["image", "pull", &reference]);

    assert!(
        !output.status.success(),
        "pulling an unknown image should fail"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("testenv/does-not-exist"),
        "the error should name the reference, stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn image_ls_lists_a_pulled_image() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;

    let stdout = hatoba_ok(harness.daemon.socket(), &["image", "ls"]);

    let repository = format!("{}/{}", busybox.registry(), busybox.repository());
    assert!(
        stdout.contains(&repository),
        "hatoba image ls should list {repository}, got:\n{stdout}"
    );
}

#[tokio::test]
async fn image_inspect_prints_image_id() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;

    let stdout = hatoba_ok(
        harness.daemon.socket(),
        &["image", "inspect", &busybox.reference],
    );

    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!("hatoba image inspect should print JSON ({error}):\n{stdout}")
    });
    let id = json[0]["id"].as_str().unwrap_or_default();
    assert!(
        id.contains(hex_of(&busybox.config_digest)),
        "the first inspected image should have id {}, got:\n{stdout}",
        busybox.config_digest
    );
}

#[tokio::test]
async fn image_rm_removes_a_pulled_image() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;

    hatoba_ok(
        harness.daemon.socket(),
        &["image", "rm", &busybox.reference],
    );

    let listed = harness.list(None).await;
    assert!(
        listed.is_empty(),
        "no image should be left after hatoba image rm, got {listed:?}"
    );
}

#[tokio::test]
async fn image_rm_unknown_name_fails() {
    let Some(env) = test_env() else { return };
    let harness = Harness::start(&env).await;
    let name = format!("{}/testenv/never-pulled:latest", env.open);

    let output = hatoba(harness.daemon.socket(), &["image", "rm", &name]);

    assert_eq!(
        output.status.code(),
        Some(1),
        "hatoba image rm of an unknown name should exit 1"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("testenv/never-pulled"),
        "the error should name the image, stderr:\n{stderr}"
    );
}

/// Loads `archive` through the CLI, named after `flag` (`-i`) or on its
/// own when `flag` is empty, and checks that `reference` is loaded and listed.
async fn assert_image_load(env: &TestEnv, archive: &Path, flag: &str, reference: &str) {
    let mut harness = Harness::start(env).await;
    let archive = archive.to_str().expect("the archive path is UTF-8");
    let mut args = vec!["image", "load"];
    if !flag.is_empty() {
        args.push(flag);
    }
    args.push(archive);

    let stdout = hatoba_ok(harness.daemon.socket(), &args);

    assert!(
        stdout.contains(reference),
        "hatoba image load should print the loaded name {reference}, got:\n{stdout}"
    );
    let listed = harness.list(None).await;
    assert!(
        listed
            .iter()
            .any(|image| image.repo_tags.iter().any(|tag| tag == reference)),
        "the loaded image should be listed as {reference}, got {listed:?}"
    );
}

#[tokio::test]
async fn image_load_oci_archive() {
    let Some(env) = test_env() else { return };
    let reference = archive_reference(&env.archives.oci_reference, "loaded-oci", &env.open);
    assert_image_load(&env, &env.archives.oci, "", &reference).await;
}

#[tokio::test]
async fn image_load_docker_archive() {
    let Some(env) = test_env() else { return };
    let reference = archive_reference(&env.archives.docker_reference, "loaded-docker", &env.open);
    assert_image_load(&env, &env.archives.docker, "-i", &reference).await;
}

/// Returns the name stored in an archive: the one env.json records, or the
/// name from the test environment contract when env.json records none.
fn archive_reference(recorded: &str, repository: &str, open: &str) -> String {
    if recorded.is_empty() {
        format!("{open}/testenv/{repository}:latest")
    } else {
        recorded.to_owned()
    }
}

/// Builds a one-member tar whose header has registry-style hostile text:
/// the member name and the size field hold a newline, an escape sequence
/// and a forged log line, so reading the header fails with that text.
fn hostile_tar() -> Vec<u8> {
    fn put(header: &mut [u8; 512], offset: usize, bytes: &[u8]) {
        header[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    let mut header = [0u8; 512];
    put(&mut header, 0, b"evil\nFORGED-NAME \x1b[32mgreen");
    put(&mut header, 100, b"0000644\0");
    put(&mut header, 108, b"0000000\0");
    put(&mut header, 116, b"0000000\0");
    // Exactly the 12 bytes of the size field, which is not a number.
    put(&mut header, 124, b"\n\x1b[31mFORGED");
    put(&mut header, 136, b"00000000000\0");
    put(&mut header, 156, b"0");
    put(&mut header, 257, b"ustar\0");
    put(&mut header, 263, b"00");
    // The checksum counts its own field as spaces.
    put(&mut header, 148, b"        ");
    let sum: u32 = header.iter().map(|&byte| u32::from(byte)).sum();
    put(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());

    let mut archive = header.to_vec();
    archive.extend_from_slice(&[0u8; 1024]);
    archive
}

#[tokio::test]
async fn image_load_error_escapes_control_characters() {
    let Some(env) = test_env() else { return };
    let harness = Harness::start(&env).await;
    let archive = harness.daemon.dir().join("hostile.tar");
    std::fs::write(&archive, hostile_tar()).expect("write the hostile archive");
    let archive = archive.to_str().expect("the archive path is UTF-8");

    let output = hatoba(harness.daemon.socket(), &["image", "load", archive]);

    assert_eq!(
        output.status.code(),
        Some(1),
        "loading a broken archive should exit 1"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\\n\\u{1b}[31mFORGED"),
        "the error should show the header text escaped, stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "the error should have no escape sequences, stderr: {stderr:?}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "the error should be one line, stderr: {stderr:?}"
    );
    let log = harness.daemon.log();
    assert!(
        !log.contains('\x1b'),
        "the daemon log should have no escape sequences, log: {log:?}"
    );
    let forged: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("FORGED"))
        .collect();
    assert!(
        forged.is_empty(),
        "the archive should not start lines of the daemon log, got {forged:?}"
    );
}

/// Runs `hatoba --socket <socket> <args>` with a stdout whose reader is
/// closed, as `hatoba ... | head -0` leaves it.
fn hatoba_with_closed_stdout(socket: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(HATOBA)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run hatoba {args:?}: {error}"));
    drop(child.stdout.take());
    child
        .wait_with_output()
        .unwrap_or_else(|error| panic!("cannot wait for hatoba {args:?}: {error}"))
}

#[tokio::test]
async fn closed_stdout_ends_commands_quietly() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let mut harness = Harness::start(&env).await;
    harness.pull_ok(&busybox.reference).await;

    for args in [
        &["version"][..],
        &["info"],
        &["image", "ls"],
        &["image", "inspect", &busybox.reference],
        // Last, because it removes the image the others show.
        &["image", "rm", &busybox.reference],
    ] {
        let output = hatoba_with_closed_stdout(harness.daemon.socket(), args);

        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("panicked"),
            "hatoba {args:?} should not panic, stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("Broken pipe") && !stderr.contains("closed"),
            "hatoba {args:?} should not report the closed pipe, stderr:\n{stderr}"
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "hatoba {args:?} should exit 0 when its reader goes away; stderr:\n{stderr}"
        );
    }
}

#[test]
fn daemon_rejects_the_socket_flag() {
    let missing = std::env::temp_dir().join(format!("hatoba-missing-{}.toml", std::process::id()));

    let output = Command::new(HATOBA)
        .args(["daemon", "--socket", "/tmp/hatoba-ignored.sock", "--config"])
        .arg(&missing)
        .output()
        .expect("hatoba should run");

    assert_eq!(
        output.status.code(),
        Some(2),
        "hatoba daemon --socket should be a usage error"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("set `socket` in its config file"),
        "the error should point to the config file, stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn lost_daemon_is_named_with_its_socket() {
    let Some(env) = test_env() else { return };
    let busybox = fixture(&env, "busybox");
    let proxy = Proxy::start(&env.open).expect("the proxy should start");
    let reference = format!(
        "{}/{}:{}",
        proxy.host(),
        busybox.repository(),
        busybox.tag()
    );
    let mut harness =
        Harness::start_with(daemon_options(&env).plain_http_registry(proxy.host())).await;
    let socket = harness.daemon.socket().to_owned();

    // Hold the layers, so the pull is still running when the daemon dies.
    proxy.pause_blobs();
    let pull = tokio::process::Command::new(HATOBA)
        .arg("--socket")
        .arg(&socket)
        .args(["image", "pull", &reference])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("hatoba image pull should start");
    let reached_layers = proxy
        .wait_until(Duration::from_secs(60), |proxy| proxy.held_requests() >= 1)
        .await;
    assert!(reached_layers, "the pull should reach the layers");
    harness
        .daemon
        .kill()
        .expect("SIGKILL should stop the daemon");
    let output = within("hatoba image pull", pull.wait_with_output())
        .await
        .expect("wait for hatoba image pull");
    proxy.release_blobs();

    assert_eq!(
        output.status.code(),
        Some(1),
        "the interrupted pull should exit 1"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("lost the connection to hatoba at {}: ", socket.display());
    assert!(
        stderr.contains(&expected),
        "the error should report the lost connection to {}, stderr:\n{stderr}",
        socket.display()
    );
    assert!(
        !stderr.contains("h2 protocol error"),
        "the error should not show the HTTP/2 error, stderr:\n{stderr}"
    );
}
