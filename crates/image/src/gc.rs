//! Garbage collection of blobs and snapshots, and the two guards that keep
//! in-flight work safe from it and from itself:
//!
//! - [`Leases`]: a blob or snapshot that a running pull or load uses is
//!   leased and never collected, even before any image record names it.
//! - [`KeyedLocks`]: one async lock per blob digest or chain ID, so
//!   concurrent pulls fetch each blob once and unpack each layer once. The
//!   second waiter finds the result in place.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::OwnedMutexGuard;

use crate::ImageError;
use crate::content::{ContentStore, random_name, remove_dir_if_exists};
use crate::digest::Digest;
use crate::snapshot::Snapshots;
use crate::store::Images;

/// A blob or snapshot that a lease or a lock protects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Resource {
    Blob(Digest),
    /// A snapshot, by chain ID.
    Snapshot(Digest),
}

/// Reference counts of leased resources.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    counts: Mutex<HashMap<Resource, usize>>,
}

impl Leases {
    /// Locks the lease table. The collector holds it while it decides and
    /// moves garbage aside, so no lease can appear in between.
    fn lock(&self) -> MutexGuard<'_, HashMap<Resource, usize>> {
        // Counts are updated in single statements, so a poisoned table is
        // still consistent.
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The leases of one pull or load, all released on drop.
#[derive(Debug)]
pub(crate) struct LeaseSet {
    leases: Arc<Leases>,
    leased: Vec<Resource>,
}

impl LeaseSet {
    pub(crate) fn new(leases: &Arc<Leases>) -> Self {
        Self {
            leases: Arc::clone(leases),
            leased: Vec::new(),
        }
    }

    /// Leases a resource. Take the lease before checking whether the
    /// resource exists: a collection that runs after the check then keeps it.
    pub(crate) fn add(&mut self, resource: Resource) {
        *self.leases.lock().entry(resource.clone()).or_insert(0) += 1;
        self.leased.push(resource);
    }
}

impl Drop for LeaseSet {
    fn drop(&mut self) {
        let mut counts = self.leases.lock();
        for resource in self.leased.drain(..) {
            if let Some(count) = counts.get_mut(&resource) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&resource);
                }
            }
        }
    }
}

/// One async mutex per key, created on first use and dropped with its
/// last holder.
#[derive(Debug, Default)]
pub(crate) struct KeyedLocks {
    locks: Mutex<HashMap<Resource, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for and takes the lock of `key`. The guard is owned, so it can
    /// move into a blocking task and keep the lock until that task ends even
    /// when the waiting future is dropped.
    pub(crate) async fn lock(&self, key: Resource) -> OwnedMutexGuard<()> {
        let mutex = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            locks.retain(|_, weak| weak.strong_count() > 0);
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        mutex.lock_owned().await
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.retain(|_, weak| weak.strong_count() > 0);
        locks.len()
    }
}

/// Counts of what one collection freed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Collected {
    pub blobs: usize,
    pub snapshots: usize,
}

/// Removes every blob and snapshot that no image record names and no lease
/// holds. Blocking: run it off the async executor.
///
/// `images` is read while the lease table is locked. A pull commits its
/// record before it drops its leases, so each of its resources is either
/// named by a record the collector reads or still leased.
pub(crate) fn collect(
    root: &Path,
    content: &ContentStore,
    snapshots: &Snapshots,
    leases: &Leases,
    images: impl FnOnce() -> Arc<Images>,
) -> Result<Collected, ImageError> {
    let trash = root.join("trash");
    let mut collected = Collected::default();
    let mut doomed_snapshots = Vec::new();
    {
        let counts = leases.lock();
        let (used_blobs, used_snapshots) = referenced(&images());

        for digest in content.list()? {
            let resource = Resource::Blob(digest.clone());
            if !used_blobs.contains(&digest) && !counts.contains_key(&resource) {
                content.remove(&digest)?;
                collected.blobs += 1;
            }
        }

        for chain_id in snapshots.list()? {
            let resource = Resource::Snapshot(chain_id.clone());
            if !used_snapshots.contains(&chain_id) && !counts.contains_key(&resource) {
                // A rename is quick, so the lease table stays locked only
                // briefly. The slow removal happens after it is released.
                doomed_snapshots.push(move_to_trash(&trash, &snapshots.path(&chain_id))?);
                collected.snapshots += 1;
            }
        }
    }

    for dir in doomed_snapshots {
        remove_dir_if_exists(&dir, "remove unused snapshot")?;
    }
    Ok(collected)
}

/// Empties the trash directory that an interrupted collection left behind.
pub(crate) fn empty_trash(root: &Path) -> Result<(), ImageError> {
    remove_dir_if_exists(&root.join("trash"), "empty trash directory")
}

/// Returns the blobs and snapshots that image records name.
fn referenced(images: &Images) -> (HashSet<Digest>, HashSet<Digest>) {
    let mut blobs = HashSet::new();
    let mut snapshots = HashSet::new();
    for image in images.values() {
        let named = [&image.manifest_digest, &image.config_digest]
            .into_iter()
            .chain(image.layers.iter().map(|l| &l.digest));
        blobs.extend(named.filter_map(|d| Digest::parse(d).ok()));
        // The index a multi-platform image was pulled through is stored too,
        // and its digest is the one in `name@digest`.
        blobs.extend(
            image
                .repo_digests
                .iter()
                .filter_map(|r| r.rsplit_once('@'))
                .filter_map(|(_, d)| Digest::parse(d).ok()),
        );
        snapshots.extend(
            image
                .layers
                .iter()
                .filter_map(|l| Digest::parse(&l.chain_id).ok()),
        );
    }
    (blobs, snapshots)
}

