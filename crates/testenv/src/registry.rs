//! The three local registries (Debian's `docker-registry`, distribution
//! 2.8) and the processes of the test environment: configs, auth files,
//! start, readiness and stop.
//!
//! Every process runs in its own process group so it survives `up`
//! exiting and a Ctrl-C on the terminal that ran `up`. `down` stops only
//! processes whose command line names a path under the data directory,
//! which guards against a PID that was reused by an unrelated process.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::env::{TOKEN_ISSUER, TOKEN_SERVICE};

/// Program that serves the registries.
pub const REGISTRY_PROGRAM: &str = "/usr/bin/docker-registry";

/// Attempts to reach a freshly started process, 100 ms apart.
const READY_ATTEMPTS: u32 = 200;

/// Time a process gets to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Lines of a log file quoted in an error.
const LOG_TAIL_LINES: usize = 15;

/// Starting, probing or stopping a test environment process failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("failed to create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to run htpasswd for {path}: {source}; install the apache2-utils package")]
    RunHtpasswd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("htpasswd failed for {path} ({status}): {stderr}")]
    Htpasswd {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error(
        "address {addr} is already in use: {source}; stop what listens there or move the ports with HATOBA_TESTENV_PORT_BASE"
    )]
    PortInUse {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to open log file {path}: {source}")]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{name} exited while starting ({status}); last lines of {log}:\n{tail}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },

    #[error("{name} did not respond on {addr} within {seconds} s; last lines of {log}:\n{tail}")]
    NotReady {
        name: String,
        addr: SocketAddr,
        seconds: u64,
        log: PathBuf,
        tail: String,
    },

    #[error("failed to create an HTTP client: {source}")]
    HttpClient {
        #[source]
        source: reqwest::Error,
    },

    #[error("failed to send {signal} to process {pid}: {source}")]
    Signal {
        pid: u32,
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("process {pid} is still running after SIGKILL")]
    StillRunning { pid: u32 },
}

/// Files of the test environment below its data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Layout {
        Layout { dir: dir.into() }
    }

    /// Directory of one registry: config, log, htpasswd and storage.
    pub fn registry_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn token_dir(&self) -> PathBuf {
        self.dir.join("token-server")
    }

    /// Private key that signs tokens (PEM).
    pub fn token_key(&self) -> PathBuf {
        self.token_dir().join("key.pem")
    }

    /// Self-signed certificate of the token key, the token registry's
    /// `rootcertbundle`.
    pub fn token_cert(&self) -> PathBuf {
        self.token_dir().join("cert.pem")
    }

    pub fn token_log(&self) -> PathBuf {
        self.token_dir().join("token-server.log")
    }

    pub fn archives_dir(&self) -> PathBuf {
        self.dir.join("archives")
    }

    /// Lock file that serializes `up` and `down`.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(".lock")
    }
}

/// Authentication method of a registry.
#[derive(Debug, Clone)]
pub enum RegistryAuth {
    None,
    /// htpasswd file with bcrypt hashes.
    Basic {
        htpasswd: PathBuf,
    },
    /// Bearer tokens from the token server at `realm`.
    Token {
        realm: String,
        root_cert: PathBuf,
    },
}

/// One registry process: where it listens and where it keeps its files.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `open`, `basic` or `token`.
    pub name: &'static str,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub auth: RegistryAuth,
}

impl Registry {
    /// Describes the open, basic and token registries of `layout`.
    pub fn all(layout: &Layout, ports: &crate::env::Ports) -> [Registry; 3] {
        let basic_dir = layout.registry_dir("basic");
        [
            Registry {
                name: "open",
                addr: ports.open,
                dir: layout.registry_dir("open"),
                auth: RegistryAuth::None,
            },
            Registry {
                name: "basic",
                addr: ports.basic,
                auth: RegistryAuth::Basic {
                    htpasswd: basic_dir.join("htpasswd"),
                },
                dir: basic_dir,
            },
            Registry {
                name: "token",
                addr: ports.token,
                dir: layout.registry_dir("token"),
                auth: RegistryAuth::Token {
                    realm: format!("http://{}/token", ports.token_server),
                    root_cert: layout.token_cert(),
                },
            },
        ]
    }

