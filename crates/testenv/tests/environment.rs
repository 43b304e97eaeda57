//! Checks the running test environment from the outside: every fixture in
//! env.json can be pulled and matches its recorded digests, the private
//! registries enforce their authentication, the corrupt fixture is
//! corrupt, and the archives are well formed.
//!
//! These tests need `hatoba-testenv up` (scripts/test runs it). As a
//! non-root user without a running environment they are skipped with a
//! message; as root they fail, because then the environment should run.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use hatoba_testenv::env::{ENV_PATH, EnvError, Fixture, TestEnv};
use hatoba_testenv::fixtures::push::{Credentials, RegistryClient};
use hatoba_testenv::fixtures::sha256_digest;

fn running_env(test: &str) -> Option<TestEnv> {
    match TestEnv::load() {
        Ok(env) => Some(env),
        Err(EnvError::NotRunning { .. }) if !rustix::process::geteuid().is_root() => {
            eprintln!("skipping {test}: not root and {ENV_PATH} does not exist");
            None
        }
        Err(error) => panic!("{error}"),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
}

/// Returns a client of the fixture's registry with the credentials it needs.
fn client_for(env: &TestEnv, fixture: &Fixture) -> RegistryClient {
    let credentials = if fixture.registry() == env.basic {
        Some(Credentials {
            user: env.basic_user.clone(),
            password: env.basic_password.clone(),
        })
    } else if fixture.registry() == env.token {
        Some(Credentials {
            user: env.token_user.clone(),
            password: env.token_password.clone(),
        })
    } else {
        None
    };
    RegistryClient::new(fixture.registry(), credentials).expect("registry client")
}

#[tokio::test]
async fn every_fixture_matches_its_recorded_digests() {
    let Some(env) = running_env("every_fixture_matches_its_recorded_digests") else {
        return;
    };
    assert!(!env.fixtures.is_empty(), "env.json lists no fixtures");

    for (name, fixture) in &env.fixtures {
        let mut client = client_for(&env, fixture);

        let (top, header) = client
            .get_manifest(fixture.repository(), fixture.tag())
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(top.digest, fixture.top_digest, "{name}: top digest");
        assert_eq!(header, fixture.top_digest, "{name}: Docker-Content-Digest");
        assert_eq!(top.media_type, fixture.top_media_type, "{name}: media type");

        let (manifest, _) = client
            .get_manifest(fixture.repository(), &fixture.manifest_digest)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(manifest.digest, fixture.manifest_digest, "{name}: manifest");
        let manifest: serde_json::Value =
            serde_json::from_slice(&manifest.data).expect("manifest json");
        assert_eq!(
            manifest["config"]["digest"], fixture.config_digest,
            "{name}: manifest names the config"
        );

        let config = client
            .get_blob(fixture.repository(), &fixture.config_digest)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(
            sha256_digest(&config),
            fixture.config_digest,
            "{name}: config"
        );
        let config: serde_json::Value = serde_json::from_slice(&config).expect("config json");
        let diff_ids: Vec<&str> = fixture.layers.iter().map(|l| l.diff_id.as_str()).collect();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!(diff_ids),
            "{name}"
        );
        assert_eq!(config["os"], "linux", "{name}: os");

        for (index, layer) in fixture.layers.iter().enumerate() {
            assert_eq!(
                manifest["layers"][index]["digest"], layer.digest,
                "{name}: layer {index} digest"
            );
            assert_eq!(
                manifest["layers"][index]["mediaType"], layer.media_type,
                "{name}: layer {index} media type"
            );
        }
    }
}

