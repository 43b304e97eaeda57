//! The daemon: takes the locks, opens the image store, binds the socket and
//! serves the CRI services and hatoba's own service until SIGTERM or SIGINT.

use std::ffi::OsString;
use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hatoba_image::{ImageError, ImageManager};
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;

use crate::authority::relay_connection;
use tonic::transport::Server;

use crate::lock::{LockError, PidLock};
use crate::proto::hatoba_server::HatobaServer;
use crate::{CriImageService, CriRuntimeService, DaemonConfig, HatobaService};

/// Largest gRPC message the daemon sends or accepts. A ListImages or
/// ListContainers response on a busy node can outgrow tonic's 4 MiB default.
const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// How long in-flight requests may run after SIGTERM before the daemon exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Mode of the socket: the owner and the socket group may connect.
const SOCKET_MODE: u32 = 0o660;

/// Mode of directories the daemon creates for the socket, state and root:
/// others may pass through to the socket but not list the directory.
const DIR_MODE: u32 = 0o711;

/// The daemon failed to start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("failed to install the {signal} handler: {source}")]
    InstallSignalHandler {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to set mode {mode:o} on directory {}: {source}", path.display())]
    SetDirMode {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Lock(#[from] LockError),

    #[error("failed to open the image store: {source}")]
    OpenImages {
        #[source]
        source: ImageError,
    },

    #[error("failed to clean upload directory {}: {source}", path.display())]
    CleanUploads {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{}: invalid socket_group: {group:?} is not a group in /etc/group; name a group from /etc/group or give a numeric GID",
        config_label(config_path.as_deref())
    )]
    UnknownGroup {
        config_path: Option<PathBuf>,
        group: String,
    },

    #[error("failed to read /etc/group to look up socket_group {group:?}: {source}")]
    ReadGroups {
        group: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{} exists and is not a socket: remove it or set `socket` to another path", path.display())]
    NotASocket { path: PathBuf },

    #[error("failed to remove stale socket {}: {source}", path.display())]
    RemoveStaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to {step} socket {}: {source}", path.display())]
    Socket {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the gRPC server failed: {source}")]
    Serve {
        #[source]
        source: tonic::transport::Error,
    },
}

/// Runs the daemon until SIGTERM or SIGINT, then removes the socket.
/// `config_path` is the file `config` came from, `None` for the defaults.
pub async fn serve(config: DaemonConfig, config_path: Option<PathBuf>) -> Result<(), ServerError> {
    // Install the handlers first, so a SIGTERM during startup stops the
    // daemon cleanly once it serves instead of killing it halfway.
    let shutdown = ShutdownSignals::install()?;

    // The group is part of the config: a wrong one fails before anything is created.
    let group = match config.socket_group.as_str() {
        "" => None,
        name => Some(lookup_group(name, config_path.as_deref())?),
    };

    create_dir(&config.state, DIR_MODE)?;
    create_dir(&config.root, DIR_MODE)?;
    if let Some(parent) = config.socket.parent() {
        create_dir(parent, DIR_MODE)?;
    }
    let _locks = acquire_locks(&config)?;

    let images = ImageManager::open(config.image_config())
        .await
        .map_err(|source| ServerError::OpenImages { source })?;
    let images = Arc::new(images);
    let upload_dir = prepare_upload_dir(&config.root)?;

    let listener = bind_socket(&config.socket, group)?;
    tracing::info!(
        socket = %config.socket.display(),
        root = %config.root.display(),
        version = crate::RUNTIME_VERSION,
        "hatoba daemon is serving"
    );

    let runtime = RuntimeServiceServer::new(CriRuntimeService::new(config.clone(), config_path))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let image = ImageServiceServer::new(CriImageService::new(Arc::clone(&images)))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let hatoba = HatobaServer::new(HatobaService::new(images, upload_dir));
    let router = Server::builder()
        .add_service(runtime)
        .add_service(image)
        .add_service(hatoba);

    let result = run_until_signal(router, listener, shutdown).await;
    remove_socket(&config.socket);
    result?;
    tracing::info!("hatoba daemon stopped");
    Ok(())
}

/// Serves until a signal arrives, then lets in-flight requests finish for
/// at most [`SHUTDOWN_GRACE`].
async fn run_until_signal(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    mut signals: ShutdownSignals,
) -> Result<(), ServerError> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = UnixListenerStream::new(listener).map(|accepted| accepted.map(relay_connection));
    let server = router.serve_with_incoming_shutdown(incoming, async {
        // A dropped sender also means stop.
        let _ = stopped.await;
    });
    tokio::pin!(server);

    let result = tokio::select! {
        result = &mut server => result,
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down");
            let _ = stop.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        grace_seconds = SHUTDOWN_GRACE.as_secs(),
                        "requests still running at the end of the shutdown grace period are cut off"
                    );
                    Ok(())
                }
            }
        }
    };
    result.map_err(|source| ServerError::Serve { source })
}

