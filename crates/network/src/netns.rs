//! Pinned pod namespaces: network, IPC and UTS namespaces kept alive by bind
//! mounts under a sandbox's state directory, so no pause process has to keep them.
//!
//! A pinned namespace lives until its bind mount is removed, even with no
//! process in it. CNI plugins and the OCI runtime join it through its path.

use std::ffi::OsString;
use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::io::Errno;
use rustix::mount::{UnmountFlags, unmount};
use serde_json::{Map, Value};

use crate::config::{NetworkConfigList, PluginConfig};
use crate::invoke::{self, Attachment, InvokeError, ListCall, PluginRunner, PodIdentity};

/// The util-linux tool that creates and pins the namespaces.
pub const UNSHARE: &str = "/usr/bin/unshare";

/// `f_type` of the nsfs filesystem, which backs every namespace file.
pub const NSFS_MAGIC: u64 = 0x6e73_6673;

/// Mode of the pin directory: other users can open the files by path but
/// cannot list the directory.
const DIR_MODE: u32 = 0o711;

/// A loopback ADD only sets a link up, so a longer run means a stuck plugin.
const LOOPBACK_TIMEOUT: Duration = Duration::from_secs(30);

/// A namespace kind a pod shares among its containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Net,
    Ipc,
    Uts,
}

impl Kind {
    /// Every kind, in the order `unpin` walks them.
    pub const ALL: [Kind; 3] = [Kind::Net, Kind::Ipc, Kind::Uts];

    /// Returns the name of the pin file, which is also the `unshare` option.
    pub fn file_name(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Ipc => "ipc",
            Kind::Uts => "uts",
        }
    }
}

/// Failure of a step of pinning, unpinning or setting up a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("create namespace directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("set mode of namespace directory {path}: {source}")]
    ChmodDir { path: PathBuf, source: io::Error },
    #[error(
        "namespace file {path} already exists; unpin the sandbox's namespaces \
         before pinning them again"
    )]
    TargetExists { path: PathBuf },
    #[error("create namespace file {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("start {UNSHARE} to pin namespaces in {dir}: {source}; install util-linux")]
    SpawnUnshare { dir: PathBuf, source: io::Error },
    #[error("{UNSHARE} failed to pin namespaces in {dir} with {status}: {stderr}")]
    Unshare {
        dir: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("unmount namespace file {path}: {source}")]
    Unmount { path: PathBuf, source: Errno },
    #[error("remove namespace file {path}: {source}")]
    RemoveFile { path: PathBuf, source: io::Error },
    #[error("remove namespace directory {path}: {source}")]
    RemoveDir { path: PathBuf, source: io::Error },
    #[error("statfs {path}: {source}")]
    Statfs { path: PathBuf, source: Errno },
    #[error("bring up loopback in {netns}: {source}")]
    Loopback {
        netns: PathBuf,
        source: Box<InvokeError>,
    },
}

/// Namespaces pinned under one directory. Dropping this value keeps them
/// pinned, and [`unpin`] releases them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedNamespaces {
    dir: PathBuf,
    kinds: Vec<Kind>,
}

impl PinnedNamespaces {
    /// Returns the directory holding the pin files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the kinds that were pinned.
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// Returns the pin file of `kind`, if that kind was pinned.
    pub fn path(&self, kind: Kind) -> Option<PathBuf> {
        self.kinds
            .contains(&kind)
            .then(|| self.dir.join(kind.file_name()))
    }
}

/// Creates `dir` and pins a new namespace of each kind onto `dir/<kind>`.
/// On failure nothing it created stays mounted or on disk.
pub async fn pin(dir: &Path, kinds: &[Kind]) -> Result<PinnedNamespaces, NetnsError> {
    let mut unique: Vec<Kind> = Vec::new();
    for kind in kinds {
        if !unique.contains(kind) {
            unique.push(*kind);
        }
    }
    let mut rollback = Rollback {
        dir: dir.to_path_buf(),
        remove_dir: !dir.exists(),
        files: Vec::new(),
    };

    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| NetnsError::CreateDir {
            path: dir.into(),
            source,
        })?;

    // The umask may have cleared bits of the requested mode.
    let mode = std::fs::Permissions::from_mode(DIR_MODE);
    std::fs::set_permissions(dir, mode).map_err(|source| NetnsError::ChmodDir {
        path: dir.into(),
        source,
    })?;

    // unshare(1) of util-linux 2.38 bind-mounts onto existing files only.
    // Creating them with create_new also rejects a target already there.
    for kind in &unique {
        let path = dir.join(kind.file_name());
        create_target(&path)?;
        rollback.files.push(path);
    }

    if !unique.is_empty() {
        run_unshare(dir, &unique).await?;
    }

    rollback.files.clear();
    rollback.remove_dir = false;
    Ok(PinnedNamespaces {
        dir: dir.into(),
        kinds: unique,
    })
}