#[tokio::test]
async fn layers_decompress_to_their_diff_ids() {
    let Some(env) = running_env("layers_decompress_to_their_diff_ids") else {
        return;
    };

    for (name, fixture) in env.fixtures.iter().filter(|(name, _)| *name != "corrupt") {
        let mut client = client_for(&env, fixture);
        for layer in &fixture.layers {
            let blob = client
                .get_blob(fixture.repository(), &layer.digest)
                .await
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(sha256_digest(&blob), layer.digest, "{name}: blob digest");
            assert_eq!(blob.len() as u64, layer.size, "{name}: blob size");

            let tar = if layer.media_type.ends_with("gzip") {
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(&blob[..])
                    .read_to_end(&mut tar)
                    .expect("gunzip");
                tar
            } else if layer.media_type.ends_with("zstd") {
                zstd::decode_all(&blob[..]).expect("unzstd")
            } else {
                blob.to_vec()
            };
            assert_eq!(sha256_digest(&tar), layer.diff_id, "{name}: diff id");
        }
    }
}

#[tokio::test]
async fn token_registry_rejects_anonymous_pull() {
    let Some(env) = running_env("token_registry_rejects_anonymous_pull") else {
        return;
    };
    let http = http();
    let url = format!("http://{}/v2/private/busybox/manifests/latest", env.token);

    let challenge = http.get(&url).send().await.expect("request");
    assert_eq!(challenge.status(), 401);
    let token: serde_json::Value = http
        .get(format!("http://{}/token", env.token_server))
        .query(&[
            ("service", "hatoba-testenv-registry"),
            ("scope", "repository:private/busybox:pull"),
        ])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token json");
    let token = token["token"].as_str().expect("anonymous token");
    let response = http
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .expect("request");

    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn token_registry_serves_pull_with_user_token() {
    let Some(env) = running_env("token_registry_serves_pull_with_user_token") else {
        return;
    };
    let http = http();
    let fixture = env.fixture("token-private").expect("token-private");

    let token: serde_json::Value = http
        .get(format!("http://{}/token", env.token_server))
        .query(&[
            ("service", "hatoba-testenv-registry"),
            ("scope", "repository:private/busybox:pull"),
        ])
        .basic_auth(&env.token_user, Some(&env.token_password))
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token json");
    let token = token["token"].as_str().expect("token");
    let response = http
        .get(format!(
            "http://{}/v2/private/busybox/manifests/latest",
            env.token
        ))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .bearer_auth(token)
        .send()
        .await
        .expect("request");

    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["Docker-Content-Digest"],
        fixture.top_digest.as_str()
    );
}

#[tokio::test]
async fn token_server_rejects_wrong_password() {
    let Some(env) = running_env("token_server_rejects_wrong_password") else {
        return;
    };

    let response = http()
        .get(format!("http://{}/token", env.token_server))
        .query(&[("service", "hatoba-testenv-registry")])
        .basic_auth(&env.token_user, Some("wrong-password"))
        .send()
        .await
        .expect("request");

    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn basic_registry_requires_credentials() {
    let Some(env) = running_env("basic_registry_requires_credentials") else {
        return;
    };
    let http = http();
    let url = format!("http://{}/v2/private/busybox/manifests/latest", env.basic);
    let accept = "application/vnd.oci.image.manifest.v1+json";

    let anonymous = http
        .get(&url)
        .header("Accept", accept)
        .send()
        .await
        .expect("request");
    let wrong = http
        .get(&url)
        .header("Accept", accept)
        .basic_auth(&env.basic_user, Some("wrong-password"))
        .send()
        .await
        .expect("request");
    let valid = http
        .get(&url)
        .header("Accept", accept)
        .basic_auth(&env.basic_user, Some(&env.basic_password))
        .send()
        .await
        .expect("request");

    assert_eq!(anonymous.status(), 401);
    assert_eq!(wrong.status(), 401);
    assert_eq!(valid.status(), 200);
}

#[tokio::test]
async fn corrupt_layer_does_not_match_its_digest() {
    let Some(env) = running_env("corrupt_layer_does_not_match_its_digest") else {
        return;
    };
    let fixture = env.fixture("corrupt").expect("corrupt");
    let layer = fixture.layers.last().expect("layer");

    let served = http()
        .get(format!(
            "http://{}/v2/{}/blobs/{}",
            env.open,
            fixture.repository(),
            layer.digest
        ))
        .send()
        .await
        .expect("request")
        .bytes()
        .await
        .expect("body");

    assert_eq!(served.len() as u64, layer.size);
    assert_ne!(sha256_digest(&served), layer.digest);
}

/// Reads one file out of a tar archive on disk.
fn read_archive_file(archive: &Path, wanted: &str) -> Vec<u8> {
    let file = std::fs::File::open(archive).expect("open archive");
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").to_str() == Some(wanted) {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            return data;
        }
    }
    panic!("{wanted} not in archive");
}