/// SIGTERM and SIGINT streams.
struct ShutdownSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self, ServerError> {
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| ServerError::InstallSignalHandler {
                signal: name,
                source,
            })
        };
        Ok(Self {
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// Waits for the next signal and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Creates `path` and its missing parents with `mode`. The mode is set
/// explicitly, because a umask like 077 would otherwise shut the socket
/// group out of the socket's directory. Existing directories keep theirs.
fn create_dir(path: &Path, mode: u32) -> Result<(), ServerError> {
    let missing: Vec<&Path> = path
        .ancestors()
        .filter(|dir| !dir.as_os_str().is_empty())
        .take_while(|dir| {
            matches!(std::fs::symlink_metadata(dir), Err(error) if error.kind() == std::io::ErrorKind::NotFound)
        })
        .collect();

    for dir in missing.into_iter().rev() {
        match DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            // Another process created it meanwhile: its mode is not ours to change.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {
                continue;
            }
            Err(source) => {
                return Err(ServerError::CreateDir {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|source| {
            ServerError::SetDirMode {
                path: dir.to_owned(),
                mode,
                source,
            }
        })?;
    }

    // An existing path that is not a directory fails here, as it would
    // when the daemon first writes into it.
    if !path.is_dir() {
        return Err(ServerError::CreateDir {
            path: path.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
        });
    }
    Ok(())
}

/// Locks `<state>/hatoba.lock`, `<root>/hatoba.lock` and `<socket>.lock`, so
/// no two daemons share any of them. A path that two settings share is
/// locked once, because a second `flock` from this process would conflict.
fn acquire_locks(config: &DaemonConfig) -> Result<Vec<PidLock>, ServerError> {
    let mut socket_lock = OsString::from(config.socket.as_os_str());
    socket_lock.push(".lock");
    let paths = [
        config.state.join("hatoba.lock"),
        config.root.join("hatoba.lock"),
        PathBuf::from(socket_lock),
    ];

    let mut seen: Vec<PathBuf> = Vec::new();
    let mut locks = Vec::new();
    for path in paths {
        let identity = canonical_lock_path(&path);
        if seen.contains(&identity) {
            continue;
        }
        locks.push(PidLock::acquire(&path)?);
        seen.push(identity);
    }
    Ok(locks)
}

/// Resolves the directory of a lock file, so `/run/hatoba/` and
/// `/run/hatoba/.` name the same lock.
fn canonical_lock_path(path: &Path) -> PathBuf {
    let parent = path.parent().and_then(|dir| dir.canonicalize().ok());
    match (parent, path.file_name()) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => path.to_owned(),
    }
}

/// Creates `<root>/uploads` for archives streamed by `hatoba image load`
/// and deletes the ones a crashed daemon left there.
fn prepare_upload_dir(root: &Path) -> Result<PathBuf, ServerError> {
    let dir = root.join("uploads");
    create_dir(&dir, 0o700)?;
    let clean_failed = |source| ServerError::CleanUploads {
        path: dir.clone(),
        source,
    };

    for entry in std::fs::read_dir(&dir).map_err(clean_failed)? {
        let path = entry.map_err(clean_failed)?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // Only names that HatobaService creates, because the directory may contain other files.
        if name.starts_with("load-") && name.ends_with(".tar") {
            std::fs::remove_file(&path).map_err(clean_failed)?;
        }
    }
    Ok(dir)
}

/// Finds the group ID of `group`, a name in /etc/group or a number. A
/// number is taken as it is: a GID need not have a name. `config_path` is
/// the file that named the group, for the error.
// NOTE: groups served only by NSS modules (LDAP, sssd) are not found.
fn lookup_group(group: &str, config_path: Option<&Path>) -> Result<u32, ServerError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").map_err(|source| ServerError::ReadGroups {
        group: group.to_owned(),
        source,
    })?;
    find_group(&text, group).ok_or_else(|| ServerError::UnknownGroup {
        config_path: config_path.map(Path::to_owned),
        group: group.to_owned(),
    })
}

