//! Exclusive PID lock files that keep a second daemon off the same state,
//! root and socket.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

/// A lock failed to be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another hatoba daemon (pid {pid}) holds {}", path.display())]
    Held { path: PathBuf, pid: String },

    #[error("failed to open lock file {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to write our pid to lock file {}: {source}", path.display())]
    WritePid {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive `flock` on a file that contains the owner's PID. The kernel
/// releases the lock when the file closes, also when the daemon crashes,
/// so the file itself is left in place.
#[derive(Debug)]
pub struct PidLock {
    _file: File,
}

impl PidLock {
    /// Takes the lock without waiting and writes our PID into the file.
    /// Fails with [`LockError::Held`], naming the holder's PID, when another
    /// process has the lock.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.to_owned(),
                source,
            })?;

        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(errno) if errno == Errno::WOULDBLOCK => {
                return Err(LockError::Held {
                    path: path.to_owned(),
                    pid: holder_pid(path),
                });
            }
            Err(errno) => {
                return Err(LockError::Lock {
                    path: path.to_owned(),
                    source: errno.into(),
                });
            }
        }

        // Truncate only now: before the lock is ours the content is the holder's PID.
        let write_pid = |file: &mut File| {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_data()
        };
        write_pid(&mut file).map_err(|source| LockError::WritePid {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { _file: file })
    }
}

/// Reads the PID a lock holder wrote, or `unknown` when the file has none yet.
fn holder_pid(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .map_or_else(|| "unknown".to_owned(), |pid| pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_writes_our_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.lock");
        let _lock = PidLock::acquire(&path).expect("first lock succeeds");
        let text = std::fs::read_to_string(&path).expect("lock file is readable");
        assert_eq!(text, format!("{}\n", std::process::id()));
    }

    #[test]
    fn second_lock_fails_naming_the_holder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.lock");
        let _lock = PidLock::acquire(&path).expect("first lock succeeds");

        // flock locks belong to the open file, so a second open conflicts
        // even within one process.
        let error = PidLock::acquire(&path).expect_err("second lock fails");
        let expected = format!(
            "another hatoba daemon (pid {}) holds {}",
            std::process::id(),
            path.display()
        );
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn lock_is_free_again_after_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.lock");
        drop(PidLock::acquire(&path).expect("first lock succeeds"));
        PidLock::acquire(&path).expect("lock succeeds after the holder dropped it");
    }

    #[test]
    fn free_lock_replaces_stale_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hatoba.lock");
        std::fs::write(&path, "99999999\nleftover text\n").expect("write stale lock file");
        let _lock = PidLock::acquire(&path).expect("free lock succeeds");
        let text = std::fs::read_to_string(&path).expect("lock file is readable");
        assert_eq!(text, format!("{}\n", std::process::id()));
    }
}
