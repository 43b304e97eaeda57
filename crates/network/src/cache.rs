//! Per-sandbox cache of the ADD result and the exact list it was made with,
//! so DEL and CHECK work after a config change or a daemon restart.
//!
//! These are synchronous file operations, so async callers run them on a
//! blocking thread.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, NetworkConfigList};

/// Format of the cache file, raised when its layout changes.
pub const CACHE_FORMAT: u32 = 1;

/// Failure to read or write a sandbox's cache entry.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("sandbox id {sandbox_id:?} cannot name a cache file")]
    InvalidSandboxId { sandbox_id: String },
    #[error("create CNI cache directory {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("encode CNI cache entry for sandbox {sandbox_id}: {source}")]
    Encode {
        sandbox_id: String,
        source: serde_json::Error,
    },
    #[error("write CNI cache file {file}: {source}")]
    Write {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("sync CNI cache file {file}: {source}")]
    Sync {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("rename CNI cache file into {file}: {source}")]
    Rename {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("read CNI cache file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("decode CNI cache file {file}: {source}")]
    Decode {
        file: PathBuf,
        source: serde_json::Error,
    },
    #[error("CNI cache file {file} has format {found}, expected {CACHE_FORMAT}")]
    Format { file: PathBuf, found: u32 },
    #[error("remove CNI cache file {file}: {source}")]
    Remove {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// Record of how a sandbox's network was set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedAttachment {
    pub format: u32,
    pub sandbox_id: String,
    pub ifname: String,
    /// The configuration list exactly as it was used for ADD.
    pub config: Value,
    /// The last plugin's ADD result as printed.
    pub result: Value,
}

impl CachedAttachment {
    /// Records the list and ADD result of `sandbox_id`.
    pub fn new(sandbox_id: &str, ifname: &str, list: &NetworkConfigList, result: Value) -> Self {
        Self {
            format: CACHE_FORMAT,
            sandbox_id: sandbox_id.into(),
            ifname: ifname.into(),
            config: list.to_json(),
            result,
        }
    }

    /// Returns the cached list after validating it again. `file` names it in
    /// errors.
    pub fn list(&self, file: &Path) -> Result<NetworkConfigList, ConfigError> {
        NetworkConfigList::from_value(self.config.clone(), file)
    }
}

/// Returns the cache file of `sandbox_id` under `dir`.
pub fn cache_file(dir: &Path, sandbox_id: &str) -> Result<PathBuf, CacheError> {
    // The id becomes a file name, so it must not leave the cache directory.
    let plain = !sandbox_id.is_empty()
        && !sandbox_id.starts_with('.')
        && !sandbox_id.contains('/')
        && !sandbox_id.contains('\0');
    if !plain {
        return Err(CacheError::InvalidSandboxId {
            sandbox_id: sandbox_id.into(),
        });
    }
    Ok(dir.join(format!("{sandbox_id}.json")))
}

/// Writes the entry atomically: a crash leaves either the old file or the
/// new one, never a torn one.
pub fn write(dir: &Path, entry: &CachedAttachment) -> Result<(), CacheError> {
    let file = cache_file(dir, &entry.sandbox_id)?;
    let bytes = serde_json::to_vec_pretty(entry).map_err(|source| CacheError::Encode {
        sandbox_id: entry.sandbox_id.clone(),
        source,
    })?;

    std::fs::create_dir_all(dir).map_err(|source| CacheError::CreateDir {
        dir: dir.into(),
        source,
    })?;

    // NOTE: the temp name is fixed per sandbox, so callers must not write
    // one sandbox's entry concurrently.
    let temp = dir.join(format!(".{}.json.tmp", entry.sandbox_id));
    write_synced(&temp, &bytes)?;

    std::fs::rename(&temp, &file).map_err(|source| CacheError::Rename {
        file: file.clone(),
        source,
    })?;

    // The rename is durable only once the directory itself is synced.
    let sync_dir = File::open(dir).and_then(|handle| handle.sync_all());
    sync_dir.map_err(|source| CacheError::Sync {
        file: dir.into(),
        source,
    })
}

fn write_synced(temp: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let write_error = |source| CacheError::Write {
        file: temp.into(),
        source,
    };
    let mut handle = File::create(temp).map_err(write_error)?;
    handle.write_all(bytes).map_err(write_error)?;
    handle.sync_all().map_err(|source| CacheError::Sync {
        file: temp.into(),
        source,
    })
}

/// Reads the entry of `sandbox_id`. A missing entry yields `None`, which DEL
/// treats as nothing cached rather than as a failure.
pub fn read(dir: &Path, sandbox_id: &str) -> Result<Option<CachedAttachment>, CacheError> {
    let file = cache_file(dir, sandbox_id)?;
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Read { file, source }),
    };
    let entry: CachedAttachment = match serde_json::from_slice(&bytes) {
        Ok(entry) => entry,
        Err(source) => return Err(CacheError::Decode { file, source }),
    };
    if entry.format != CACHE_FORMAT {
        return Err(CacheError::Format {
            file,
            found: entry.format,
        });
    }
    Ok(Some(entry))
}

/// Removes the entry of `sandbox_id`. Removing a missing entry succeeds.
pub fn remove(dir: &Path, sandbox_id: &str) -> Result<(), CacheError> {
    let file = cache_file(dir, sandbox_id)?;
    match std::fs::remove_file(&file) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Remove { file, source }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::default_list;

    fn entry(sandbox_id: &str) -> CachedAttachment {
        let list = default_list(Path::new("/var/lib/hatoba"));
        let result = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.4/16"}]});
        CachedAttachment::new(sandbox_id, "eth0", &list, result)
    }

    #[test]
    fn written_entry_reads_back_with_its_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache_dir = dir.path().join("cni-cache");

        write(&cache_dir, &entry("sb1")).expect("write");
        let read_back = read(&cache_dir, "sb1").expect("read").expect("present");

        assert_eq!(read_back, entry("sb1"));
        let list = read_back.list(&cache_file(&cache_dir, "sb1").expect("path"));
        assert_eq!(
            list.expect("list"),
            default_list(Path::new("/var/lib/hatoba"))
        );
    }

    #[test]
    fn rewrite_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut second = entry("sb1");
        second.result = json!({"cniVersion": "1.0.0"});

        write(dir.path(), &entry("sb1")).expect("first");
        write(dir.path(), &second).expect("second");

        assert_eq!(read(dir.path(), "sb1").expect("read"), Some(second));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["sb1.json"]);
    }

    #[test]
    fn missing_entry_is_none_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");

        assert!(read(dir.path(), "absent").expect("read").is_none());
        write(dir.path(), &entry("sb2")).expect("write");
        remove(dir.path(), "sb2").expect("remove");
        remove(dir.path(), "sb2").expect("remove again");
        assert!(read(dir.path(), "sb2").expect("read").is_none());
    }

    #[test]
    fn corrupt_entry_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("sb3.json"), "{torn").expect("write");

        let error = read(dir.path(), "sb3").expect_err("corrupt");

        assert!(matches!(error, CacheError::Decode { .. }));
        assert!(error.to_string().contains("sb3.json"), "{error}");
    }

    #[test]
    fn sandbox_ids_that_escape_the_directory_are_rejected() {
        let dir = Path::new("/var/lib/hatoba/cni-cache");
        for id in ["", "../x", "a/b", ".hidden"] {
            let error = cache_file(dir, id).expect_err("rejected");
            assert!(matches!(error, CacheError::InvalidSandboxId { .. }));
        }
    }
}
