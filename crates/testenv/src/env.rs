//! The test environment's description in `/run/hatoba-testenv/env.json`:
//! registry addresses, credentials, archive paths and fixture digests.
//!
//! `hatoba-testenv up` writes the file and tests read it with
//! [`TestEnv::load`].

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Directory with runtime state: `env.json`. `down` removes it.
pub const RUN_DIR: &str = "/run/hatoba-testenv";

/// Path of the environment description that `up` writes.
pub const ENV_PATH: &str = "/run/hatoba-testenv/env.json";

/// Directory with registry storage, configs, logs and archives. It survives
/// `down` as a cache and `down --purge` removes it.
pub const DATA_DIR: &str = "/var/lib/hatoba-testenv";

/// Environment variable that moves the four ports (default base 5000).
pub const PORT_BASE_VAR: &str = "HATOBA_TESTENV_PORT_BASE";

/// Port of the open registry when [`PORT_BASE_VAR`] is unset.
pub const DEFAULT_PORT_BASE: u16 = 5000;

/// User accepted by the basic-auth registry.
pub const BASIC_USER: &str = "hatoba";

/// Password of [`BASIC_USER`] on the basic-auth registry.
pub const BASIC_PASSWORD: &str = "hatoba-basic-pw";

/// User accepted by the token server.
pub const TOKEN_USER: &str = "hatoba";

/// Password of [`TOKEN_USER`] on the token server.
pub const TOKEN_PASSWORD: &str = "hatoba-token-pw";

/// Service name the token registry expects in the `aud` claim.
pub const TOKEN_SERVICE: &str = "hatoba-testenv-registry";

/// Issuer the token registry expects in the `iss` claim.
pub const TOKEN_ISSUER: &str = "hatoba-testenv";

/// Reading or writing `env.json` failed.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "test environment is not running: {path} not found; run `target/debug/hatoba-testenv up` as root (scripts/test does this)"
    )]
    NotRunning { path: PathBuf },

    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid {path}: {source}; rerun `hatoba-testenv down` and `hatoba-testenv up`")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("failed to encode {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("fixture {name:?} is not in env.json (known: {known})")]
    UnknownFixture { name: String, known: String },

    #[error("invalid {var}={value:?}: expected a port number from 1 to 65532")]
    InvalidPortBase { var: &'static str, value: String },
}

/// Addresses of the three registries and the token server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub open: SocketAddr,
    pub basic: SocketAddr,
    pub token: SocketAddr,
    pub token_server: SocketAddr,
}

impl Ports {
    /// Derives the four addresses from a base port: open, basic, token and
    /// token server listen on base, base+1, base+2 and base+3.
    pub fn from_base(base: u16) -> Ports {
        let at =
            |offset: u16| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, base + offset));
        Ports {
            open: at(0),
            basic: at(1),
            token: at(2),
            token_server: at(3),
        }
    }

    /// Reads the base port from [`PORT_BASE_VAR`], defaulting to 5000.
    pub fn from_env() -> Result<Ports, EnvError> {
        let Ok(value) = std::env::var(PORT_BASE_VAR) else {
            return Ok(Ports::from_base(DEFAULT_PORT_BASE));
        };
        match value.trim().parse::<u16>() {
            Ok(base) if (1..=u16::MAX - 3).contains(&base) => Ok(Ports::from_base(base)),
            _ => Err(EnvError::InvalidPortBase {
                var: PORT_BASE_VAR,
                value,
            }),
        }
    }
}

/// The running test environment as recorded in `env.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestEnv {
    /// Address (`host:port`) of the registry without authentication.
    pub open: String,
    /// Address of the registry with htpasswd basic authentication.
    pub basic: String,
    /// Address of the registry with bearer token authentication.
    pub token: String,
    /// Address of the token server that the token registry names as realm.
    pub token_server: String,
    pub basic_user: String,
    pub basic_password: String,
    pub token_user: String,
    pub token_password: String,
    /// Data directory with storage, configs, logs and archives.
    pub dir: PathBuf,
    /// Processes started by `up`: the token server and the three registries.
    pub pids: Vec<u32>,
    pub archives: Archives,
    /// Fixture images by fixture name (`busybox`, `multilayer`, ...).
    pub fixtures: BTreeMap<String, Fixture>,
}