fn move_to_trash(trash: &Path, dir: &Path) -> Result<PathBuf, ImageError> {
    fs::create_dir_all(trash).map_err(ImageError::storage(
        "create trash directory",
        trash.to_path_buf(),
    ))?;
    let target = trash.join(random_name());
    fs::rename(dir, &target).map_err(ImageError::storage(
        "move unused snapshot to trash",
        dir.to_path_buf(),
    ))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::content::Expected;
    use crate::{ImageRecord, LayerRecord};

    fn blob(n: u8) -> Resource {
        Resource::Blob(Digest::sha256_of(&[n]))
    }

    #[tokio::test]
    async fn keyed_lock_runs_one_holder_per_key() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let work_done = Arc::new(AtomicUsize::new(0));

        let mut tasks = Vec::new();
        for _ in 0..8 {
            let locks = Arc::clone(&locks);
            let inside = Arc::clone(&inside);
            let max_inside = Arc::clone(&max_inside);
            let work_done = Arc::clone(&work_done);
            tasks.push(tokio::spawn(async move {
                let _guard = locks.lock(blob(1)).await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                // Single flight: only the first holder does the work, the
                // others find it done.
                if work_done.load(Ordering::SeqCst) == 0 {
                    tokio::task::yield_now().await;
                    work_done.fetch_add(1, Ordering::SeqCst);
                }
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }

        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert_eq!(work_done.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0, "locks are dropped with their last holder");
    }

    #[tokio::test]
    async fn keyed_lock_does_not_block_other_keys() {
        let locks = KeyedLocks::default();
        let _first = locks.lock(blob(1)).await;
        let second = tokio::time::timeout(Duration::from_secs(10), locks.lock(blob(2))).await;
        assert!(
            second.is_ok(),
            "a different key must not wait for the first"
        );
    }

    #[tokio::test]
    async fn keyed_lock_is_held_by_a_blocking_task() {
        let locks = Arc::new(KeyedLocks::default());
        let guard = locks.lock(blob(1)).await;
        // The guard moves into a blocking task, as an unpack does.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let blocking = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            release_rx.recv().ok();
        });

        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.lock(blob(1)).await })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the lock is still held by the blocking task"
        );

        release_tx.send(()).expect("release");
        blocking.await.expect("blocking task");
        let _guard = waiter.await.expect("waiter gets the lock");
    }

    #[test]
    fn lease_set_releases_on_drop() {
        let leases = Arc::new(Leases::default());
        let mut a = LeaseSet::new(&leases);
        let mut b = LeaseSet::new(&leases);
        a.add(blob(1));
        b.add(blob(1));
        drop(a);
        assert_eq!(leases.lock().get(&blob(1)), Some(&1));
        drop(b);
        assert!(leases.lock().is_empty());
    }

    fn record_using(layer_blob: &Digest, chain_id: &Digest) -> ImageRecord {
        let config = Digest::sha256_of(b"config");
        ImageRecord {
            id: config.to_string(),
            repo_tags: vec!["docker.io/library/a:latest".into()],
            repo_digests: vec![],
            manifest_digest: Digest::sha256_of(b"manifest").to_string(),
            manifest_media_type: String::new(),
            config_digest: config.to_string(),
            layers: vec![LayerRecord {
                digest: layer_blob.to_string(),
                media_type: String::new(),
                size: 1,
                diff_id: chain_id.to_string(),
                chain_id: chain_id.to_string(),
            }],
            size: 1,
            user: String::new(),
            created: None,
            pinned: false,
        }
    }

    #[test]
    fn collect_keeps_referenced_and_leased_content() {
        let dir = tempfile::tempdir().expect("temp dir");
        let content = ContentStore::new(dir.path());
        content.init().expect("init content");
        let snapshots = Snapshots::new(dir.path());
        snapshots.init().expect("init snapshots");

        let store = |bytes: &[u8]| {
            let digest = Digest::sha256_of(bytes);
            content
                .write_bytes(
                    Expected {
                        reference: "test",
                        digest: &digest,
                        size: None,
                    },
                    bytes,
                )
                .expect("store blob");
            digest
        };
        let used = store(b"used layer");
        let leased = store(b"leased layer");
        let garbage = store(b"garbage layer");
        let used_chain = Digest::sha256_of(b"used chain");
        let leased_chain = Digest::sha256_of(b"leased chain");
        let garbage_chain = Digest::sha256_of(b"garbage chain");
        for chain in [&used_chain, &leased_chain, &garbage_chain] {
            fs::create_dir(snapshots.path(chain)).expect("create snapshot dir");
            fs::write(snapshots.path(chain).join("file"), b"x").expect("write snapshot file");
        }

        let leases = Arc::new(Leases::default());
        let mut lease = LeaseSet::new(&leases);
        lease.add(Resource::Blob(leased.clone()));
        lease.add(Resource::Snapshot(leased_chain.clone()));

        let image = record_using(&used, &used_chain);
        let images = Arc::new(Images::from([(image.id.clone(), image)]));
        let collected =
            collect(dir.path(), &content, &snapshots, &leases, || images).expect("collect garbage");

        assert_eq!(
            collected,
            Collected {
                blobs: 1,
                snapshots: 1
            }
        );
        assert!(content.contains(&used));
        assert!(content.contains(&leased));
        assert!(!content.contains(&garbage));
        assert!(snapshots.exists(&used_chain));
        assert!(snapshots.exists(&leased_chain));
        assert!(!snapshots.exists(&garbage_chain));
        let trash_left = fs::read_dir(dir.path().join("trash"))
            .expect("trash dir")
            .count();
        assert_eq!(trash_left, 0, "trash is emptied after the collection");
    }
}
