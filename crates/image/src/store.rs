//! The image metadata store: every [`ImageRecord`] in one `images.json`.
//!
//! Each change rewrites the whole file atomically: a temporary file in the
//! same directory is written and fsync'ed, renamed over `images.json`, and
//! the directory is fsync'ed. A crash at any instant leaves either the old
//! or the new file, both readable.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};

use crate::content::{random_name, sync_dir};
use crate::{ImageError, ImageRecord};

const FILE_NAME: &str = "images.json";
const TMP_PREFIX: &str = "images.json.tmp-";
const FORMAT_VERSION: u32 = 1;

/// Images keyed by ID.
pub(crate) type Images = BTreeMap<String, ImageRecord>;

#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    images: Vec<ImageRecord>,
}

/// The image records, in memory and in `images.json`.
#[derive(Debug)]
pub(crate) struct MetadataStore {
    dir: PathBuf,
    images: RwLock<Arc<Images>>,
    /// Serializes writers so that no update is lost between reading the
    /// records and writing the file.
    writer: tokio::sync::Mutex<()>,
}

impl MetadataStore {
    /// Reads `images.json` under `dir` (a missing file is an empty store)
    /// and removes temporary files of writes that a crash interrupted.
    pub(crate) fn open(dir: &Path) -> Result<Self, ImageError> {
        remove_stale_temporaries(dir)?;

        let path = dir.join(FILE_NAME);
        let images = match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Images::new(),
            Err(source) => {
                return Err(ImageError::Storage {
                    step: "read image metadata",
                    path,
                    source,
                });
            }
        };