fn create_target(path: &Path) -> Result<(), NetnsError> {
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            Err(NetnsError::TargetExists { path: path.into() })
        }
        Err(source) => Err(NetnsError::CreateFile {
            path: path.into(),
            source,
        }),
    }
}

/// Runs `unshare --net=DIR/net ... true`, which creates the namespaces and
/// bind-mounts them onto the pin files before `true` exits.
async fn run_unshare(dir: &Path, kinds: &[Kind]) -> Result<(), NetnsError> {
    // An external tool, because rustix 1.1 offers unshare(2) only as unsafe
    // (`unshare_unsafe`), and it would move the calling thread, a worker of
    // the async runtime, into the new namespaces.
    let mut command = tokio::process::Command::new(UNSHARE);
    for kind in kinds {
        let mut option = OsString::from(format!("--{}=", kind.file_name()));
        option.push(dir.join(kind.file_name()));
        command.arg(option);
    }
    let output = command
        .arg("true")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // A fixed locale keeps its messages in English for the error.
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| NetnsError::SpawnUnshare {
            dir: dir.into(),
            source,
        })?;

    if output.status.success() {
        return Ok(());
    }
    Err(NetnsError::Unshare {
        dir: dir.into(),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// Undoes a pin that did not complete, also when its future is dropped
/// midway: unmounts and removes the files `pin` created, then the directory
/// if `pin` created it and it is empty.
struct Rollback {
    dir: PathBuf,
    remove_dir: bool,
    files: Vec<PathBuf>,
}

impl Drop for Rollback {
    fn drop(&mut self) {
        // Best effort: the error that caused the rollback is what the caller
        // needs, and unpin later retries whatever is left.
        for file in &self.files {
            let _ = release(file);
        }
        if self.remove_dir {
            let _ = remove_empty_dir(&self.dir);
        }
    }
}

/// Unmounts and removes the pin files under `dir`, then `dir` if it is
/// empty. It succeeds when some or all of them are already gone.
pub fn unpin(dir: &Path) -> Result<(), NetnsError> {
    for kind in Kind::ALL {
        release(&dir.join(kind.file_name()))?;
    }
    remove_empty_dir(dir)
}

/// Unmounts `path` if it is mounted on, then removes it.
fn release(path: &Path) -> Result<(), NetnsError> {
    // NOFOLLOW: a symlink planted in place of a pin file must not redirect
    // the unmount elsewhere.
    let flags = UnmountFlags::DETACH | UnmountFlags::NOFOLLOW;
    loop {
        match unmount(path, flags) {
            // Pinning twice stacks mounts, so repeat until the file is bare.
            Ok(()) => continue,
            // EINVAL: not a mount point. ENOENT: the file is gone.
            Err(Errno::INVAL | Errno::NOENT) => break,
            Err(source) => {
                return Err(NetnsError::Unmount {
                    path: path.into(),
                    source,
                });
            }
        }
    }

    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(NetnsError::RemoveFile {
            path: path.into(),
            source: error,
        }),
        _ => Ok(()),
    }
}

fn remove_empty_dir(dir: &Path) -> Result<(), NetnsError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(source) => Err(NetnsError::RemoveDir {
            path: dir.into(),
            source,
        }),
    }
}

/// Reports whether `path` is a namespace file, that is, lies on nsfs. A
/// missing path is not pinned.
pub fn is_pinned(path: &Path) -> Result<bool, NetnsError> {
    match rustix::fs::statfs(path) {
        Ok(stats) => Ok(u64::try_from(stats.f_type).is_ok_and(|kind| kind == NSFS_MAGIC)),
        Err(Errno::NOENT) => Ok(false),
        Err(source) => Err(NetnsError::Statfs {
            path: path.into(),
            source,
        }),
    }
}