/// Names where the config came from, to start a config error with.
fn config_label(config_path: Option<&Path>) -> String {
    config_path.map_or_else(
        || "built-in config".to_owned(),
        |path| path.display().to_string(),
    )
}

/// Finds a group's ID in the text of an /etc/group file.
fn find_group(etc_group: &str, group: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _password = fields.next()?;
        let gid = fields.next()?;
        (name == group).then(|| gid.parse().ok()).flatten()
    })
}

/// Binds the socket at `path` with mode 0660, owned by `group` if given.
///
/// `connect` succeeds into the listen backlog as soon as the socket is
/// bound, so the socket must never exist at `path` with a looser mode. It
/// is bound in a private directory, given its mode and group there, and
/// renamed into place.
fn bind_socket(path: &Path, group: Option<u32>) -> Result<UnixListener, ServerError> {
    let socket_error = |step, source| ServerError::Socket {
        step,
        path: path.to_owned(),
        source,
    };
    remove_stale_socket(path)?;

    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("/"));
    let private_dir = tempfile::Builder::new()
        .prefix(".hatoba-bind-")
        .tempdir_in(parent)
        .map_err(|source| socket_error("create a private directory for", source))?;
    let staging = private_dir.path().join("hatoba.sock");

    let listener = UnixListener::bind(&staging).map_err(|source| socket_error("bind", source))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|source| socket_error("set the mode of", source))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&staging, None, Some(gid))
            .map_err(|source| socket_error("set the group of", source))?;
    }
    std::fs::rename(&staging, path).map_err(|source| socket_error("move into place", source))?;
    Ok(listener)
}

/// Removes a socket file that a crashed daemon left behind. Only called
/// while holding the socket lock, so no live daemon serves on it.
fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::RemoveStaleSocket {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    std::fs::remove_file(path).map_err(|source| ServerError::RemoveStaleSocket {
        path: path.to_owned(),
        source,
    })
}

