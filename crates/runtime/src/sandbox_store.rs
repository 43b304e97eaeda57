//! Persistent sandbox metadata: one `<id>.json` file per sandbox in one
//! directory, each replaced atomically so a crash at any instant leaves a
//! store that still loads.
//!
//! Methods do blocking file IO under a lock, so async callers run them through
//! `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Bound;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// Length of a sandbox id: 32 random bytes in lowercase hex.
pub const ID_LEN: usize = 64;

/// Marks temp files so that `open` can remove those left by a crash.
const TEMP_MARKER: &str = ".hatoba-tmp-";

const RECORD_SUFFIX: &str = ".json";

/// Records may contain annotations with secrets, so only the daemon reads them.
const RECORD_MODE: u32 = 0o600;

/// Distinguishes temp files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Errors of the sandbox store, one variant per failing step.
#[derive(Debug, thiserror::Error)]
pub enum SandboxStoreError {
    #[error("failed to create sandbox store directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("failed to read sandbox store directory {path}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("failed to remove stale temp file {path}")]
    RemoveStaleTemp { path: PathBuf, source: io::Error },
    #[error("failed to read sandbox record {path}")]
    ReadRecord { path: PathBuf, source: io::Error },
    #[error("invalid sandbox record {path}: the file is kept, so inspect it, then move it away")]
    ParseRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "invalid sandbox record {path}: it contains id {id}, which does not match the file name"
    )]
    IdMismatch { path: PathBuf, id: String },
    #[error("invalid sandbox id {id:?}: expected {ID_LEN} lowercase hex characters")]
    InvalidId { id: String },
    #[error("failed to serialize sandbox record {id}")]
    Serialize {
        id: String,
        source: serde_json::Error,
    },
    #[error("failed to write temp file {path}")]
    WriteTemp { path: PathBuf, source: io::Error },
    #[error("failed to rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("failed to sync directory {path}")]
    SyncDir { path: PathBuf, source: io::Error },
    #[error("failed to remove sandbox record {path}")]
    RemoveRecord { path: PathBuf, source: io::Error },
    #[error("sandbox {id} not found")]
    NotFound { id: String },
    #[error("sandbox not found: no id starts with {prefix:?}")]
    PrefixNotFound { prefix: String },
    #[error("invalid sandbox id prefix: empty, give at least one character of the id")]
    EmptyPrefix,
    #[error("ambiguous sandbox id prefix {prefix:?} matches {}: give more characters", .matches.join(", "))]
    AmbiguousPrefix {
        prefix: String,
        matches: Vec<String>,
    },
}

/// The CRI `PodSandboxMetadata` a sandbox was created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMetadata {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
}

/// The lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Written before any side effect, so a restart finds an interrupted
    /// creation and cleans it up.
    Creating,
    /// Namespaces and network are set up.
    Ready,
    /// Stopped, or its network is gone.
    NotReady,
}

/// The persisted metadata of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// The reserved name, from [`crate::sandbox_name`].
    pub name: String,
    pub metadata: SandboxMetadata,
    pub state: SandboxState,
    /// Creation time in nanoseconds since the Unix epoch, as the CRI reports it.
    pub created_at: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub runtime_handler: String,
    /// The path of the pinned network namespace, or `None` for host network.
    #[serde(default)]
    pub netns_path: Option<PathBuf>,
    #[serde(default)]
    pub pod_ips: Vec<String>,
    #[serde(default)]
    pub log_directory: String,
    #[serde(default)]
    pub cgroup_parent: String,
}

/// A record file that could not be loaded, with its error. The file stays on disk.
pub type LoadFailure = (PathBuf, SandboxStoreError);

/// Sandbox records on disk, with an in-memory copy for lookups.
#[derive(Debug)]
pub struct SandboxStore {
    dir: PathBuf,
    records: Mutex<BTreeMap<String, SandboxRecord>>,
}

/// Generates a new sandbox id from 32 random bytes.
pub fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that `id` is 64 lowercase hex characters, so it cannot name a
/// path outside the store directory.
pub fn validate_id(id: &str) -> Result<(), SandboxStoreError> {
    let valid = id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if valid {
        Ok(())
    } else {
        Err(SandboxStoreError::InvalidId { id: id.to_owned() })
    }
}