    /// Root directory of the filesystem storage driver.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.join("storage")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// Returns the file in which the filesystem driver keeps a blob's bytes.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let prefix = hex.get(..2).unwrap_or(hex);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(prefix)
            .join(hex)
            .join("data")
    }

    /// Renders the registry's YAML config (distribution config version 0.1).
    pub fn config_yaml(&self) -> String {
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: info\n  fields:\n    instance: {name}\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n  secret: hatoba-testenv-{name}\n",
            name = self.name,
            root = yaml_string(&self.storage_dir().to_string_lossy()),
            addr = yaml_string(&self.addr.to_string()),
        );
        match &self.auth {
            RegistryAuth::None => {}
            RegistryAuth::Basic { htpasswd } => {
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: hatoba-testenv\n    path: {}\n",
                    yaml_string(&htpasswd.to_string_lossy())
                ));
            }
            RegistryAuth::Token { realm, root_cert } => {
                yaml.push_str(&format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    yaml_string(realm),
                    yaml_string(TOKEN_SERVICE),
                    yaml_string(TOKEN_ISSUER),
                    yaml_string(&root_cert.to_string_lossy()),
                ));
            }
        }
        yaml
    }

    /// Creates the registry's directories and writes its config.
    pub fn prepare(&self) -> Result<(), RegistryError> {
        create_dir(&self.storage_dir())?;
        let path = self.config_path();
        std::fs::write(&path, self.config_yaml())
            .map_err(|source| RegistryError::WriteFile { path, source })
    }

    /// Starts `docker-registry serve` with this registry's config.
    pub fn spawn(&self) -> Result<Child, RegistryError> {
        let mut command = Command::new(REGISTRY_PROGRAM);
        command.arg("serve").arg(self.config_path());
        spawn_detached(
            &format!("{} registry", self.name),
            command,
            &self.log_path(),
        )
    }
}