/// Removes our socket at shutdown. A failure is only logged, because the
/// daemon is exiting anyway and the next start removes a stale socket.
fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(socket = %path.display(), %error, "failed to remove the socket at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn find_group_reads_etc_group_lines() {
        let text = "root:x:0:\nhatoba:x:1234:alice,bob\nbroken\nstaff:x:notanumber:\n";
        assert_eq!(find_group(text, "root"), Some(0));
        assert_eq!(find_group(text, "hatoba"), Some(1234));
        assert_eq!(find_group(text, "staff"), None);
        assert_eq!(find_group(text, "missing"), None);
        assert_eq!(find_group(text, "broken"), None);
    }

    #[test]
    fn numeric_socket_group_needs_no_lookup() {
        assert_eq!(lookup_group("4321", None).expect("numeric group"), 4321);
    }

    #[test]
    fn unnamed_numeric_group_is_accepted() {
        let text = std::fs::read_to_string("/etc/group").expect("read /etc/group");
        let unnamed = (60_000..u32::MAX)
            .find(|gid| {
                !text
                    .lines()
                    .any(|line| line.split(':').nth(2) == Some(gid.to_string().as_str()))
            })
            .expect("a GID without a name");
        assert_eq!(
            lookup_group(&unnamed.to_string(), None).expect("numeric group"),
            unnamed
        );
    }

    #[test]
    fn unknown_socket_group_is_an_error() {
        let error = lookup_group("hatoba-no-such-group", None).expect_err("unknown group fails");
        assert_eq!(
            error.to_string(),
            "built-in config: invalid socket_group: \"hatoba-no-such-group\" is not a group in \
             /etc/group; name a group from /etc/group or give a numeric GID"
        );
    }

    #[test]
    fn unknown_group_names_config_file() {
        let config_path = Path::new("/etc/hatoba/config.toml");
        let error = lookup_group("hatoba-no-such-group", Some(config_path))
            .expect_err("unknown group fails");
        let message = error.to_string();
        assert!(
            message.starts_with(
                "/etc/hatoba/config.toml: invalid socket_group: \"hatoba-no-such-group\""
            ),
            "{message}"
        );
    }

    #[test]
    fn created_directories_get_their_mode_exactly() {
        let dir = tempfile::tempdir().expect("temp dir");
        let nested = dir.path().join("run/hatoba");

        create_dir(&nested, 0o711).expect("create nested directories");
        create_dir(&nested.join("private"), 0o700).expect("create a private directory");

        for (path, mode) in [
            (dir.path().join("run"), 0o711),
            (nested.clone(), 0o711),
            (nested.join("private"), 0o700),
        ] {
            let metadata = std::fs::metadata(&path).expect("directory exists");
            assert_eq!(metadata.mode() & 0o7777, mode, "{}", path.display());
        }
    }

    #[test]
    fn existing_directory_keeps_its_mode() {
        let dir = tempfile::tempdir().expect("temp dir");
        let existing = dir.path().join("existing");
        std::fs::create_dir(&existing).expect("create directory");
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o750))
            .expect("set mode");

        create_dir(&existing, 0o711).expect("existing directory is fine");

        let metadata = std::fs::metadata(&existing).expect("directory exists");
        assert_eq!(metadata.mode() & 0o7777, 0o750);
    }

    #[test]
    fn create_dir_rejects_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("file");
        std::fs::write(&file, "").expect("write file");

        let error = create_dir(&file, 0o711).expect_err("a file is not a directory");
        assert!(matches!(error, ServerError::CreateDir { .. }), "{error}");
        let error = create_dir(&file.join("below"), 0o711).expect_err("nothing below a file");
        assert!(matches!(error, ServerError::CreateDir { .. }), "{error}");
    }

    #[tokio::test]
    async fn socket_is_created_with_mode_0660() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.sock");
        let _listener = bind_socket(&path, None).expect("bind succeeds");

        let metadata = std::fs::symlink_metadata(&path).expect("socket exists");
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.mode() & 0o7777, 0o660);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read temp dir")
            .map(|entry| entry.expect("dir entry").file_name())
            .collect();
        assert_eq!(leftovers, [OsString::from("hatoba.sock")]);
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.sock");
        drop(bind_socket(&path, None).expect("first bind succeeds"));
        assert!(path.exists(), "a dropped listener leaves its socket file");

        let _listener = bind_socket(&path, None).expect("bind over a stale socket succeeds");
        tokio::net::UnixStream::connect(&path)
            .await
            .expect("the new socket accepts connections");
    }

    #[tokio::test]
    async fn regular_file_at_socket_path_is_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.sock");
        std::fs::write(&path, "not a socket").expect("write file");

        let error = bind_socket(&path, None).expect_err("bind over a regular file fails");
        assert!(matches!(error, ServerError::NotASocket { .. }), "{error}");
        let text = std::fs::read_to_string(&path).expect("file is still there");
        assert_eq!(text, "not a socket");
    }

    #[test]
    fn locks_cover_state_root_and_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = DaemonConfig {
            socket: dir.path().join("run/hatoba.sock"),
            root: dir.path().join("lib"),
            state: dir.path().join("run"),
            ..DaemonConfig::default()
        };
        for path in [&config.root, &config.state] {
            std::fs::create_dir_all(path).expect("create dir");
        }

        let locks = acquire_locks(&config).expect("locks succeed");
        assert_eq!(locks.len(), 3);
        assert!(dir.path().join("run/hatoba.lock").exists());
        assert!(dir.path().join("lib/hatoba.lock").exists());
        assert!(dir.path().join("run/hatoba.sock.lock").exists());

        let error = acquire_locks(&config).expect_err("a second daemon is refused");
        let message = error.to_string();
        assert!(
            message.starts_with("another hatoba daemon (pid "),
            "{message}"
        );
    }

    #[test]
    fn shared_state_and_root_are_locked_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = DaemonConfig {
            socket: dir.path().join("hatoba.sock"),
            root: dir.path().to_owned(),
            state: dir.path().join("."),
            ..DaemonConfig::default()
        };
        let locks = acquire_locks(&config).expect("locks succeed");
        assert_eq!(locks.len(), 2);
    }

    #[test]
    fn upload_dir_keeps_files_it_did_not_create() {
        let dir = tempfile::tempdir().expect("temp dir");
        let uploads = dir.path().join("uploads");
        std::fs::create_dir(&uploads).expect("create uploads");
        std::fs::write(uploads.join("load-abc.tar"), "partial").expect("write upload");
        std::fs::write(uploads.join("notes.txt"), "keep").expect("write other file");

        let prepared = prepare_upload_dir(dir.path()).expect("upload dir is prepared");
        assert_eq!(prepared, uploads);
        assert!(!uploads.join("load-abc.tar").exists());
        assert!(uploads.join("notes.txt").exists());
    }
}