/// Image archives for load tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Archives {
    /// OCI image layout tar of the busybox image.
    pub oci: PathBuf,
    /// `docker save` tar of the busybox image.
    pub docker: PathBuf,
    /// Reference in the OCI archive's `org.opencontainers.image.ref.name`.
    #[serde(default)]
    pub oci_reference: String,
    /// Reference in the Docker archive's `RepoTags`.
    #[serde(default)]
    pub docker_reference: String,
}

/// One pushed fixture image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fixture {
    /// Full reference with registry, repository and tag.
    pub reference: String,
    /// Further references to the same image (other tags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Digest of what the tag points to: an image index or manifest list
    /// for multi-platform fixtures, otherwise the image manifest.
    pub top_digest: String,
    /// Media type of the content at `top_digest`.
    #[serde(default)]
    pub top_media_type: String,
    /// Digest of the image manifest for the host platform. Equals
    /// `top_digest` for single-platform fixtures.
    pub manifest_digest: String,
    /// Digest of that manifest's image config.
    pub config_digest: String,
    /// That manifest's layers, base layer first.
    pub layers: Vec<Layer>,
    /// Every manifest of an index or manifest list, in index order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformManifest>,
}

/// A layer of a fixture's host platform manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    /// Digest of the blob as stored in the registry (compressed).
    pub digest: String,
    /// Digest of the uncompressed tar, as in the config's `rootfs.diff_ids`.
    pub diff_id: String,
    pub media_type: String,
    /// Size of the blob in bytes.
    #[serde(default)]
    pub size: u64,
}

/// A manifest in an image index or manifest list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformManifest {
    /// Platform as `os/architecture[/variant]`, for example `linux/arm64/v8`.
    pub platform: String,
    pub manifest_digest: String,
    pub config_digest: String,
}

impl TestEnv {
    /// Reads `/run/hatoba-testenv/env.json`.
    pub fn load() -> Result<TestEnv, EnvError> {
        TestEnv::load_from(Path::new(ENV_PATH))
    }