/// Sets up the loopback interface in the network namespace pinned at
/// `netns` by running the CNI `loopback` plugin found in `bin_dirs`.
pub async fn bring_up_loopback<R: PluginRunner>(
    netns: &Path,
    bin_dirs: &[PathBuf],
    runner: &R,
) -> Result<(), NetnsError> {
    let failed = |source| NetnsError::Loopback {
        netns: netns.into(),
        source: Box::new(source),
    };
    let mut raw = Map::new();
    raw.insert("type".into(), Value::String("loopback".into()));
    let list = NetworkConfigList {
        name: "loopback".into(),
        cni_version: "1.0.0".into(),
        disable_check: false,
        plugins: vec![PluginConfig {
            plugin_type: "loopback".into(),
            raw,
        }],
    };
    // The loopback plugin keeps no state per container, and `lo` goes away
    // with its namespace without a DEL, so a fixed container id is enough.
    let attachment = Attachment {
        pod: PodIdentity {
            namespace: String::new(),
            name: String::new(),
            uid: String::new(),
            sandbox_id: "hatoba-loopback".into(),
        },
        netns: netns.into(),
        ifname: "lo".into(),
        port_mappings: Vec::new(),
        dns: None,
    };
    let call = ListCall {
        list: &list,
        attachment: &attachment,
        bin_dirs,
        timeout: LOOPBACK_TIMEOUT,
    };

    invoke::add_list(runner, &call).await.map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::invoke::DEFAULT_BIN_DIRS;
    use crate::runner::ProcessRunner;
    use crate::runner::tests::SCRIPTS;

    const NSENTER: &str = "/usr/bin/nsenter";

    /// Unpins on drop, so a failing assertion leaves no mount behind.
    struct Unpinned(PathBuf);

    impl Drop for Unpinned {
        fn drop(&mut self) {
            if let Err(error) = unpin(&self.0) {
                eprintln!("cleanup of {}: {error}", self.0.display());
            }
        }
    }

    fn temp_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("hatoba-netns-test")
            .tempdir()
            .expect("tempdir")
    }

    /// Returns whether the root-only tests can run: as root with the tools
    /// present. Under CI=true a missing tool fails the test instead.
    fn can_run(tools: &[PathBuf]) -> bool {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: not root");
            return false;
        }
        let missing: Vec<String> = tools
            .iter()
            .filter(|tool| !tool.is_file())
            .map(|tool| tool.display().to_string())
            .collect();
        if missing.is_empty() {
            return true;
        }
        let reason = format!("missing {}", missing.join(", "));
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
        println!("skipped: {reason}");
        false
    }

    fn loopback_plugin() -> PathBuf {
        DEFAULT_BIN_DIRS
            .iter()
            .map(|dir| Path::new(dir).join("loopback"))
            .find(|path| path.is_file())
            .unwrap_or_else(|| Path::new(DEFAULT_BIN_DIRS[0]).join("loopback"))
    }

    /// Returns the mount points at or under `dir` in this mount namespace.
    fn mounts_under(dir: &Path) -> Vec<String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        mountinfo
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| Path::new(point).starts_with(dir))
            .map(str::to_owned)
            .collect()
    }

    /// Runs `ip -o ARGS` in the network namespace pinned at `netns`.
    async fn ip_in(netns: &Path, args: &[&str]) -> String {
        let mut net = OsString::from("--net=");
        net.push(netns);
        let output = tokio::process::Command::new(NSENTER)
            .arg(net)
            .args(["ip", "-o"])
            .args(args)
            .output()
            .await
            .expect("start nsenter");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "ip {args:?}: {stderr}");
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Returns the flags of `lo`, such as `LOOPBACK,UP,LOWER_UP`.
    async fn lo_flags(netns: &Path) -> Vec<String> {
        let link = ip_in(netns, &["link", "show", "dev", "lo"]).await;
        let flags = link
            .split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(flags, _)| flags)
            .expect("flags in ip link output");
        flags.split(',').map(str::to_owned).collect()
    }

    #[tokio::test]
    async fn pin_then_unpin_leaves_nothing() {
        if !can_run(&[UNSHARE.into()]) {
            return;
        }
        let _shared = SCRIPTS.read().await;
        let temp = temp_dir();
        let dir = temp.path().join("sb1");
        let _cleanup = Unpinned(dir.clone());

        let pinned = pin(&dir, &Kind::ALL).await.expect("pin");

        assert_eq!(pinned.kinds(), Kind::ALL);
        let mode = std::fs::metadata(&dir).expect("stat dir").mode();
        assert_eq!(mode & 0o7777, DIR_MODE);
        for kind in Kind::ALL {
            let path = pinned.path(kind).expect("kind pinned");
            assert!(is_pinned(&path).expect("statfs"), "{}", path.display());
        }
        let own = std::fs::metadata("/proc/self/ns/net").expect("own netns");
        let net = std::fs::metadata(dir.join("net")).expect("pinned netns");
        assert_ne!(own.ino(), net.ino(), "pinned the test's own netns");
        assert_eq!(mounts_under(temp.path()).len(), 3);

        unpin(&dir).expect("unpin");

        assert_eq!(mounts_under(temp.path()), Vec::<String>::new());
        assert!(!dir.exists(), "{} left behind", dir.display());
        unpin(&dir).expect("second unpin");
    }

    #[tokio::test]
    async fn loopback_comes_up_in_pinned_netns() {
        let plugin = loopback_plugin();
        if !can_run(&[UNSHARE.into(), NSENTER.into(), plugin.clone()]) {
            return;
        }
        let _shared = SCRIPTS.read().await;
        let temp = temp_dir();
        let dir = temp.path().join("sb1");
        let _cleanup = Unpinned(dir.clone());
        let pinned = pin(&dir, &[Kind::Net]).await.expect("pin");
        let netns = pinned.path(Kind::Net).expect("net pinned");
        assert!(!lo_flags(&netns).await.contains(&"UP".to_owned()));
        let bin_dirs: Vec<PathBuf> = plugin.parent().into_iter().map(Path::to_path_buf).collect();

        bring_up_loopback(&netns, &bin_dirs, &ProcessRunner)
            .await
            .expect("loopback ADD");

        assert!(lo_flags(&netns).await.contains(&"UP".to_owned()));
        let addresses = ip_in(&netns, &["addr", "show", "dev", "lo"]).await;
        assert!(addresses.contains("inet 127.0.0.1/8"), "{addresses}");
        unpin(&dir).expect("unpin");
        assert_eq!(mounts_under(temp.path()), Vec::<String>::new());
    }

    #[tokio::test]
    async fn pin_keeps_existing_target_file() {
        if !can_run(&[UNSHARE.into()]) {
            return;
        }
        let _shared = SCRIPTS.read().await;
        let temp = temp_dir();
        let dir = temp.path();
        let _cleanup = Unpinned(dir.to_path_buf());
        let existing = dir.join("net");
        std::fs::write(&existing, "keep").expect("write existing file");

        // Net comes last, so the ipc and uts files exist when pin fails.
        let error = pin(dir, &[Kind::Ipc, Kind::Uts, Kind::Net])
            .await
            .expect_err("net exists");

        assert!(
            matches!(&error, NetnsError::TargetExists { path } if *path == existing),
            "{error}"
        );
        assert_eq!(std::fs::read_to_string(&existing).expect("read"), "keep");
        assert!(!dir.join("ipc").exists());
        assert!(!dir.join("uts").exists());
        assert_eq!(mounts_under(dir), Vec::<String>::new());
    }

    #[tokio::test]
    async fn unpin_succeeds_on_partial_state() {
        if !can_run(&[UNSHARE.into()]) {
            return;
        }
        let _shared = SCRIPTS.read().await;
        let temp = temp_dir();
        let dir = temp.path().join("sb1");
        let _cleanup = Unpinned(dir.clone());
        pin(&dir, &[Kind::Ipc]).await.expect("pin");
        // A pin that stopped after creating its file, before mounting.
        std::fs::write(dir.join("net"), "").expect("write bare file");

        unpin(&dir).expect("unpin");

        assert_eq!(mounts_under(temp.path()), Vec::<String>::new());
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn unpin_of_missing_dir_succeeds() {
        if !can_run(&[]) {
            return;
        }
        let temp = temp_dir();

        unpin(&temp.path().join("never-pinned")).expect("unpin");
    }

    #[test]
    fn plain_file_is_not_pinned() {
        let temp = temp_dir();
        let file = temp.path().join("net");
        std::fs::write(&file, "").expect("write file");

        assert!(!is_pinned(&file).expect("statfs"));
        assert!(!is_pinned(&temp.path().join("missing")).expect("statfs"));
    }
}
