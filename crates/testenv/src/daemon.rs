//! Runs `hatoba daemon` on a fresh temporary directory for integration tests.
//!
//! Each [`Daemon`] owns a directory holding its config, socket, root, state
//! and log, so tests can run side by side. Dropping it kills the process
//! that is still running and removes the directory.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::VersionRequest;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::client::{self, ClientError};

/// Lines of the daemon's log quoted in errors.
const LOG_TAIL_LINES: usize = 60;

/// Pause between two readiness or exit checks.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Bound of one readiness probe, so a daemon that accepts connections but
/// never responds cannot stall the start past its deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starting, signalling or waiting for the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("failed to create a temporary directory for the daemon: {source}")]
    CreateDir {
        #[source]
        source: std::io::Error,
    },

    #[error("invalid extra daemon config: {source}")]
    ParseExtraConfig {
        #[source]
        source: toml::de::Error,
    },

    #[error("failed to serialize the daemon config: {source}")]
    SerializeConfig {
        #[source]
        source: toml::ser::Error,
    },

    #[error("failed to write the daemon config {path}: {source}")]
    WriteConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to open the daemon log {path}: {source}")]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "daemon exited with {status} before responding to Version on {socket}; log tail:\n{log_tail}"
    )]
    Exited {
        status: ExitStatus,
        socket: PathBuf,
        log_tail: String,
    },

    #[error(
        "daemon did not respond to Version on {socket} within {timeout:?}; log tail:\n{log_tail}"
    )]
    NotReady {
        socket: PathBuf,
        timeout: Duration,
        log_tail: String,
    },

    #[error("daemon pid {pid} did not exit within {timeout:?} of SIGTERM; log tail:\n{log_tail}")]
    StopTimeout {
        pid: u32,
        timeout: Duration,
        log_tail: String,
    },

    #[error("failed to send {signal} to daemon pid {pid}: {source}")]
    Signal {
        pid: u32,
        signal: &'static str,
        #[source]
        source: rustix::io::Errno,
    },

    #[error("failed to wait for daemon pid {pid}: {source}")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },

    #[error("the daemon is not running")]
    NotRunning,
}

/// How to start a [`Daemon`].
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Path of the `hatoba` binary.
    pub binary: PathBuf,
    /// Registry hosts (`127.0.0.1:5000`) written with `plain_http = true`.
    pub plain_http_registries: Vec<String>,
    /// TOML merged over the generated config, table by table, so it can add
    /// keys to `[image]` or a registry and override generated values.
    pub extra_config: String,
    /// Socket path. `None` puts it in the daemon's temporary directory.
    pub socket: Option<PathBuf>,
    /// Root directory. `None` puts it in the daemon's temporary directory.
    pub root: Option<PathBuf>,
    /// State directory. `None` puts it in the daemon's temporary directory.
    pub state: Option<PathBuf>,
    /// Value of the config's `log_level`.
    pub log_level: String,
    /// Maximum wait for the first response to `Version`.
    pub ready_timeout: Duration,
    /// Maximum wait for the exit after SIGTERM.
    pub stop_timeout: Duration,
}

impl DaemonOptions {
    /// Creates options for `binary` with every directory in a fresh
    /// temporary directory and no registry settings.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            plain_http_registries: Vec::new(),
            extra_config: String::new(),
            socket: None,
            root: None,
            state: None,
            log_level: "debug".to_owned(),
            ready_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
        }
    }

    /// Adds a registry host that the daemon talks plain HTTP to.
    pub fn plain_http_registry(mut self, host: impl Into<String>) -> Self {
        self.plain_http_registries.push(host.into());
        self
    }

    /// Appends TOML that is merged over the generated config.
    pub fn extra_config(mut self, toml: &str) -> Self {
        self.extra_config.push_str(toml);
        self.extra_config.push('\n');
        self
    }

    /// Uses `socket` instead of a socket in the temporary directory.
    pub fn socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.socket = Some(socket.into());
        self
    }

    /// Uses `root` instead of a root in the temporary directory.
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Uses `state` instead of a state directory in the temporary directory.
    pub fn state(mut self, state: impl Into<PathBuf>) -> Self {
        self.state = Some(state.into());
        self
    }
}

/// A running `hatoba daemon` process and the directory it works in.
#[derive(Debug)]
pub struct Daemon {
    dir: TempDir,
    binary: PathBuf,
    config_path: PathBuf,
    socket: PathBuf,
    root: PathBuf,
    state: PathBuf,
    log_path: PathBuf,
    ready_timeout: Duration,
    stop_timeout: Duration,
    child: Option<Child>,
}

