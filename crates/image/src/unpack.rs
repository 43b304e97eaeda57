//! Safe extraction of one layer's tar stream into an empty snapshot
//! directory.
//!
//! The `tar` crate only reads entries. Every entry is written here relative
//! to an open file descriptor of the snapshot root, never through a path
//! string: parents are resolved with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` and entries are created
//! with `*at` calls that do not follow a final symlink. A layer cannot
//! write outside its snapshot even with `..` components, absolute paths or
//! symlinks planted by earlier entries, and entries that try are rejected.
//!
//! Whiteouts become overlayfs whiteouts, the format the kernel's overlay
//! filesystem reads in a lower directory: `.wh.name` turns into a 0:0
//! character device `name`, and `.wh..wh..opq` into the
//! `trusted.overlay.opaque=y` xattr on its directory.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::Timespec;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps, XattrFlags, makedev};
use rustix::io::Errno;
use tar::EntryType;

use crate::ImageError;
use crate::digest::{Digest, HashingReader};

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps an OCI or Docker layer media type to its compression, or `None`
    /// for a media type that is not a layer this runtime can unpack.
    pub(crate) fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Some(Self::Zstd),
            _ => None,
        }
    }

    /// Detects the compression from the first bytes of a blob. Anything that
    /// is neither gzip nor zstd is taken as a plain tar.
    pub(crate) fn detect(magic: &[u8]) -> Self {
        if magic.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }

    /// Returns the OCI layer media type for this compression.
    pub(crate) fn oci_media_type(self) -> &'static str {
        match self {
            Self::None => "application/vnd.oci.image.layer.v1.tar",
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    pub(crate) fn decoder<'r>(self, blob: impl Read + 'r) -> io::Result<Box<dyn Read + 'r>> {
        let buffered = BufReader::with_capacity(128 * 1024, blob);
        Ok(match self {
            Self::None => Box::new(buffered),
            // Multi-member gzip streams are valid layers (pigz writes them).
            Self::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered)?),
        })
    }
}

/// The layer being unpacked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layer<'a> {
    /// Digest of the layer blob, named in errors.
    pub digest: &'a str,
    pub compression: Compression,
    /// Digest the uncompressed tar stream must have, from the image config.
    pub diff_id: &'a Digest,
}

