//! Snapshots: one directory per layer under `snapshots/<chain-id hex>/`,
//! holding that layer's diff unpacked, with overlayfs whiteouts. A
//! container's root filesystem stacks them as overlay lower directories.
//!
//! A snapshot is unpacked into `snapshots/tmp-<random>/` and renamed into
//! place only when complete and verified, so a snapshot directory that
//! exists is always whole. Images that share a chain of layers share the
//! snapshots.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::ImageError;
use crate::content::{random_name, remove_dir_if_exists, sync_dir};
use crate::digest::Digest;
use crate::unpack::{Layer, unpack_layer};

const TMP_PREFIX: &str = "tmp-";

/// The snapshot directories under `<root>/snapshots`.
#[derive(Debug, Clone)]
pub(crate) struct Snapshots {
    dir: PathBuf,
}

impl Snapshots {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            dir: root.join("snapshots"),
        }
    }

    /// Creates the snapshots directory and removes every unfinished
    /// `tmp-*` snapshot that an interrupted unpack left behind.
    pub(crate) fn init(&self) -> Result<(), ImageError> {
        fs::create_dir_all(&self.dir).map_err(ImageError::storage(
            "create snapshots directory",
            self.dir.clone(),
        ))?;
        for name in self.read_names()? {
            if name.starts_with(TMP_PREFIX) {
                remove_dir_if_exists(&self.dir.join(&name), "remove unfinished snapshot")?;
            }
        }
        Ok(())
    }

    /// Returns the directory of the snapshot of a chain ID.
    pub(crate) fn path(&self, chain_id: &Digest) -> PathBuf {
        self.dir.join(chain_id.hex())
    }

    pub(crate) fn exists(&self, chain_id: &Digest) -> bool {
        self.path(chain_id).is_dir()
    }

    /// Unpacks a layer into the snapshot of `chain_id` unless that snapshot
    /// already exists. Returns whether it unpacked. On any error the partial
    /// snapshot is removed and no snapshot exists for the chain ID.
    pub(crate) fn create(
        &self,
        chain_id: &Digest,
        blob: impl Read,
        layer: Layer<'_>,
    ) -> Result<bool, ImageError> {
        let target = self.path(chain_id);
        if target.is_dir() {
            return Ok(false);
        }

        let tmp = TmpDir::create(&self.dir)?;
        unpack_layer(blob, layer, &tmp.path)?;

        // Flush the unpacked files before the rename makes the snapshot
        // count as complete. One syncfs is far cheaper than an fsync per file.
        let handle = fs::File::open(&tmp.path).map_err(ImageError::storage(
            "open unpacked snapshot",
            tmp.path.clone(),
        ))?;
        rustix::fs::syncfs(&handle).map_err(|e| ImageError::Storage {
            step: "sync unpacked snapshot",
            path: tmp.path.clone(),
            source: e.into(),
        })?;
        drop(handle);

        match fs::rename(&tmp.path, &target) {
            Ok(()) => {}
            // Another unpack of the same chain finished first, and its result
            // is the same verified content.
            Err(e) if target.is_dir() && is_exists_error(&e) => return Ok(false),
            Err(source) => {
                return Err(ImageError::Storage {
                    step: "move snapshot into place",
                    path: target,
                    source,
                });
            }
        }
        tmp.disarm();
        sync_dir(&self.dir, "sync snapshots directory")?;
        Ok(true)
    }

    /// Lists the chain IDs of all complete snapshots.
    pub(crate) fn list(&self) -> Result<Vec<Digest>, ImageError> {
        Ok(self
            .read_names()?
            .iter()
            .filter_map(|name| Digest::from_sha256_hex(name).ok())
            .collect())
    }

    fn read_names(&self) -> Result<Vec<String>, ImageError> {
        let error = ImageError::storage("list snapshots", self.dir.clone());
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(&error)? {
            let entry = entry.map_err(&error)?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
}

fn is_exists_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOTEMPTY.raw_os_error()
            || code == rustix::io::Errno::EXIST.raw_os_error()
    )
}

/// A `tmp-<random>` directory, removed on drop unless it was renamed into place.
struct TmpDir {
    path: PathBuf,
    armed: bool,
}

impl TmpDir {
    fn create(snapshots: &Path) -> Result<Self, ImageError> {
        let path = snapshots.join(format!("{TMP_PREFIX}{}", random_name()));
        let error = |path: &Path, source| ImageError::Storage {
            step: "create snapshot directory",
            path: path.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .map_err(|e| error(&path, e))?;
        let dir = Self { path, armed: true };
        // The umask may have narrowed the mode. Lower layers need 0755 roots
        // unless the layer's own root entry sets another mode.
        fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o755))
            .map_err(|e| error(&dir.path, e))?;
        Ok(dir)
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if self.armed {
            // std's remove_dir_all does not follow symlinks, so a hostile
            // layer's links cannot redirect the removal. Leftovers are
            // removed by `Snapshots::init` at the next start.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use tar::{EntryType, Header};

    use super::*;
    use crate::unpack::Compression;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, kind: EntryType, data: &[u8]) {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        builder
            .append_data(&mut header, path, data)
            .expect("append entry");
    }