impl Daemon {
    /// Writes the config, starts the daemon and waits until it responds to
    /// `Version` on its socket.
    pub async fn start(options: DaemonOptions) -> Result<Self, DaemonError> {
        let dir = tempfile::Builder::new()
            .prefix("hatoba-daemon-")
            .tempdir()
            .map_err(|source| DaemonError::CreateDir { source })?;
        let socket = options
            .socket
            .clone()
            .unwrap_or_else(|| dir.path().join("hatoba.sock"));
        let root = options
            .root
            .clone()
            .unwrap_or_else(|| dir.path().join("root"));
        let state = options
            .state
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let config_path = dir.path().join("config.toml");

        let config = render_config(&options, &socket, &root, &state)?;
        std::fs::write(&config_path, config).map_err(|source| DaemonError::WriteConfig {
            path: config_path.clone(),
            source,
        })?;

        let mut daemon = Self {
            log_path: dir.path().join("daemon.log"),
            dir,
            binary: options.binary,
            config_path,
            socket,
            root,
            state,
            ready_timeout: options.ready_timeout,
            stop_timeout: options.stop_timeout,
            child: None,
        };
        daemon.spawn_and_wait_ready().await?;
        Ok(daemon)
    }

    /// Returns the temporary directory that contains the config and the
    /// log, and the socket, root and state unless the options moved them.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the path of the CRI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Returns the daemon's root directory. Images are under `<root>/images`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the daemon's state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// Returns the path of the config file passed with `--config`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Returns the file that collects the daemon's stdout and stderr across
    /// restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Returns the PID of the running process, `None` after stop or kill.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reads the whole log. An unreadable log yields one line with the error.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|error| format!("<cannot read {}: {error}>", self.log_path.display()))
    }

    /// Returns the last lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Connects a RuntimeService and an ImageService client to the socket.
    pub async fn connect(
        &self,
    ) -> Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>), ClientError> {
        client::connect(&self.socket).await
    }

    /// Sends SIGTERM and waits for the exit. After the stop timeout the
    /// process gets SIGKILL and the stop fails.
    pub async fn stop(&mut self) -> Result<ExitStatus, DaemonError> {
        let Some(child) = self.child.as_mut() else {
            return Err(DaemonError::NotRunning);
        };
        let pid = child.id();
        signal(child, Signal::TERM, "SIGTERM")?;

        let deadline = Instant::now() + self.stop_timeout;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|source| DaemonError::Wait { pid, source })?
            {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill()?;
                return Err(DaemonError::StopTimeout {
                    pid,
                    timeout: self.stop_timeout,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus, DaemonError> {
        let Some(mut child) = self.child.take() else {
            return Err(DaemonError::NotRunning);
        };
        let pid = child.id();
        signal(&child, Signal::KILL, "SIGKILL")?;
        child
            .wait()
            .map_err(|source| DaemonError::Wait { pid, source })
    }

    /// Stops the process if it still runs, then starts a new one on the same
    /// config and directories and waits until it responds to `Version`.
    pub async fn restart(&mut self) -> Result<(), DaemonError> {
        if self.child.is_some() {
            self.stop().await?;
        }
        self.spawn_and_wait_ready().await
    }

    /// Starts the process and polls the socket until the process itself
    /// responds to `Version`, it exits, or the ready timeout passes.
    async fn spawn_and_wait_ready(&mut self) -> Result<(), DaemonError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|source| DaemonError::OpenLog {
                path: self.log_path.clone(),
                source,
            })?;
        let log_for_stdout = log.try_clone().map_err(|source| DaemonError::OpenLog {
            path: self.log_path.clone(),
            source,
        })?;
        let child = Command::new(&self.binary)
            .arg("daemon")
            .arg("--config")
            .arg(&self.config_path)
            // Relative paths in a bad config land in the temporary directory.
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_for_stdout))
            .stderr(Stdio::from(log))
            .env("RUST_BACKTRACE", "1")
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let pid = child.id();
        let child = self.child.insert(child);

        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|source| DaemonError::Wait { pid, source })?
            {
                self.child = None;
                return Err(DaemonError::Exited {
                    status,
                    socket: self.socket.clone(),
                    log_tail: self.log_tail(),
                });
            }
            if answers_version(&self.socket, pid).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // A process that never became ready is of no use to the test.
                let _ = self.kill();
                return Err(DaemonError::NotReady {
                    socket: self.socket.clone(),
                    timeout: self.ready_timeout,
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of hatoba daemon in {} ---\n{}\n--- end of log ---",
                self.dir.path().display(),
                self.log_tail()
            );
        }
        if let Some(mut child) = self.child.take() {
            // Errors are ignored because the process may have exited
            // already, and wait() below reaps it either way.
            let _ = signal(&child, Signal::KILL, "SIGKILL");
            let _ = child.wait();
        }
    }
}