    /// Reads an environment description from `path`.
    pub fn load_from(path: &Path) -> Result<TestEnv, EnvError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(EnvError::NotRunning {
                    path: path.to_path_buf(),
                });
            }
            Err(source) => {
                return Err(EnvError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|source| EnvError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the description to `path` through a temporary file and a
    /// rename, so readers never see a half-written file.
    pub fn write_to(&self, path: &Path) -> Result<(), EnvError> {
        let write_error = |source| EnvError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        let mut text = serde_json::to_vec_pretty(self).map_err(|source| EnvError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        text.push(b'\n');

        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary).map_err(write_error)?;
        file.write_all(&text).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&temporary, path).map_err(write_error)
    }

    /// Looks up a fixture by name, for example `busybox` or `evil-dotdot`.
    pub fn fixture(&self, name: &str) -> Result<&Fixture, EnvError> {
        self.fixtures
            .get(name)
            .ok_or_else(|| EnvError::UnknownFixture {
                name: name.to_string(),
                known: self.fixtures.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

impl Fixture {
    /// Returns the registry address of the reference (`127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        split_reference(&self.reference).0
    }

    /// Returns the repository of the reference (`testenv/busybox`).
    pub fn repository(&self) -> &str {
        split_reference(&self.reference).1
    }

    /// Returns the tag of the reference (`latest`).
    pub fn tag(&self) -> &str {
        split_reference(&self.reference).2
    }
}

/// Splits `host:port/repository:tag` into its three parts. Fixture
/// references always carry a registry with a port and a tag.
fn split_reference(reference: &str) -> (&str, &str, &str) {
    let (registry, rest) = reference.split_once('/').unwrap_or(("", reference));
    let (repository, tag) = rest.rsplit_once(':').unwrap_or((rest, "latest"));
    (registry, repository, tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TestEnv {
        let fixture = Fixture {
            reference: "127.0.0.1:5000/testenv/busybox:latest".to_string(),
            aliases: vec!["127.0.0.1:5000/testenv/busybox:1.35".to_string()],
            top_digest: "sha256:aa".to_string(),
            top_media_type: "application/vnd.oci.image.manifest.v1+json".to_string(),
            manifest_digest: "sha256:aa".to_string(),
            config_digest: "sha256:bb".to_string(),
            layers: vec![Layer {
                digest: "sha256:cc".to_string(),
                diff_id: "sha256:dd".to_string(),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".to_string(),
                size: 3,
            }],
            platforms: Vec::new(),
        };
        TestEnv {
            open: "127.0.0.1:5000".to_string(),
            basic: "127.0.0.1:5001".to_string(),
            token: "127.0.0.1:5002".to_string(),
            token_server: "127.0.0.1:5003".to_string(),
            basic_user: BASIC_USER.to_string(),
            basic_password: BASIC_PASSWORD.to_string(),
            token_user: TOKEN_USER.to_string(),
            token_password: TOKEN_PASSWORD.to_string(),
            dir: PathBuf::from(DATA_DIR),
            pids: vec![10, 11],
            archives: Archives {
                oci: PathBuf::from("/var/lib/hatoba-testenv/archives/busybox-oci.tar"),
                docker: PathBuf::from("/var/lib/hatoba-testenv/archives/busybox-docker.tar"),
                oci_reference: "127.0.0.1:5000/testenv/loaded-oci:latest".to_string(),
                docker_reference: "127.0.0.1:5000/testenv/loaded-docker:latest".to_string(),
            },
            fixtures: BTreeMap::from([("busybox".to_string(), fixture)]),
        }
    }

    #[test]
    fn env_json_round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("run/env.json");
        let env = sample();

        env.write_to(&path).expect("write env.json");
        let loaded = TestEnv::load_from(&path).expect("load env.json");

        assert_eq!(loaded, env);
    }

    #[test]
    fn env_json_uses_the_contract_keys() {
        let value = serde_json::to_value(sample()).expect("serialize");

        for key in [
            "open",
            "basic",
            "token",
            "token_server",
            "basic_user",
            "basic_password",
            "token_user",
            "token_password",
            "dir",
            "pids",
            "archives",
            "fixtures",
        ] {
            assert!(value.get(key).is_some(), "missing key {key}");
        }
        let fixture = &value["fixtures"]["busybox"];
        for key in [
            "reference",
            "manifest_digest",
            "top_digest",
            "config_digest",
        ] {
            assert!(fixture.get(key).is_some(), "missing fixture key {key}");
        }
        let layer = &fixture["layers"][0];
        for key in ["digest", "diff_id", "media_type"] {
            assert!(layer.get(key).is_some(), "missing layer key {key}");
        }
    }

    #[test]
    fn load_of_missing_file_names_the_fix() {
        let dir = tempfile::tempdir().expect("create temp dir");

        let error = TestEnv::load_from(&dir.path().join("env.json")).expect_err("must fail");

        assert!(matches!(error, EnvError::NotRunning { .. }));
        assert!(error.to_string().contains("hatoba-testenv up"));
    }

    #[test]
    fn unknown_fixture_lists_known_names() {
        let env = sample();

        let error = env.fixture("nope").expect_err("must fail");

        assert!(error.to_string().contains("busybox"));
    }

    #[test]
    fn fixture_reference_splits_into_parts() {
        let env = sample();
        let fixture = env.fixture("busybox").expect("busybox");

        assert_eq!(fixture.registry(), "127.0.0.1:5000");
        assert_eq!(fixture.repository(), "testenv/busybox");
        assert_eq!(fixture.tag(), "latest");
    }

    #[test]
    fn ports_follow_the_base() {
        let ports = Ports::from_base(6000);

        assert_eq!(ports.open.to_string(), "127.0.0.1:6000");
        assert_eq!(ports.basic.to_string(), "127.0.0.1:6001");
        assert_eq!(ports.token.to_string(), "127.0.0.1:6002");
        assert_eq!(ports.token_server.to_string(), "127.0.0.1:6003");
    }
}