/// Unpacks a layer blob into `dest`, an empty directory, and verifies the
/// digest of the uncompressed stream against the layer's diff ID.
///
/// On error `dest` may contain part of the layer, which the caller removes.
/// Nothing is ever written outside `dest`.
pub(crate) fn unpack_layer(
    blob: impl Read,
    layer: Layer<'_>,
    dest: &Path,
) -> Result<(), ImageError> {
    let root = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::Storage {
        step: "open snapshot directory",
        path: dest.to_path_buf(),
        source: e.into(),
    })?;

    let decoder = layer
        .compression
        .decoder(blob)
        .map_err(|source| stream_error(layer, "", source))?;
    let mut diff = HashingReader::new(decoder, layer.diff_id.algorithm());

    let mut unpacker = Unpacker::new(root, layer.digest);
    {
        let mut archive = tar::Archive::new(&mut diff);
        let entries = archive
            .entries()
            .map_err(|source| stream_error(layer, "", source))?;
        let mut last = String::new();
        for entry in entries {
            let mut entry = entry.map_err(|source| stream_error(layer, &last, source))?;
            last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            unpacker.apply(&mut entry, &last)?;
        }
    }
    unpacker.finish()?;

    // The diff ID covers the whole stream, including the zero blocks after
    // the last entry that the tar reader stops at.
    let (actual, _) = diff
        .finish()
        .map_err(|source| stream_error(layer, "", source))?;
    if &actual != layer.diff_id {
        return Err(ImageError::DigestMismatch {
            expected: layer.diff_id.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

fn stream_error(layer: Layer<'_>, entry: &str, source: io::Error) -> ImageError {
    ImageError::Unpack {
        layer: layer.digest.to_string(),
        entry: entry.to_string(),
        source,
    }
}

/// Namespace of the xattrs that control overlayfs.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Failure to resolve a path inside the snapshot.
enum ResolveError {
    /// A component is a symlink (or would leave the root).
    Symlink,
    Io(io::Error),
}

/// Ownership, mode, times and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    /// Permission bits including setuid, setgid and sticky.
    mode: u32,
    mtime: (i64, i64),
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Writes entries of one layer under an open snapshot root.
struct Unpacker<'a> {
    root: OwnedFd,
    layer: &'a str,
    /// Ownership is applied only as root: elsewhere `chown` fails for
    /// foreign ids, and an unprivileged store is only used by tests.
    chown: bool,
    /// Directory mtimes, applied after all entries because creating a
    /// child changes its directory's mtime. Keyed by path components.
    dir_times: BTreeMap<Vec<OsString>, (i64, i64)>,
    /// Parent directory of the previous entry, kept because consecutive
    /// entries usually share it.
    cached_parent: Option<(Vec<OsString>, OwnedFd)>,
}

impl<'a> Unpacker<'a> {
    fn new(root: OwnedFd, layer: &'a str) -> Self {
        Self {
            root,
            layer,
            chown: rustix::process::geteuid().is_root(),
            dir_times: BTreeMap::new(),
            cached_parent: None,
        }
    }

    fn unsafe_entry(&self, entry: &str, reason: &str) -> ImageError {
        ImageError::UnsafeLayerEntry {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            reason: reason.to_string(),
        }
    }

    fn failed(&self, entry: &str, source: impl Into<io::Error>) -> ImageError {
        ImageError::Unpack {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            source: source.into(),
        }
    }

    /// Writes one tar entry into the snapshot.
    fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        display: &str,
    ) -> Result<(), ImageError> {
        let raw_path = entry.path_bytes().into_owned();
        let mut kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        // Pre-POSIX archivers mark directories as regular files with a trailing slash.
        if kind == EntryType::Regular && raw_path.ends_with(b"/") {
            kind = EntryType::Directory;
        }

        let components =
            split_path(&raw_path).map_err(|reason| self.unsafe_entry(display, reason))?;
        let meta = read_meta(entry).map_err(|e| self.failed(display, e))?;

        let Some((name, parent_path)) = components.split_last() else {
            if kind != EntryType::Directory {
                return Err(self.unsafe_entry(display, "the layer root must be a directory"));
            }
            let root = self.root.try_clone().map_err(|e| self.failed(display, e))?;
            self.apply_dir_meta(&root, &[], &meta)
                .map_err(|e| self.failed(display, e))?;
            return Ok(());
        };

        if let Some(target) = name.as_bytes().strip_prefix(b".wh.") {
            return self.apply_whiteout(parent_path, target, &meta, display);
        }

        let parent = self.parent(parent_path, display)?;
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => self
                .write_file(&parent, name, entry, &meta)
                .map_err(|e| self.failed(display, e)),
            EntryType::Directory => self
                .write_dir(&parent, name, &components, &meta)
                .map_err(|e| self.failed(display, e)),
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(display, "symlink without a target"))?
                    .into_owned();
                self.write_symlink(&parent, name, &target, &meta)
                    .map_err(|e| self.failed(display, e))
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.unsafe_entry(display, "hard link without a target"))?
                    .into_owned();
                self.write_hard_link(&parent, name, &components, &target, display)
            }
            EntryType::Char | EntryType::Block => {
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    _ => FileType::BlockDevice,
                };
                let header = entry.header();
                let major = header.device_major().map_err(|e| self.failed(display, e))?;
                let minor = header.device_minor().map_err(|e| self.failed(display, e))?;
                let dev = makedev(major.unwrap_or(0), minor.unwrap_or(0));
                self.write_node(&parent, name, file_type, dev, &meta)
                    .map_err(|e| self.failed(display, e))
            }
            // A FIFO has no device number, and some archivers leave the fields empty.
            EntryType::Fifo => self
                .write_node(&parent, name, FileType::Fifo, 0, &meta)
                .map_err(|e| self.failed(display, e)),
            other => Err(self.failed(
                display,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unsupported tar entry type {other:?}"),
                ),
            )),
        }
    }

    /// Applies the deferred directory mtimes.
    fn finish(&mut self) -> Result<(), ImageError> {
        let times = std::mem::take(&mut self.dir_times);
        for (path, mtime) in times {
            let fd = match self.resolve(&path, false, OFlags::RDONLY | OFlags::DIRECTORY) {
                Ok(fd) => fd,
                // A later entry replaced or removed the directory.
                Err(ResolveError::Symlink) => continue,
                Err(ResolveError::Io(e)) if matches!(e.raw_os_error(), Some(code) if code == Errno::NOENT.raw_os_error() || code == Errno::NOTDIR.raw_os_error()) =>
                {
                    continue;
                }
                Err(ResolveError::Io(e)) => {
                    return Err(self.failed(&display_components(&path), e));
                }
            };
            rustix::fs::futimens(&fd, &timestamps(mtime))
                .map_err(|e| self.failed(&display_components(&path), e))?;
        }
        Ok(())
    }

    /// Opens the directory that contains an entry, creating missing parents
    /// (layers may omit them) and rejecting any path through a symlink.
    fn parent(&mut self, parent_path: &[OsString], display: &str) -> Result<OwnedFd, ImageError> {
        if let Some((cached, fd)) = &self.cached_parent
            && cached.as_slice() == parent_path
        {
            return fd.try_clone().map_err(|e| self.failed(display, e));
        }

        let fd = match self.resolve(parent_path, true, OFlags::PATH | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(ResolveError::Symlink) => {
                return Err(self.unsafe_entry(display, "the parent path goes through a symlink"));
            }
            Err(ResolveError::Io(e)) => return Err(self.failed(display, e)),
        };
        let copy = fd.try_clone().map_err(|e| self.failed(display, e))?;
        self.cached_parent = Some((parent_path.to_vec(), copy));
        Ok(fd)
    }

    /// Opens `path` below the root with `oflags`, never following a
    /// symlink. With `create`, missing directories are made on the way.
    fn resolve(
        &self,
        path: &[OsString],
        create: bool,
        oflags: OFlags,
    ) -> Result<OwnedFd, ResolveError> {
        let flags = oflags | OFlags::CLOEXEC;
        let joined = join_components(path);
        match openat2_beneath(&self.root, &joined, flags) {
            Ok(fd) => return Ok(fd),
            Err(Errno::NOENT) if create => {}
            Err(e) => return Err(resolve_error(e)),
        }

        // Walk one component at a time, creating what is missing.
        let mut current = self.root.try_clone().map_err(ResolveError::Io)?;
        for (i, component) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            let step_flags = if last {
                flags
            } else {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
            };
            let next = match openat2_beneath(&current, component, step_flags) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&current, component, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(ResolveError::Io(e.into())),
                    }
                    openat2_beneath(&current, component, step_flags)
                }
                other => other,
            };
            current = next.map_err(resolve_error)?;
        }
        Ok(current)
    }

    /// Makes room for a new entry `name`. An existing directory is kept when
    /// the new entry is a directory too, and anything else there is removed.
    /// Returns whether a directory was kept.
    fn clear_slot(&mut self, parent: &OwnedFd, name: &OsStr, keep_dir: bool) -> io::Result<bool> {
        let stat = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            if keep_dir {
                return Ok(true);
            }
            // The cached parent may lie inside the tree being removed.
            self.cached_parent = None;
            remove_tree(parent, name)?;
        } else {
            rustix::fs::unlinkat(parent, name, AtFlags::empty())?;
        }
        Ok(false)
    }

    fn write_file<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        entry: &mut tar::Entry<'_, R>,
        meta: &Meta,
    ) -> io::Result<()> {
        self.clear_slot(parent, name, false)?;
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut file = File::from(fd);
        io::copy(entry, &mut file)?;

        self.apply_fd_meta(&file, meta)?;
        rustix::fs::futimens(&file, &timestamps(meta.mtime))?;
        Ok(())
    }

    fn write_dir(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &[OsString],
        meta: &Meta,
    ) -> io::Result<()> {
        let exists = self.clear_slot(parent, name, true)?;
        if !exists {
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))?;
        }
        let dir = openat2_beneath(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?;
        self.apply_dir_meta(&dir, path, meta)
    }

    fn apply_dir_meta(&mut self, dir: &OwnedFd, path: &[OsString], meta: &Meta) -> io::Result<()> {
        self.apply_fd_meta(dir, meta)?;
        self.dir_times.insert(path.to_vec(), meta.mtime);
        Ok(())
    }

    fn write_symlink(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        target: &[u8],
        meta: &Meta,
    ) -> io::Result<()> {
        self.clear_slot(parent, name, false)?;
        // The target is data: it is stored as is and never followed here.
        rustix::fs::symlinkat(OsStr::from_bytes(target), parent, name)?;
        self.apply_path_meta(parent, name, meta, false)
    }

    fn write_hard_link(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &[OsString],
        target: &[u8],
        display: &str,
    ) -> Result<(), ImageError> {
        let target_path = split_path(target)
            .map_err(|reason| self.unsafe_entry(display, &format!("hard link target {reason}")))?;
        let Some((target_name, target_parent)) = target_path.split_last() else {
            return Err(self.unsafe_entry(display, "hard link target is the layer root"));
        };
        if target_path.as_slice() == path {
            // Some archivers emit a link of a file to itself, which changes nothing.
            return Ok(());
        }

        let target_dir = match self.resolve(target_parent, false, OFlags::PATH | OFlags::DIRECTORY)
        {
            Ok(fd) => fd,
            Err(ResolveError::Symlink) => {
                return Err(self.unsafe_entry(display, "hard link target goes through a symlink"));
            }
            Err(ResolveError::Io(e)) => return Err(self.failed(display, e)),
        };

        self.clear_slot(parent, name, false)
            .map_err(|e| self.failed(display, e))?;
        // Without AT_SYMLINK_FOLLOW a link to a symlink links the symlink itself.
        rustix::fs::linkat(&target_dir, target_name, parent, name, AtFlags::empty())
            .map_err(|e| self.failed(display, e))
    }

    fn write_node(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        file_type: FileType,
        dev: rustix::fs::Dev,
        meta: &Meta,
    ) -> io::Result<()> {
        self.clear_slot(parent, name, false)?;
        rustix::fs::mknodat(
            parent,
            name,
            file_type,
            Mode::from_raw_mode(meta.mode & 0o777),
            dev,
        )?;
        self.apply_path_meta(parent, name, meta, true)
    }

    fn apply_whiteout(
        &mut self,
        parent_path: &[OsString],
        target: &[u8],
        meta: &Meta,
        display: &str,
    ) -> Result<(), ImageError> {
        if target == b".wh..opq" {
            return self.apply_opaque(parent_path, display);
        }
        if target.starts_with(b".wh.") {
            // Other aufs metadata (`.wh..wh.plnk`, `.wh..wh.aufs`) has no
            // overlayfs meaning.
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(self.unsafe_entry(display, "whiteout of an invalid name"));
        }

        let parent = self.parent(parent_path, display)?;
        let name = OsStr::from_bytes(target);
        let result = self.clear_slot(&parent, name, false).and_then(|_| {
            rustix::fs::mknodat(
                &parent,
                name,
                FileType::CharacterDevice,
                Mode::empty(),
                makedev(0, 0),
            )?;
            if self.chown {
                chown_at(&parent, name, meta)?;
            }
            Ok(())
        });
        result.map_err(|e| self.failed(display, e))
    }

    fn apply_opaque(&mut self, dir_path: &[OsString], display: &str) -> Result<(), ImageError> {
        let dir = match self.resolve(dir_path, true, OFlags::RDONLY | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(ResolveError::Symlink) => {
                return Err(self.unsafe_entry(display, "the opaque directory is a symlink"));
            }
            Err(ResolveError::Io(e)) => return Err(self.failed(display, e)),
        };
        rustix::fs::fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
            .map_err(|e| self.failed(display, e))
    }

    /// Sets owner, mode and xattrs through an open file or directory.
    fn apply_fd_meta(&self, fd: impl AsFd, meta: &Meta) -> io::Result<()> {
        // chown clears setuid and setgid, so the mode comes after it.
        if self.chown {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(meta.uid)),
                Some(rustix::fs::Gid::from_raw(meta.gid)),
            )?;
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))?;
        for (name, value) in &meta.xattrs {
            ignore_unsupported(rustix::fs::fsetxattr(
                &fd,
                name.as_os_str(),
                value,
                XattrFlags::empty(),
            ))?;
        }
        Ok(())
    }

    /// Sets owner, mode (for device nodes and FIFOs), xattrs and mtime of an
    /// entry that cannot be opened: symlinks, devices and FIFOs.
    fn apply_path_meta(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> io::Result<()> {
        if self.chown {
            chown_at(parent, name, meta)?;
        }
        if chmod {
            // fchmodat follows a final symlink, but this entry was just
            // created by mknodat and the snapshot has no other writer.
            rustix::fs::chmodat(
                parent,
                name,
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )?;
        }
        if !meta.xattrs.is_empty() {
            // fsetxattr needs a readable fd, and opening a device node would
            // reach its driver. The parent fd's /proc entry plus a single
            // name component (no `/`) resolves to exactly this entry.
            let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            path.extend_from_slice(name.as_bytes());
            let path = OsStr::from_bytes(&path);
            for (xattr, value) in &meta.xattrs {
                ignore_unsupported(rustix::fs::lsetxattr(
                    path,
                    xattr.as_os_str(),
                    value,
                    XattrFlags::empty(),
                ))?;
            }
        }
        rustix::fs::utimensat(
            parent,
            name,
            &timestamps(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }
}

fn chown_at(parent: &OwnedFd, name: &OsStr, meta: &Meta) -> io::Result<()> {
    rustix::fs::chownat(
        parent,
        name,
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Treats "xattrs not supported" as success: an image's SELinux labels or
/// similar cannot be kept on a filesystem without them, and the container
/// still runs.
fn ignore_unsupported(result: rustix::io::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) | Err(Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn openat2_beneath(
    dir: &OwnedFd,
    path: impl AsRef<OsStr>,
    oflags: OFlags,
) -> Result<OwnedFd, Errno> {
    let path = path.as_ref();
    // RESOLVE_BENEATH fails with EAGAIN when a rename races the lookup. The
    // snapshot has no other writer, so a few retries are plenty.
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(dir, path, oflags, Mode::empty(), RESOLVE) {
            Err(Errno::AGAIN) if attempts < 8 => attempts += 1,
            other => return other,
        }
    }
}

fn resolve_error(e: Errno) -> ResolveError {
    match e {
        // ELOOP: a symlink met under RESOLVE_NO_SYMLINKS. EXDEV: an escape
        // from the root, which `split_path` already rules out.
        Errno::LOOP | Errno::XDEV => ResolveError::Symlink,
        other => ResolveError::Io(other.into()),
    }
}

/// Removes a directory tree below `parent` without following symlinks.
fn remove_tree(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut children = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let child = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        if child != "." && child != ".." {
            children.push(child);
        }
    }
    for child in children {
        let stat = rustix::fs::statat(&dir, &child, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            remove_tree(&dir, &child)?;
        } else {
            rustix::fs::unlinkat(&dir, &child, AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

/// Splits an entry path into its components, dropping empty and `.` ones.
/// Rejects absolute paths and `..` components.
fn split_path(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.starts_with(b"/") {
        return Err("is an absolute path");
    }
    let mut components = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("has a .. component"),
            name => components.push(OsString::from_vec(name.to_vec())),
        }
    }
    Ok(components)
}

fn join_components(path: &[OsString]) -> OsString {
    if path.is_empty() {
        return OsString::from(".");
    }
    let mut joined = OsString::new();
    for (i, component) in path.iter().enumerate() {
        if i > 0 {
            joined.push("/");
        }
        joined.push(component);
    }
    joined
}

fn display_components(path: &[OsString]) -> String {
    join_components(path).to_string_lossy().into_owned()
}

fn timestamps((sec, nsec): (i64, i64)) -> Timestamps {
    let time = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

/// Reads ownership, mode, mtime and xattrs from the header and the entry's
/// PAX records, which override the header's fixed-size fields.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let mut uid = header.uid()?;
    let mut gid = header.gid()?;
    let mode = header.mode()? & 0o7777;
    let mut mtime = (i64::try_from(header.mtime()?).unwrap_or(i64::MAX), 0);
    let mut xattrs = Vec::new();

    if let Some(pax) = entry.pax_extensions()? {
        for record in pax {
            let record = record?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                // overlayfs reads `trusted.overlay.*` on lower directories
                // (opaque, redirect, metacopy). Only whiteout entries may
                // set them, never a layer's own xattr records.
                if !name.starts_with(OVERLAY_XATTR_PREFIX) {
                    xattrs.push((OsString::from_vec(name.to_vec()), value.to_vec()));
                }
                continue;
            }
            match key {
                b"uid" => uid = parse_decimal(value)?,
                b"gid" => gid = parse_decimal(value)?,
                b"mtime" => mtime = parse_pax_time(value)?,
                _ => {}
            }
        }
    }

    let id = |value: u64, what: &str| {
        u32::try_from(value).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what} {value} does not fit in 32 bits"),
            )
        })
    };
    Ok(Meta {
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mode,
        mtime,
        xattrs,
    })
}

fn invalid_pax(value: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "invalid number {:?} in a PAX record",
            String::from_utf8_lossy(value)
        ),
    )
}

fn parse_decimal(value: &[u8]) -> io::Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid_pax(value))
}

/// Parses a PAX time, `seconds[.fraction]`, into seconds and nanoseconds.
fn parse_pax_time(value: &[u8]) -> io::Result<(i64, i64)> {
    let text = std::str::from_utf8(value).map_err(|_| invalid_pax(value))?;
    let (secs, fraction) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().map_err(|_| invalid_pax(value))?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid_pax(value));
    }
    // Keep nanosecond precision: pad or cut the fraction to 9 digits.
    let digits: String = fraction
        .chars()
        .chain(std::iter::repeat('0'))
        .take(9)
        .collect();
    let mut nanos: i64 = digits.parse().map_err(|_| invalid_pax(value))?;
    // A negative time such as "-1.5" means 1.5 seconds before the epoch,
    // which is -2 seconds plus 0.5 seconds.
    if text.starts_with('-') && nanos > 0 {
        nanos = 1_000_000_000 - nanos;
        return Ok((secs - 1, nanos));
    }
    Ok((secs, nanos))
}

#[cfg(test)]
mod tests;