impl SandboxStore {
    /// Opens the store in `dir`, creating it, removing temp files left by a
    /// crash and loading every record.
    ///
    /// Records that cannot be read are returned with their error and left on
    /// disk, so an operator can inspect them.
    pub fn open(dir: &Path) -> Result<(Self, Vec<LoadFailure>), SandboxStoreError> {
        fs::create_dir_all(dir).map_err(|source| SandboxStoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;

        let read_dir_err = |source| SandboxStoreError::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let mut records = BTreeMap::new();
        let mut failures = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_dir_err)? {
            let entry = entry.map_err(read_dir_err)?;
            let path = entry.path();
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };

            // A temp file is a write that never reached its rename.
            if file_name.starts_with(TEMP_MARKER) {
                fs::remove_file(&path)
                    .map_err(|source| SandboxStoreError::RemoveStaleTemp { path, source })?;
                continue;
            }

            let Some(id) = file_name.strip_suffix(RECORD_SUFFIX) else {
                continue;
            };
            if validate_id(id).is_err() {
                continue;
            }

            match load_record(&path, id) {
                Ok(record) => {
                    records.insert(record.id.clone(), record);
                }
                Err(err) => failures.push((path, err)),
            }
        }

        let store = Self {
            dir: dir.to_owned(),
            records: Mutex::new(records),
        };
        Ok((store, failures))
    }

    /// Returns the store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `record` atomically, replacing any record with the same id.
    pub fn put(&self, record: &SandboxRecord) -> Result<(), SandboxStoreError> {
        validate_id(&record.id)?;
        let json =
            serde_json::to_vec_pretty(record).map_err(|source| SandboxStoreError::Serialize {
                id: record.id.clone(),
                source,
            })?;

        // Held across the write so the file and the memory copy change in
        // the same order when two callers put the same id.
        let mut records = self.lock();
        self.write_atomic(&record.id, &json)?;
        records.insert(record.id.clone(), record.clone());
        Ok(())
    }

    /// Returns the record of sandbox `id`.
    pub fn get(&self, id: &str) -> Result<SandboxRecord, SandboxStoreError> {
        validate_id(id)?;
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxStoreError::NotFound { id: id.to_owned() })
    }

    /// Returns every record, ordered by id.
    pub fn list(&self) -> Vec<SandboxRecord> {
        self.lock().values().cloned().collect()
    }

    /// Removes the record of sandbox `id`. Removing a missing record succeeds.
    pub fn remove(&self, id: &str) -> Result<(), SandboxStoreError> {
        validate_id(id)?;
        let mut records = self.lock();

        let path = self.record_path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SandboxStoreError::RemoveRecord { path, source }),
        }
        self.sync_dir()?;

        records.remove(id);
        Ok(())
    }

    /// Returns the one record whose id starts with `prefix`, as crictl passes
    /// truncated ids.
    pub fn find_by_prefix(&self, prefix: &str) -> Result<SandboxRecord, SandboxStoreError> {
        if prefix.is_empty() {
            return Err(SandboxStoreError::EmptyPrefix);
        }

        let records = self.lock();
        let mut matches = records
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(id, _)| id.starts_with(prefix))
            .map(|(_, record)| record);
        match (matches.next(), matches.next()) {
            (Some(record), None) => Ok(record.clone()),
            (None, _) => Err(SandboxStoreError::PrefixNotFound {
                prefix: prefix.to_owned(),
            }),
            (Some(first), Some(second)) => {
                let mut ids = vec![first.id.clone(), second.id.clone()];
                ids.extend(matches.map(|record| record.id.clone()));
                Err(SandboxStoreError::AmbiguousPrefix {
                    prefix: prefix.to_owned(),
                    matches: ids,
                })
            }
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{RECORD_SUFFIX}"))
    }

    /// Writes to a temp file in the same directory, syncs it, renames it over
    /// the record and syncs the directory so the rename itself is durable.
    fn write_atomic(&self, id: &str, contents: &[u8]) -> Result<(), SandboxStoreError> {
        let temp = self.dir.join(format!(
            "{TEMP_MARKER}{id}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));

        if let Err(source) = write_synced(&temp, contents) {
            let _ = fs::remove_file(&temp);
            return Err(SandboxStoreError::WriteTemp { path: temp, source });
        }

        let target = self.record_path(id);
        if let Err(source) = fs::rename(&temp, &target) {
            let _ = fs::remove_file(&temp);
            return Err(SandboxStoreError::Rename {
                from: temp,
                to: target,
                source,
            });
        }

        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), SandboxStoreError> {
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| SandboxStoreError::SyncDir {
                path: self.dir.clone(),
                source,
            })
    }

    /// Locks the map and ignores poison, because every change is a single
    /// insert or remove that a panicking thread cannot leave half done.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SandboxRecord>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn write_synced(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(RECORD_MODE)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn load_record(path: &Path, id: &str) -> Result<SandboxRecord, SandboxStoreError> {
    let bytes = fs::read(path).map_err(|source| SandboxStoreError::ReadRecord {
        path: path.to_owned(),
        source,
    })?;

    let record: SandboxRecord =
        serde_json::from_slice(&bytes).map_err(|source| SandboxStoreError::ParseRecord {
            path: path.to_owned(),
            source,
        })?;

    if record.id != id {
        return Err(SandboxStoreError::IdMismatch {
            path: path.to_owned(),
            id: record.id,
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.to_owned(),
            name: "web_default_uid-1_0".to_owned(),
            metadata: SandboxMetadata {
                name: "web".to_owned(),
                namespace: "default".to_owned(),
                uid: "uid-1".to_owned(),
                attempt: 0,
            },
            state: SandboxState::Creating,
            created_at: 1_700_000_000_123_456_789,
            labels: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
            annotations: BTreeMap::from([("note".to_owned(), "x".to_owned())]),
            runtime_handler: "runc".to_owned(),
            netns_path: Some(PathBuf::from("/run/hatoba/netns/abc")),
            pod_ips: vec!["10.88.0.5".to_owned(), "fd00::5".to_owned()],
            log_directory: "/var/log/pods/default_web_uid-1".to_owned(),
            cgroup_parent: "kubepods-besteffort.slice".to_owned(),
        }
    }

    fn id_with_prefix(prefix: &str) -> String {
        let mut id = prefix.to_owned();
        id.push_str(&"0".repeat(ID_LEN - prefix.len()));
        id
    }

    fn open(dir: &Path) -> SandboxStore {
        let (store, failures) = SandboxStore::open(dir).expect("open store");
        assert!(failures.is_empty(), "unexpected failures: {failures:?}");
        store
    }

    #[test]
    fn new_id_is_64_lowercase_hex_and_unique() {
        let a = new_id();
        let b = new_id();

        validate_id(&a).expect("valid id");
        assert_ne!(a, b);
    }

    #[test]
    fn put_then_get_returns_the_same_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let rec = record(&new_id());

        store.put(&rec).expect("put");

        assert_eq!(store.get(&rec.id).expect("get"), rec);
        assert_eq!(store.list(), vec![rec]);
    }

    #[test]
    fn put_replaces_the_record_with_the_same_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut rec = record(&new_id());
        store.put(&rec).expect("put creating");

        rec.state = SandboxState::Ready;
        store.put(&rec).expect("put ready");

        assert_eq!(store.get(&rec.id).expect("get").state, SandboxState::Ready);
        assert_eq!(open(dir.path()).list(), vec![rec]);
    }

    #[test]
    fn reopen_reads_back_every_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut a = record(&new_id());
        a.state = SandboxState::NotReady;
        a.netns_path = None;
        let b = record(&new_id());
        store.put(&a).expect("put a");
        store.put(&b).expect("put b");
        drop(store);

        let reopened = open(dir.path());

        assert_eq!(reopened.get(&a.id).expect("get a"), a);
        assert_eq!(reopened.get(&b.id).expect("get b"), b);
        assert_eq!(reopened.list().len(), 2);
    }

    #[test]
    fn open_reports_and_keeps_corrupt_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = record(&new_id());
        open(dir.path()).put(&good).expect("put");
        let corrupt = dir.path().join(format!("{}.json", new_id()));
        fs::write(&corrupt, b"{\"id\": \"trunc").expect("write corrupt file");

        let (store, failures) = SandboxStore::open(dir.path()).expect("open");

        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, corrupt);
        assert!(matches!(
            failures[0].1,
            SandboxStoreError::ParseRecord { .. }
        ));
        assert!(corrupt.exists(), "corrupt file must stay for inspection");
        assert_eq!(store.list(), vec![good]);
    }

    #[test]
    fn open_reports_id_file_name_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = record(&new_id());
        let path = dir.path().join(format!("{}.json", new_id()));
        fs::write(&path, serde_json::to_vec(&rec).expect("serialize")).expect("write");

        let (store, failures) = SandboxStore::open(dir.path()).expect("open");

        assert_eq!(failures.len(), 1);
        assert!(matches!(
            &failures[0].1,
            SandboxStoreError::IdMismatch { id, .. } if *id == rec.id
        ));
        assert!(store.list().is_empty());
        assert!(path.exists());
    }

    #[test]
    fn open_removes_stale_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join(format!("{TEMP_MARKER}{}-1-0", new_id()));
        fs::write(&stale, b"{\"half").expect("write stale temp");

        let store = open(dir.path());

        assert!(!stale.exists());
        assert!(store.list().is_empty());
    }

    #[test]
    fn open_creates_a_missing_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("state").join("sandboxes");

        let store = open(&nested);

        assert!(nested.is_dir());
        assert_eq!(store.dir(), nested);
    }

    #[test]
    fn remove_twice_succeeds_and_deletes_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let rec = record(&new_id());
        store.put(&rec).expect("put");

        store.remove(&rec.id).expect("first remove");
        store.remove(&rec.id).expect("second remove");

        assert!(matches!(
            store.get(&rec.id),
            Err(SandboxStoreError::NotFound { .. })
        ));
        assert!(!dir.path().join(format!("{}.json", rec.id)).exists());
        assert!(open(dir.path()).list().is_empty());
    }

    #[test]
    fn find_by_prefix_returns_the_unique_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let a = record(&id_with_prefix("abc1"));
        let b = record(&id_with_prefix("abc2"));
        store.put(&a).expect("put a");
        store.put(&b).expect("put b");

        assert_eq!(store.find_by_prefix("abc1").expect("unique"), a);
        assert_eq!(store.find_by_prefix(&b.id).expect("full id"), b);
    }

    #[test]
    fn find_by_prefix_lists_every_match_when_ambiguous() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let a = record(&id_with_prefix("abc1"));
        let b = record(&id_with_prefix("abc2"));
        let other = record(&id_with_prefix("f"));
        for rec in [&a, &b, &other] {
            store.put(rec).expect("put");
        }

        let err = store.find_by_prefix("ab").expect_err("ambiguous");

        match &err {
            SandboxStoreError::AmbiguousPrefix { prefix, matches } => {
                assert_eq!(prefix, "ab");
                assert_eq!(matches, &vec![a.id.clone(), b.id.clone()]);
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains(&a.id));
    }

    #[test]
    fn find_by_prefix_reports_no_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.put(&record(&id_with_prefix("abc"))).expect("put");

        assert!(matches!(
            store.find_by_prefix("def"),
            Err(SandboxStoreError::PrefixNotFound { .. })
        ));
    }

    #[test]
    fn find_by_prefix_rejects_empty_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.put(&record(&id_with_prefix("abc"))).expect("put");

        assert!(matches!(
            store.find_by_prefix(""),
            Err(SandboxStoreError::EmptyPrefix)
        ));
    }

    #[test]
    fn invalid_ids_are_rejected_before_touching_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let upper = "A".repeat(ID_LEN);
        let escape = format!("../{}", "a".repeat(ID_LEN - 3));
        let short = "abc".to_owned();

        for id in [&upper, &escape, &short] {
            assert!(matches!(
                store.put(&record(id)),
                Err(SandboxStoreError::InvalidId { .. })
            ));
            assert!(matches!(
                store.get(id),
                Err(SandboxStoreError::InvalidId { .. })
            ));
            assert!(matches!(
                store.remove(id),
                Err(SandboxStoreError::InvalidId { .. })
            ));
        }
        let entries = fs::read_dir(dir.path()).expect("read dir").count();
        assert_eq!(entries, 0);
    }

    #[test]
    fn state_is_stored_in_snake_case() {
        let json = serde_json::to_string(&SandboxState::NotReady).expect("serialize");
        assert_eq!(json, "\"not_ready\"");
    }
}