/// Sends `sig` to the child. The child is not reaped yet, so its PID cannot
/// have been reused by another process.
fn signal(child: &Child, sig: Signal, name: &'static str) -> Result<(), DaemonError> {
    kill_process(Pid::from_child(child), sig).map_err(|source| DaemonError::Signal {
        pid: child.id(),
        signal: name,
        source,
    })
}

/// Checks that the process listening on `socket` is `pid` and that it
/// responds to `Version`. The PID check keeps a second daemon pointed at the
/// socket of a first one from looking ready because the first one responds.
async fn answers_version(socket: &Path, pid: u32) -> bool {
    let probe = async {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let peer = stream.peer_cred().ok()?.pid()?;
        if u32::try_from(peer).ok()? != pid {
            return None;
        }
        drop(stream);
        let (mut runtime, _) = client::connect(socket).await.ok()?;
        runtime.version(VersionRequest::default()).await.ok()
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(_))
    )
}

/// Builds the config file: paths, log level, one plain-HTTP section per
/// registry, then the extra TOML merged over it.
fn render_config(
    options: &DaemonOptions,
    socket: &Path,
    root: &Path,
    state: &Path,
) -> Result<String, DaemonError> {
    let mut config = toml::Table::new();
    config.insert("socket".into(), path_value(socket));
    config.insert("root".into(), path_value(root));
    config.insert("state".into(), path_value(state));
    config.insert("log_level".into(), options.log_level.clone().into());

    let mut registries = toml::Table::new();
    for host in &options.plain_http_registries {
        let mut registry = toml::Table::new();
        registry.insert("plain_http".into(), true.into());
        registries.insert(host.clone(), registry.into());
    }
    let mut image = toml::Table::new();
    image.insert("registries".into(), registries.into());
    config.insert("image".into(), image.into());

    let extra: toml::Table = options
        .extra_config
        .parse()
        .map_err(|source| DaemonError::ParseExtraConfig { source })?;
    merge(&mut config, extra);
    toml::to_string(&config).map_err(|source| DaemonError::SerializeConfig { source })
}

fn path_value(path: &Path) -> toml::Value {
    path.to_string_lossy().into_owned().into()
}

/// Merges `extra` into `base`. Tables merge key by key, and any other value
/// replaces the one in `base`.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(extra_table)) => {
                merge(base_table, extra_table);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_config_merges_extra_tables() {
        let options = DaemonOptions::new("/bin/false")
            .plain_http_registry("127.0.0.1:5000")
            .extra_config("log_level = \"trace\"\n[image.registries.\"127.0.0.1:5000\"]\nmirrors = [\"http://127.0.0.1:6000\"]");
        let text = render_config(
            &options,
            Path::new("/s.sock"),
            Path::new("/r"),
            Path::new("/st"),
        )
        .expect("config renders");
        let config: toml::Table = text.parse().expect("rendered config parses");

        assert_eq!(
            config["log_level"].as_str(),
            Some("trace"),
            "extra log_level should override the generated one"
        );
        let registry = &config["image"]["registries"]["127.0.0.1:5000"];
        assert_eq!(
            registry["plain_http"].as_bool(),
            Some(true),
            "generated plain_http should survive the merge"
        );
        assert_eq!(
            registry["mirrors"][0].as_str(),
            Some("http://127.0.0.1:6000"),
            "extra mirrors should be added to the registry table"
        );
        assert_eq!(
            config["socket"].as_str(),
            Some("/s.sock"),
            "socket should be the given path"
        );
    }

    #[test]
    fn render_config_rejects_invalid_toml() {
        let options = DaemonOptions::new("/bin/false").extra_config("this is not = = toml");
        let result = render_config(&options, Path::new("/s"), Path::new("/r"), Path::new("/t"));
        assert!(
            matches!(result, Err(DaemonError::ParseExtraConfig { .. })),
            "expected ParseExtraConfig, got {result:?}"
        );
    }

    #[tokio::test]
    async fn start_reports_early_exit() {
        let options = DaemonOptions::new("/bin/false");
        let result = Daemon::start(options).await;
        assert!(
            matches!(result, Err(DaemonError::Exited { .. })),
            "expected Exited for /bin/false, got {result:?}"
        );
    }
}