/// Quotes a string as a YAML double-quoted scalar.
fn yaml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Creates a directory and its parents.
pub fn create_dir(path: &Path) -> Result<(), RegistryError> {
    std::fs::create_dir_all(path).map_err(|source| RegistryError::CreateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes an htpasswd file with a bcrypt hash of `password`, the only hash
/// that distribution's htpasswd auth accepts.
pub fn write_htpasswd(path: &Path, user: &str, password: &str) -> Result<(), RegistryError> {
    let output = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .map_err(|source| RegistryError::RunHtpasswd {
            path: path.to_path_buf(),
            source,
        })?;
    if !output.status.success() {
        return Err(RegistryError::Htpasswd {
            path: path.to_path_buf(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    std::fs::write(path, &output.stdout).map_err(|source| RegistryError::WriteFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Fails when something already listens on `addr`.
pub fn ensure_port_free(addr: SocketAddr) -> Result<(), RegistryError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| RegistryError::PortInUse { addr, source })
}

/// Starts `command` in its own process group with stdin closed and
/// stdout and stderr appended to `log`.
pub fn spawn_detached(
    name: &str,
    mut command: Command,
    log: &Path,
) -> Result<Child, RegistryError> {
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| RegistryError::OpenLog {
                path: log.to_path_buf(),
                source,
            })
    };
    command
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        .process_group(0);
    command.spawn().map_err(|source| RegistryError::Spawn {
        name: name.to_string(),
        program: PathBuf::from(command.get_program()),
        source,
    })
}

/// Waits until `GET path` on `addr` returns one of the `accepted` statuses,
/// failing early when `child` exits. `name` and `log` go into the error.
pub async fn wait_ready(
    name: &str,
    addr: SocketAddr,
    path: &str,
    accepted: &[u16],
    child: &mut Child,
    log: &Path,
) -> Result<(), RegistryError> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|source| RegistryError::HttpClient { source })?;
    let url = format!("http://{addr}{path}");

    for _ in 0..READY_ATTEMPTS {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(RegistryError::Exited {
                name: name.to_string(),
                status,
                log: log.to_path_buf(),
                tail: log_tail(log),
            });
        }
        if let Ok(response) = client.get(&url).send().await {
            if accepted.contains(&response.status().as_u16()) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(RegistryError::NotReady {
        name: name.to_string(),
        addr,
        seconds: u64::from(READY_ATTEMPTS) / 10,
        log: log.to_path_buf(),
        tail: log_tail(log),
    })
}

/// Returns the last lines of a log file for an error message.
pub fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::from("(log file unreadable)");
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Tells whether process `pid` exists and has not exited. A zombie counts
/// as exited because it no longer serves anything.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain spaces or parentheses.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x"))
}

/// Tells whether process `pid` is one that `up` started: one of its
/// arguments is a path under `dir`.
pub fn started_by_testenv(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let dir = dir.to_string_lossy();
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    cmdline
        .split(|byte| *byte == 0)
        .any(|arg| arg.starts_with(prefix.as_bytes()))
}

/// Result of [`stop`].
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The process had already exited.
    AlreadyGone,
    /// The process exited after SIGTERM or SIGKILL.
    Stopped,
    /// The PID now belongs to a process that `up` did not start; it was
    /// left alone.
    NotOurs,
}

/// Stops a process that `up` started: SIGTERM, then SIGKILL after a grace
/// period. Processes whose command line does not name `dir` are left alone.
pub async fn stop(pid: u32, dir: &Path) -> Result<Stopped, RegistryError> {
    if !is_alive(pid) {
        return Ok(Stopped::AlreadyGone);
    }
    if !started_by_testenv(pid, dir) {
        return Ok(Stopped::NotOurs);
    }

    send_signal(pid, rustix::process::Signal::TERM, "SIGTERM")?;
    if wait_exit(pid, STOP_GRACE).await {
        return Ok(Stopped::Stopped);
    }

    send_signal(pid, rustix::process::Signal::KILL, "SIGKILL")?;
    if wait_exit(pid, Duration::from_secs(5)).await {
        return Ok(Stopped::Stopped);
    }
    Err(RegistryError::StillRunning { pid })
}

/// Stops a child of this process: SIGTERM, then SIGKILL after a grace
/// period, then reaps it. Holding the unreaped child guarantees that its
/// PID still names it, so no command line check is needed. That check
/// could also fail for a child that has only just called exec.
pub async fn stop_child(child: &mut Child) -> Result<(), RegistryError> {
    let pid = child.id();
    if let Ok(Some(_)) = child.try_wait() {
        return Ok(());
    }
    send_signal(pid, rustix::process::Signal::TERM, "SIGTERM")?;
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < STOP_GRACE {
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
    child.kill().map_err(|source| RegistryError::Signal {
        pid,
        signal: "SIGKILL",
        source,
    })?;
    child
        .wait()
        .map(drop)
        .map_err(|_| RegistryError::StillRunning { pid })
}

fn send_signal(
    pid: u32,
    signal: rustix::process::Signal,
    signal_name: &'static str,
) -> Result<(), RegistryError> {
    let Some(target) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(());
    };
    match rustix::process::kill_process(target, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(errno) => Err(RegistryError::Signal {
            pid,
            signal: signal_name,
            source: errno.into(),
        }),
    }
}

/// Polls until `pid` has exited; returns false when `limit` passes first.
async fn wait_exit(pid: u32, limit: Duration) -> bool {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < limit {
        if !is_alive(pid) {
            return true;
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
    !is_alive(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Ports;

    #[tokio::test]
    async fn stop_child_terminates_and_reaps() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pid = child.id();

        stop_child(&mut child).await.expect("stop child");

        assert!(!is_alive(pid));
        assert!(child.try_wait().expect("try_wait").is_some());
    }

    fn registries() -> [Registry; 3] {
        Registry::all(
            &Layout::new("/var/lib/hatoba-testenv"),
            &Ports::from_base(5000),
        )
    }

    #[test]
    fn open_config_has_storage_delete_and_address() {
        let [open, _, _] = registries();

        let yaml = open.config_yaml();

        assert!(yaml.starts_with("version: 0.1\n"));
        assert!(yaml.contains("rootdirectory: \"/var/lib/hatoba-testenv/open/storage\""));
        assert!(yaml.contains("delete:\n    enabled: true"));
        assert!(yaml.contains("addr: \"127.0.0.1:5000\""));
        assert!(!yaml.contains("auth:"));
    }

    #[test]
    fn basic_config_names_the_htpasswd_file() {
        let [_, basic, _] = registries();

        let yaml = basic.config_yaml();

        assert!(yaml.contains("htpasswd:"));
        assert!(yaml.contains("path: \"/var/lib/hatoba-testenv/basic/htpasswd\""));
    }

    #[test]
    fn token_config_names_realm_service_issuer_and_cert() {
        let [_, _, token] = registries();

        let yaml = token.config_yaml();

        assert!(yaml.contains("realm: \"http://127.0.0.1:5003/token\""));
        assert!(yaml.contains("service: \"hatoba-testenv-registry\""));
        assert!(yaml.contains("issuer: \"hatoba-testenv\""));
        assert!(yaml.contains("rootcertbundle: \"/var/lib/hatoba-testenv/token-server/cert.pem\""));
    }

    #[test]
    fn blob_data_path_follows_the_storage_layout() {
        let [open, _, _] = registries();

        let path = open.blob_data_path("sha256:abcdef");

        assert_eq!(
            path,
            PathBuf::from(
                "/var/lib/hatoba-testenv/open/storage/docker/registry/v2/blobs/sha256/ab/abcdef/data"
            )
        );
    }

    #[test]
    fn htpasswd_file_holds_a_bcrypt_hash() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("htpasswd");

        write_htpasswd(&path, "hatoba", "pw").expect("htpasswd runs");

        let text = std::fs::read_to_string(&path).expect("read htpasswd");
        assert!(text.starts_with("hatoba:$2y$"), "not bcrypt: {text}");
    }

    #[test]
    fn is_alive_tells_live_from_unknown_pids() {
        assert!(is_alive(std::process::id()));
        assert!(!is_alive(u32::MAX));
    }

    #[tokio::test]
    async fn stop_leaves_processes_of_other_programs_alone() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let pid = child.id();

        let outcome = stop(pid, Path::new("/var/lib/hatoba-testenv")).await;

        assert_eq!(outcome.expect("stop"), Stopped::NotOurs);
        assert!(is_alive(pid));
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
    }

    #[tokio::test]
    async fn stop_terminates_a_process_naming_the_dir() {
        let dir = tempfile::tempdir().expect("temp dir");
        let marker = dir.path().join("marker");
        std::fs::write(&marker, b"").expect("create marker");
        let mut child = Command::new("tail")
            .arg("-f")
            .arg(&marker)
            .spawn()
            .expect("start tail");
        let pid = child.id();

        // The kernel fills in the command line a moment after exec.
        for _ in 0..100 {
            if started_by_testenv(pid, dir.path()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let outcome = stop(pid, dir.path()).await;

        assert_eq!(outcome.expect("stop"), Stopped::Stopped);
        child.wait().expect("reap tail");
        assert!(!is_alive(pid));
    }
}