#[test]
fn archives_name_the_loaded_images() {
    let Some(env) = running_env("archives_name_the_loaded_images") else {
        return;
    };
    let busybox = env.fixture("busybox").expect("busybox");

    let index: serde_json::Value =
        serde_json::from_slice(&read_archive_file(&env.archives.oci, "index.json")).expect("json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&read_archive_file(&env.archives.docker, "manifest.json"))
            .expect("json");

    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("{}/testenv/loaded-oci:latest", env.open)
    );
    assert_eq!(index["manifests"][0]["digest"], busybox.manifest_digest);
    assert_eq!(
        manifest[0]["RepoTags"][0],
        format!("{}/testenv/loaded-docker:latest", env.open)
    );
    let layer = format!(
        "{}/layer.tar",
        busybox.layers[0].diff_id.trim_start_matches("sha256:")
    );
    assert_eq!(manifest[0]["Layers"][0], layer.as_str());
}

#[test]
fn up_again_keeps_the_running_environment() {
    let Some(before) = running_env("up_again_keeps_the_running_environment") else {
        return;
    };

    let status = Command::new(env!("CARGO_BIN_EXE_hatoba-testenv"))
        .arg("up")
        .status()
        .expect("run hatoba-testenv up");
    let after = TestEnv::load().expect("env.json after up");

    assert!(status.success());
    assert_eq!(after.pids, before.pids);
    assert_eq!(after.fixtures, before.fixtures);
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Runs a command and panics with its output when it fails.
fn run(command: &mut Command) {
    let output = command.output().expect("start command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn multilayer_unpacks_with_whiteouts_under_umoci() {
    let Some(env) = running_env("multilayer_unpacks_with_whiteouts_under_umoci") else {
        return;
    };
    if !have("skopeo") || !have("umoci") || !rustix::process::geteuid().is_root() {
        eprintln!(
            "skipping multilayer_unpacks_with_whiteouts_under_umoci: needs root, skopeo and umoci"
        );
        return;
    }
    let fixture = env.fixture("multilayer").expect("multilayer");
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("oci");
    let bundle = work.path().join("bundle");

    run(Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{}", fixture.reference))
        .arg(format!("oci:{}:multilayer", layout.display())));
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:multilayer", layout.display()))
        .arg(&bundle));

    let data = bundle.join("rootfs/data");
    assert!(data.join("keep").is_file());
    assert!(
        !data.join("remove-me").exists(),
        "whiteout removed remove-me"
    );
    assert!(!data.join("dir/old-a").exists(), "opaque dir hid old-a");
    assert!(!data.join("dir/old-b").exists(), "opaque dir hid old-b");
    assert!(data.join("dir/new-c").is_file());
    assert!(
        !data.join(".wh.remove-me").exists(),
        "whiteout file not unpacked"
    );
    assert_eq!(
        std::fs::read_link(data.join("link")).expect("symlink"),
        Path::new("keep")
    );

    use std::os::unix::fs::MetadataExt;
    let keep = std::fs::metadata(data.join("keep")).expect("keep");
    let hardlink = std::fs::metadata(data.join("hardlink")).expect("hardlink");
    assert_eq!(keep.ino(), hardlink.ino(), "hard link shares the inode");
    let setuid = std::fs::metadata(data.join("setuid")).expect("setuid");
    assert_eq!(setuid.mode() & 0o7777, 0o4755);
    assert_eq!((setuid.uid(), setuid.gid()), (1000, 1000));
    let busybox = std::fs::metadata(bundle.join("rootfs/bin/busybox")).expect("busybox");
    assert_eq!(busybox.mode() & 0o777, 0o755);
}