    fn layer(entries: &[(&str, EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            entry(&mut builder, path, *kind, data);
        }
        builder.into_inner().expect("finish tar")
    }

    fn create(snapshots: &Snapshots, tar: &[u8], chain_id: &Digest) -> Result<bool, ImageError> {
        let diff_id = Digest::sha256_of(tar);
        snapshots.create(
            chain_id,
            tar,
            Layer {
                digest: "sha256:layer",
                compression: Compression::None,
                diff_id: &diff_id,
            },
        )
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("list dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn create_unpacks_once_and_reuses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let snapshots = Snapshots::new(dir.path());
        snapshots.init().expect("init");
        let tar = layer(&[("hello", EntryType::Regular, b"world")]);
        let chain = Digest::sha256_of(&tar);

        assert!(create(&snapshots, &tar, &chain).expect("first create"));
        assert!(
            !create(&snapshots, &tar, &chain).expect("second create"),
            "reused"
        );

        assert_eq!(
            fs::read(snapshots.path(&chain).join("hello")).expect("read"),
            b"world"
        );
        assert_eq!(
            names(&dir.path().join("snapshots")),
            vec![chain.hex().to_string()]
        );
        assert_eq!(snapshots.list().expect("list"), vec![chain]);
    }

    #[test]
    fn failed_unpack_leaves_no_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let snapshots = Snapshots::new(dir.path());
        snapshots.init().expect("init");
        let tar = layer(&[("ok", EntryType::Regular, b"x")]);
        let chain = Digest::sha256_of(b"chain");
        let wrong_diff_id = Digest::sha256_of(b"not this layer");

        let err = snapshots
            .create(
                &chain,
                &tar[..],
                Layer {
                    digest: "sha256:layer",
                    compression: Compression::None,
                    diff_id: &wrong_diff_id,
                },
            )
            .expect_err("diff id mismatch");

        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!snapshots.exists(&chain));
        assert!(
            names(&dir.path().join("snapshots")).is_empty(),
            "tmp dir removed"
        );
    }

    #[test]
    fn init_removes_unfinished_snapshots() {
        let dir = tempfile::tempdir().expect("temp dir");
        let snapshots = Snapshots::new(dir.path());
        snapshots.init().expect("init");
        let done = Digest::sha256_of(b"done");
        fs::create_dir(snapshots.path(&done)).expect("complete snapshot");
        let unfinished = dir.path().join("snapshots").join("tmp-0123456789abcdef");
        fs::create_dir(&unfinished).expect("unfinished snapshot");
        fs::write(unfinished.join("partial"), b"x").expect("partial file");

        snapshots.init().expect("reinit");

        assert!(!unfinished.exists());
        assert!(snapshots.exists(&done));
    }

    /// Unmounts on drop, so a failed assertion does not leave a mount behind.
    struct Mount(PathBuf);

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn overlay_of_two_snapshots_shows_merged_view() {
        if !is_root() {
            eprintln!("skipping: mounting overlayfs needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let snapshots = Snapshots::new(dir.path());
        snapshots.init().expect("init");

        let lower_tar = layer(&[
            ("etc/", EntryType::Directory, b""),
            ("etc/keep", EntryType::Regular, b"kept"),
            ("etc/gone", EntryType::Regular, b"deleted above"),
            ("cache/", EntryType::Directory, b""),
            ("cache/old", EntryType::Regular, b"hidden by opaque"),
        ]);
        let upper_tar = layer(&[
            ("etc/.wh.gone", EntryType::Regular, b""),
            ("etc/new", EntryType::Regular, b"added"),
            ("cache/.wh..wh..opq", EntryType::Regular, b""),
            ("cache/fresh", EntryType::Regular, b"visible"),
        ]);
        let lower_chain = Digest::sha256_of(&lower_tar);
        let upper_chain = Digest::sha256_of(b"upper chain");
        create(&snapshots, &lower_tar, &lower_chain).expect("unpack lower layer");
        create(&snapshots, &upper_tar, &upper_chain).expect("unpack upper layer");

        let merged = dir.path().join("merged");
        fs::create_dir(&merged).expect("create mountpoint");
        // overlayfs lists lower directories top first.
        let options = format!(
            "lowerdir={}:{}",
            snapshots.path(&upper_chain).display(),
            snapshots.path(&lower_chain).display()
        );
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount overlay with {options}");
        let mount = Mount(merged.clone());

        assert_eq!(
            fs::read(merged.join("etc/keep")).expect("read keep"),
            b"kept"
        );
        assert_eq!(
            fs::read(merged.join("etc/new")).expect("read new"),
            b"added"
        );
        assert!(
            !merged.join("etc/gone").exists(),
            "whiteout hides the lower file"
        );
        assert!(
            !merged.join("cache/old").exists(),
            "opaque dir hides lower entries"
        );
        assert_eq!(
            fs::read(merged.join("cache/fresh")).expect("read fresh"),
            b"visible"
        );
        assert_eq!(names(&merged.join("cache")), vec!["fresh".to_string()]);
        assert_eq!(
            names(&merged.join("etc")),
            vec!["keep".to_string(), "new".to_string()]
        );

        drop(mount);
        let merged_meta = fs::metadata(&merged).expect("stat mountpoint");
        let parent_meta = fs::metadata(dir.path()).expect("stat parent");
        assert_eq!(merged_meta.dev(), parent_meta.dev(), "overlay is unmounted");
    }
}
