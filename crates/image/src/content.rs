//! The content store: blobs (layers, configs, manifests, indexes) kept under
//! `blobs/<algorithm>/<hex>` and named by their digest.
//!
//! A blob is written to `ingest/<random>` while it streams in and is hashed
//! as it is written. Only when its size and digest match the descriptor is
//! it fsync'ed and renamed into place, so a blob file under `blobs/` always
//! contains exactly the content its name promises.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::ImageError;
use crate::digest::{Algorithm, Digest, Hasher};

/// Blobs under `<root>/blobs`, ingested through `<root>/ingest`.
#[derive(Debug, Clone)]
pub(crate) struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

/// The checks a blob must pass before it is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected<'a> {
    /// Image reference or archive the blob belongs to, for error messages.
    pub reference: &'a str,
    pub digest: &'a Digest,
    /// Size from the descriptor, when one is known.
    pub size: Option<u64>,
}

impl ContentStore {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            blobs: root.join("blobs"),
            ingest: root.join("ingest"),
        }
    }

    /// Creates the store's directories and deletes every ingest file that an
    /// interrupted write left behind.
    pub(crate) fn init(&self) -> Result<(), ImageError> {
        remove_dir_if_exists(&self.ingest, "remove stale ingest directory")?;
        for dir in [
            self.ingest.clone(),
            self.blobs.join(Algorithm::Sha256.name()),
            self.blobs.join(Algorithm::Sha512.name()),
        ] {
            fs::create_dir_all(&dir).map_err(ImageError::storage(
                "create content store directory",
                dir.clone(),
            ))?;
        }
        Ok(())
    }

    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Returns whether the blob is stored (a stored blob was verified on write).
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Checks that a stored blob has the size a descriptor gives it. The
    /// content of a stored blob matches its digest, but a manifest that
    /// names a stored blob may still state another size.
    pub(crate) fn check_size(
        &self,
        reference: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<(), ImageError> {
        let path = self.blob_path(digest);
        let actual = fs::metadata(&path)
            .map_err(ImageError::storage("read blob size", &path))?
            .len();
        if actual == size {
            return Ok(());
        }
        Err(ImageError::InvalidContent {
            reference: reference.to_string(),
            what: "descriptor",
            reason: format!("blob {digest} has {actual} bytes, but its descriptor says {size}"),
        })
    }

    /// Streams a blob into the store, verifying its size and digest. Calls
    /// `on_progress` with the number of bytes received so far after each chunk.
    /// Nothing is stored when the stream fails or the content does not match.
    pub(crate) async fn write_stream<S>(
        &self,
        expected: Expected<'_>,
        mut stream: S,
        mut on_progress: impl FnMut(u64),
    ) -> Result<u64, ImageError>
    where
        S: Stream<Item = Result<Bytes, ImageError>> + Unpin,
    {
        let ingest = IngestFile::new(&self.ingest);
        // Created synchronously: an open on the blocking pool that outlives
        // a cancelled pull would create the file after the guard removed it.
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&ingest.path)
            .map_err(|source| ingest.error("create ingest file", source))?;
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Hasher::new(expected.digest.algorithm());
        let mut received = 0u64;

        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            received += chunk.len() as u64;
            check_not_larger(expected, received)?;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|source| ingest.error("write ingest file", source))?;
            on_progress(received);
        }

        check_complete(expected, received, hasher.finish())?;
        // tokio's `write_all` returns before the write lands, and its
        // `sync_all` drops the error of that last write (ENOSPC included),
        // so `flush` must collect it first.
        file.flush()
            .await
            .map_err(|source| ingest.error("write ingest file", source))?;
        file.sync_all()
            .await
            .map_err(|source| ingest.error("sync ingest file", source))?;
        drop(file);

        let store = self.clone();
        let digest = expected.digest.clone();
        tokio::task::spawn_blocking(move || store.commit(ingest, &digest))
            .await
            .map_err(|join| ImageError::Storage {
                step: "commit blob",
                path: self.blob_path(expected.digest),
                source: io::Error::other(join),
            })??;
        Ok(received)
    }

    /// Stores a blob that is already in memory, after verifying it.
    pub(crate) fn write_bytes(
        &self,
        expected: Expected<'_>,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        self.ingest_reader(
            bytes,
            expected.digest.algorithm(),
            Some(expected),
            expected.reference,
            |_| {},
        )?;
        Ok(())
    }

    /// Copies a blob from a blocking reader into the store and returns its
    /// digest and size. When `expected` is given the content must match it,
    /// and otherwise the blob is stored under whatever digest it hashes to.
    /// `before_commit` runs once the digest is known, before the blob becomes
    /// visible, so the caller can lease it before a collection can see it.
    pub(crate) fn ingest_reader(
        &self,
        mut reader: impl Read,
        algorithm: Algorithm,
        expected: Option<Expected<'_>>,
        reference: &str,
        before_commit: impl FnOnce(&Digest),
    ) -> Result<(Digest, u64), ImageError> {
        let ingest = IngestFile::new(&self.ingest);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&ingest.path)
            .map_err(|source| ingest.error("create ingest file", source))?;
        let mut hasher = Hasher::new(algorithm);
        let mut received = 0u64;
        let mut buf = vec![0u8; 64 * 1024];

        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ImageError::InvalidContent {
                        reference: reference.to_string(),
                        what: "blob",
                        reason: format!("failed to read the blob: {source}"),
                    });
                }
            };
            received += n as u64;
            if let Some(expected) = expected {
                check_not_larger(expected, received)?;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|source| ingest.error("write ingest file", source))?;
        }

        let digest = hasher.finish();
        if let Some(expected) = expected {
            check_complete(expected, received, digest.clone())?;
        }
        file.sync_all()
            .map_err(|source| ingest.error("sync ingest file", source))?;
        drop(file);

        before_commit(&digest);
        self.commit(ingest, &digest)?;
        Ok((digest, received))
    }

    /// Reads a whole blob into memory, which suits manifests and configs.
    pub(crate) fn read(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(digest);
        fs::read(&path).map_err(|source| ImageError::Storage {
            step: "read blob",
            path,
            source,
        })
    }

    /// Opens a blob for reading.
    pub(crate) fn open(&self, digest: &Digest) -> Result<File, ImageError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|source| ImageError::Storage {
            step: "open blob",
            path,
            source,
        })
    }

    /// Lists every stored blob. Files whose names are not valid digests
    /// are skipped: the store never creates them.
    pub(crate) fn list(&self) -> Result<Vec<Digest>, ImageError> {
        let mut digests = Vec::new();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.blobs.join(algorithm.name());
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ImageError::Storage {
                        step: "list blobs",
                        path: dir,
                        source,
                    });
                }
            };
            for entry in entries {
                let entry = entry.map_err(ImageError::storage("list blobs", dir.clone()))?;
                let name = entry.file_name();
                let Some(hex) = name.to_str() else { continue };
                if let Ok(digest) = Digest::parse(&format!("{}:{hex}", algorithm.name())) {
                    digests.push(digest);
                }
            }
        }
        Ok(digests)
    }

    /// Deletes a blob. A blob that is already gone is not an error.
    pub(crate) fn remove(&self, digest: &Digest) -> Result<(), ImageError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ImageError::Storage {
                step: "remove blob",
                path,
                source,
            }),
        }
    }

    /// Moves a verified, synced ingest file into place and syncs the
    /// directory so the rename survives a crash.
    fn commit(&self, mut ingest: IngestFile, digest: &Digest) -> Result<(), ImageError> {
        let target = self.blob_path(digest);
        // A concurrent writer of the same digest may have won the race. Its
        // file has the same verified content, so replacing it is harmless.
        fs::rename(&ingest.path, &target)
            .map_err(ImageError::storage("move blob into place", target.clone()))?;
        ingest.committed = true;

        let dir = self.blobs.join(digest.algorithm().name());
        sync_dir(&dir, "sync blob directory")
    }
}