        Ok(Self {
            dir: dir.to_path_buf(),
            images: RwLock::new(Arc::new(images)),
            writer: tokio::sync::Mutex::new(()),
        })
    }

    /// Returns the current records. The snapshot stays valid while updates
    /// go on, because it is never modified.
    pub(crate) fn snapshot(&self) -> Arc<Images> {
        Arc::clone(&self.read_lock())
    }

    /// Applies `change` to a copy of the records, writes the copy to disk and
    /// only then makes it current. Returns what `change` returned. When the
    /// write fails nothing changes, on disk or in memory.
    pub(crate) async fn update<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Images) -> T,
    ) -> Result<T, ImageError> {
        let _writer = self.writer.lock().await;

        let mut images = Images::clone(&self.snapshot());
        let output = change(&mut images);
        let images = Arc::new(images);

        let dir = self.dir.clone();
        let to_write = Arc::clone(&images);
        tokio::task::spawn_blocking(move || write_atomically(&dir, &to_write))
            .await
            .map_err(|join| ImageError::Storage {
                step: "write image metadata",
                path: self.dir.join(FILE_NAME),
                source: io::Error::other(join),
            })??;

        *self
            .images
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = images;
        Ok(output)
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Arc<Images>> {
        // The lock only guards an Arc swap, which cannot leave it half done.
        self.images
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Images, ImageError> {
    let file: StoreFile = serde_json::from_slice(bytes).map_err(|e| ImageError::Storage {
        step: "parse image metadata",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    if file.version != FORMAT_VERSION {
        return Err(ImageError::Storage {
            step: "parse image metadata",
            path: path.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unsupported format version {}, expected {FORMAT_VERSION}",
                    file.version
                ),
            ),
        });
    }
    Ok(file.images.into_iter().map(|r| (r.id.clone(), r)).collect())
}

/// Writes the records to `images.json` through a synced temporary file.
fn write_atomically(dir: &Path, images: &Images) -> Result<(), ImageError> {
    let file = StoreFile {
        version: FORMAT_VERSION,
        images: images.values().cloned().collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| ImageError::Storage {
        step: "serialize image metadata",
        path: dir.join(FILE_NAME),
        source: io::Error::other(e),
    })?;

    let tmp = dir.join(format!("{TMP_PREFIX}{}", random_name()));
    let result = write_synced(&tmp, &bytes).and_then(|()| {
        fs::rename(&tmp, dir.join(FILE_NAME)).map_err(ImageError::storage(
            "replace image metadata",
            dir.join(FILE_NAME),
        ))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;

    sync_dir(dir, "sync image metadata directory")
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let error = ImageError::storage("write image metadata", path.to_path_buf());
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(&error)?;
    file.write_all(bytes).map_err(&error)?;
    file.sync_all().map_err(error)
}

fn remove_stale_temporaries(dir: &Path) -> Result<(), ImageError> {
    let error = ImageError::storage("list image metadata directory", dir.to_path_buf());
    for entry in fs::read_dir(dir).map_err(&error)? {
        let entry = entry.map_err(&error)?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| ImageError::Storage {
                step: "remove stale image metadata file",
                path,
                source,
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id_byte: char, tag: &str) -> ImageRecord {
        let id = format!("sha256:{}", id_byte.to_string().repeat(64));
        ImageRecord {
            id: id.clone(),
            repo_tags: vec![tag.to_string()],
            repo_digests: vec![],
            manifest_digest: format!("sha256:{}", "e".repeat(64)),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            config_digest: id,
            layers: vec![],
            size: 42,
            user: "1000".into(),
            created: Some("2024-01-01T00:00:00Z".into()),
            pinned: false,
        }
    }

    #[tokio::test]
    async fn reopen_reads_back_written_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = MetadataStore::open(dir.path()).expect("open empty store");
        assert!(store.snapshot().is_empty());

        let a = record('a', "docker.io/library/a:latest");
        let b = record('b', "docker.io/library/b:latest");
        store
            .update(|images| {
                images.insert(a.id.clone(), a.clone());
                images.insert(b.id.clone(), b.clone());
            })
            .await
            .expect("write records");
        drop(store);

        let reopened = MetadataStore::open(dir.path()).expect("reopen");
        let images = reopened.snapshot();
        assert_eq!(images.len(), 2);
        assert_eq!(images.get(&a.id), Some(&a));
        assert_eq!(images.get(&b.id), Some(&b));
    }

    #[tokio::test]
    async fn rewrite_replaces_the_file_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = MetadataStore::open(dir.path()).expect("open");
        let a = record('a', "docker.io/library/a:latest");

        store
            .update(|images| {
                images.insert(a.id.clone(), a.clone());
            })
            .await
            .expect("first write");
        store
            .update(|images| {
                images.remove(&a.id);
            })
            .await
            .expect("second write");

        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("list dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![FILE_NAME.to_string()]);
        assert!(
            MetadataStore::open(dir.path())
                .expect("reopen")
                .snapshot()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn interrupted_write_leaves_old_records_readable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = MetadataStore::open(dir.path()).expect("open");
        let a = record('a', "docker.io/library/a:latest");
        store
            .update(|images| {
                images.insert(a.id.clone(), a.clone());
            })
            .await
            .expect("write");
        drop(store);

        // A crash between writing the temporary file and the rename.
        let stale = dir.path().join(format!("{TMP_PREFIX}deadbeef"));
        fs::write(&stale, b"{\"version\":1,\"ima").expect("write partial temporary");

        let reopened = MetadataStore::open(dir.path()).expect("reopen after crash");
        assert_eq!(reopened.snapshot().get(&a.id), Some(&a));
        assert!(!stale.exists(), "the stale temporary file is removed");
    }

    #[tokio::test]
    async fn snapshot_is_unchanged_by_later_updates() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = MetadataStore::open(dir.path()).expect("open");
        let before = store.snapshot();
        let a = record('a', "docker.io/library/a:latest");
        store
            .update(|images| {
                images.insert(a.id.clone(), a.clone());
            })
            .await
            .expect("write");
        assert!(before.is_empty());
        assert_eq!(store.snapshot().len(), 1);
    }

    #[test]
    fn corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join(FILE_NAME), b"not json").expect("write corrupt file");
        let err = MetadataStore::open(dir.path()).expect_err("corrupt store must fail");
        assert!(
            matches!(&err, ImageError::Storage { step: "parse image metadata", path, .. } if path.ends_with(FILE_NAME)),
            "{err}"
        );
    }
}