fn check_not_larger(expected: Expected<'_>, received: u64) -> Result<(), ImageError> {
    match expected.size {
        Some(size) if received > size => Err(ImageError::InvalidContent {
            reference: expected.reference.to_string(),
            what: "blob size",
            reason: format!(
                "blob {} has more than the {size} bytes its descriptor gives",
                expected.digest
            ),
        }),
        _ => Ok(()),
    }
}

fn check_complete(expected: Expected<'_>, received: u64, actual: Digest) -> Result<(), ImageError> {
    if let Some(size) = expected.size
        && received != size
    {
        return Err(ImageError::InvalidContent {
            reference: expected.reference.to_string(),
            what: "blob size",
            reason: format!(
                "blob {} has {received} bytes but its descriptor gives {size}",
                expected.digest
            ),
        });
    }
    if &actual != expected.digest {
        return Err(ImageError::DigestMismatch {
            expected: expected.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// A file under `ingest/`, deleted on drop unless it was moved into place.
struct IngestFile {
    path: PathBuf,
    committed: bool,
}

impl IngestFile {
    fn new(ingest_dir: &Path) -> Self {
        Self {
            path: ingest_dir.join(random_name()),
            committed: false,
        }
    }

    fn error(&self, step: &'static str, source: io::Error) -> ImageError {
        ImageError::Storage {
            step,
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for IngestFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: `ContentStore::init` wipes leftovers at the next start.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Returns 16 random hex characters for temporary file and directory names.
pub(crate) fn random_name() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

/// Fsyncs a directory so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path, step: &'static str) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ImageError::Storage {
            step,
            path: dir.to_path_buf(),
            source,
        })
}

/// Removes a directory tree. A missing one is not an error.
pub(crate) fn remove_dir_if_exists(dir: &Path, step: &'static str) -> Result<(), ImageError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ImageError::Storage {
            step,
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ContentStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ContentStore::new(dir.path());
        store.init().expect("init store");
        (dir, store)
    }

    fn ingest_is_empty(root: &Path) -> bool {
        fs::read_dir(root.join("ingest"))
            .expect("read ingest dir")
            .next()
            .is_none()
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, ImageError>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn write_stream_stores_verified_blob() {
        let (dir, store) = store();
        let digest = Digest::sha256_of(b"hello world");
        let mut seen = Vec::new();

        let written = store
            .write_stream(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: Some(11),
                },
                chunks(&[b"hello ", b"world"]),
                |n| seen.push(n),
            )
            .await
            .expect("write blob");

        assert_eq!(written, 11);
        assert_eq!(seen, vec![6, 11]);
        assert!(store.contains(&digest));
        assert_eq!(store.read(&digest).expect("read blob"), b"hello world");
        assert!(ingest_is_empty(dir.path()));
    }

    /// A tmpfs of 64 KiB mounted on a temporary directory, unmounted on drop.
    struct SmallFs(tempfile::TempDir);

    impl SmallFs {
        fn mount() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "hatoba-test"])
                .arg(dir.path())
                .status()
                .expect("run mount");
            assert!(status.success(), "mount tmpfs on {}", dir.path().display());
            Self(dir)
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[tokio::test]
    async fn full_disk_fails_the_write_and_stores_nothing() {
        if !rustix::process::geteuid().is_root() {
            eprintln!(
                "skipped: full_disk_fails_the_write_and_stores_nothing needs root to mount tmpfs"
            );
            return;
        }
        let small = SmallFs::mount();
        let store = ContentStore::new(small.0.path());
        store.init().expect("init store");
        let blob: &'static [u8] = Box::leak(vec![7u8; 256 * 1024].into_boxed_slice());
        let digest = Digest::sha256_of(blob);

        let err = store
            .write_stream(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: Some(blob.len() as u64),
                },
                chunks(&[blob]),
                |_| {},
            )
            .await
            .expect_err("a blob larger than the file system must fail");

        let ImageError::Storage { source, .. } = &err else {
            panic!("expected a storage error, got {err}");
        };
        assert_eq!(source.kind(), io::ErrorKind::StorageFull, "{err}");
        assert!(!store.contains(&digest));
        assert!(ingest_is_empty(small.0.path()));
    }

    #[tokio::test]
    async fn digest_mismatch_stores_nothing() {
        let (dir, store) = store();
        let digest = Digest::sha256_of(b"expected content");

        let err = store
            .write_stream(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: Some(16),
                },
                chunks(&[b"tampered content"]),
                |_| {},
            )
            .await
            .expect_err("tampered blob must be rejected");

        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&digest));
        assert!(store.list().expect("list blobs").is_empty());
        assert!(ingest_is_empty(dir.path()));
    }

    #[tokio::test]
    async fn oversized_blob_is_rejected_early() {
        let (dir, store) = store();
        let digest = Digest::sha256_of(b"abc");

        let err = store
            .write_stream(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: Some(3),
                },
                chunks(&[b"ab", b"cd"]),
                |_| {},
            )
            .await
            .expect_err("oversized blob must be rejected");

        assert!(
            matches!(
                err,
                ImageError::InvalidContent {
                    what: "blob size",
                    ..
                }
            ),
            "{err}"
        );
        assert!(store.list().expect("list blobs").is_empty());
        assert!(ingest_is_empty(dir.path()));
    }

    #[tokio::test]
    async fn failed_stream_leaves_no_ingest_file() {
        let (dir, store) = store();
        let digest = Digest::sha256_of(b"abc");
        let stream = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"a")),
            Err(ImageError::InvalidArchive {
                reason: "connection reset".into(),
            }),
        ]);

        let result = store
            .write_stream(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: None,
                },
                stream,
                |_| {},
            )
            .await;

        assert!(result.is_err());
        assert!(store.list().expect("list blobs").is_empty());
        assert!(ingest_is_empty(dir.path()));
    }

    #[test]
    fn ingest_reader_computes_the_digest() {
        let (_dir, store) = store();
        let (digest, size) = store
            .ingest_reader(
                &b"some layer"[..],
                Algorithm::Sha256,
                None,
                "archive",
                |_| {},
            )
            .expect("ingest");
        assert_eq!(digest, Digest::sha256_of(b"some layer"));
        assert_eq!(size, 10);
        assert!(store.contains(&digest));
    }

    #[test]
    fn sha512_blobs_are_verified_with_sha512() {
        let (_dir, store) = store();
        let mut hasher = Hasher::new(Algorithm::Sha512);
        hasher.update(b"data");
        let digest = hasher.finish();

        store
            .write_bytes(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: Some(4),
                },
                b"data",
            )
            .expect("store sha512 blob");

        assert!(
            store
                .blob_path(&digest)
                .starts_with(store.blobs.join("sha512"))
        );
        assert!(store.contains(&digest));
    }

    #[test]
    fn init_wipes_stale_ingest_files() {
        let (dir, store) = store();
        fs::write(dir.path().join("ingest").join("leftover"), b"partial").expect("write leftover");
        store.init().expect("reinit");
        assert!(ingest_is_empty(dir.path()));
    }

    #[test]
    fn remove_is_idempotent() {
        let (_dir, store) = store();
        let digest = Digest::sha256_of(b"x");
        store
            .write_bytes(
                Expected {
                    reference: "test",
                    digest: &digest,
                    size: None,
                },
                b"x",
            )
            .expect("store blob");
        store.remove(&digest).expect("first remove");
        store.remove(&digest).expect("second remove");
        assert!(!store.contains(&digest));
    }
}
