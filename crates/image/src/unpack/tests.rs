//! Tests of layer unpacking: entry types and metadata, whiteouts, and
//! hostile layers that try to write outside the snapshot.
//!
//! Every hostile case points its escape at a `sentinel` directory next to
//! the snapshot root, so a broken unpacker would change the sentinel (and
//! nothing else on the machine), and the test checks that it did not.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::*;
use crate::digest::Digest;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips a test that needs root, saying so in the test output.
macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipping: this test needs root (chown, mknod, trusted xattrs)");
            return;
        }
    };
}

const MTIME: u64 = 1_600_000_000;

/// Builds a header with a raw path, bypassing the `tar` crate's path checks
/// so that hostile paths can be written.
fn header(path: &[u8], kind: EntryType, size: u64, mode: u32) -> Header {
    let mut header = Header::new_gnu();
    let name = &mut header.as_old_mut().name;
    assert!(path.len() < name.len(), "test paths fit the 100-byte field");
    name[..path.len()].copy_from_slice(path);
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    header
}

fn set_link(header: &mut Header, target: &[u8]) {
    let field = &mut header.as_old_mut().linkname;
    assert!(
        target.len() < field.len(),
        "test link targets fit the 100-byte field"
    );
    field[..target.len()].copy_from_slice(target);
}

/// A layer tar under construction.
struct LayerTar {
    builder: tar::Builder<Vec<u8>>,
}

impl LayerTar {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn append(&mut self, mut header: Header, data: &[u8]) -> &mut Self {
        header.set_cksum();
        self.builder.append(&header, data).expect("append entry");
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let h = header(
            path.as_bytes(),
            EntryType::Regular,
            data.len() as u64,
            0o644,
        );
        self.append(h, data)
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = header(path.as_bytes(), EntryType::Directory, 0, mode);
        self.append(h, &[])
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(path.as_bytes(), EntryType::Symlink, 0, 0o777);
        set_link(&mut h, target.as_bytes());
        self.append(h, &[])
    }

    fn hard_link(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = header(path.as_bytes(), EntryType::Link, 0, 0o644);
        set_link(&mut h, target.as_bytes());
        self.append(h, &[])
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.builder
            .append_pax_extensions(records.iter().copied())
            .expect("append pax records");
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().expect("finish tar")
    }
}

/// A snapshot root next to a sentinel directory holding one file.
struct Sandbox {
    _base: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    sentinel: PathBuf,
}

const LAYER: &str = "sha256:test-layer";

impl Sandbox {
    fn new() -> Self {
        let base_dir = tempfile::tempdir().expect("temp dir");
        let base = base_dir.path().to_path_buf();
        let root = base.join("root");
        let sentinel = base.join("sentinel");
        fs::create_dir(&root).expect("create root");
        fs::create_dir(&sentinel).expect("create sentinel");
        fs::write(sentinel.join("keep"), b"original").expect("write sentinel file");
        Self {
            _base: base_dir,
            base,
            root,
            sentinel,
        }
    }

    fn unpack(&self, tar: &[u8]) -> Result<(), ImageError> {
        self.unpack_as(tar, tar, Compression::None)
    }

    /// Unpacks `blob`, whose uncompressed form is `tar`.
    fn unpack_as(
        &self,
        blob: &[u8],
        tar: &[u8],
        compression: Compression,
    ) -> Result<(), ImageError> {
        let diff_id = Digest::sha256_of(tar);
        unpack_layer(
            blob,
            Layer {
                digest: LAYER,
                compression,
                diff_id: &diff_id,
            },
            &self.root,
        )
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    /// Asserts that nothing outside the root changed.
    fn assert_sentinel_untouched(&self) {
        let mut outside: Vec<String> = fs::read_dir(&self.base)
            .expect("list base")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        outside.sort();
        assert_eq!(
            outside,
            vec!["root".to_string(), "sentinel".to_string()],
            "base dir changed"
        );

        let inside: Vec<String> = fs::read_dir(&self.sentinel)
            .expect("list sentinel")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(inside, vec!["keep".to_string()], "sentinel dir changed");

        let keep = self.sentinel.join("keep");
        assert_eq!(fs::read(&keep).expect("read sentinel file"), b"original");
        let meta = fs::symlink_metadata(&keep).expect("stat sentinel file");
        assert_eq!(meta.nlink(), 1, "sentinel file gained a hard link");
    }
}

fn assert_unsafe(result: Result<(), ImageError>, entry: &str) {
    match result {
        Err(ImageError::UnsafeLayerEntry {
            layer,
            entry: got,
            reason,
        }) => {
            assert_eq!(layer, LAYER);
            assert_eq!(got, entry, "reason: {reason}");
        }
        other => panic!("expected UnsafeLayerEntry for {entry:?}, got {other:?}"),
    }
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

// --- hostile layers ---

#[test]
fn dotdot_path_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new().file("../sentinel/x", b"escaped").finish();
    assert_unsafe(sandbox.unpack(&tar), "../sentinel/x");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn inner_dotdot_component_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .dir("a/", 0o755)
        .file("a/../../sentinel/x", b"escaped")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "a/../../sentinel/x");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn absolute_path_is_rejected() {
    let sandbox = Sandbox::new();
    // Were the path honoured, the file would land in the sentinel directory.
    let path = format!("{}/x", sandbox.sentinel.display());
    let tar = LayerTar::new().file(&path, b"escaped").finish();
    assert_unsafe(sandbox.unpack(&tar), &path);
    sandbox.assert_sentinel_untouched();
}

#[test]
fn file_through_absolute_symlink_is_rejected() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    let tar = LayerTar::new()
        .symlink("a", &target)
        .file("a/file", b"escaped")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "a/file");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn file_through_relative_symlink_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .symlink("a", "../sentinel")
        .file("a/file", b"escaped")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "a/file");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn file_through_symlink_chain_is_rejected() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    let tar = LayerTar::new()
        .symlink("b", &target)
        .symlink("a", "b")
        .file("a/file", b"escaped")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "a/file");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn deep_file_through_symlinked_directory_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .dir("usr/", 0o755)
        .symlink("usr/lib", "../../sentinel")
        .file("usr/lib/x/y", b"escaped")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "usr/lib/x/y");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn hard_link_outside_with_dotdot_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new().hard_link("h", "../sentinel/keep").finish();
    assert_unsafe(sandbox.unpack(&tar), "h");
    sandbox.assert_sentinel_untouched();
    assert!(!sandbox.path("h").exists());
}

#[test]
fn hard_link_to_passwd_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new().hard_link("h", "../../etc/passwd").finish();
    assert_unsafe(sandbox.unpack(&tar), "h");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn hard_link_with_absolute_target_is_rejected() {
    let sandbox = Sandbox::new();
    let target = format!("{}/keep", sandbox.sentinel.display());
    let tar = LayerTar::new().hard_link("h", &target).finish();
    assert_unsafe(sandbox.unpack(&tar), "h");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn hard_link_through_symlink_is_rejected() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    let tar = LayerTar::new()
        .symlink("s", &target)
        .hard_link("h", "s/keep")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "h");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn whiteout_through_symlink_is_rejected() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    // Followed, this would replace the sentinel file with a whiteout.
    let tar = LayerTar::new()
        .symlink("s", &target)
        .file("s/.wh.keep", b"")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "s/.wh.keep");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn opaque_marker_through_symlink_is_rejected() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    let tar = LayerTar::new()
        .symlink("s", &target)
        .file("s/.wh..wh..opq", b"")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "s/.wh..wh..opq");
    sandbox.assert_sentinel_untouched();
    assert!(xattr(&sandbox.sentinel, "trusted.overlay.opaque").is_none());
}

#[test]
fn whiteout_of_dotdot_is_rejected() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new().file("a/.wh...", b"").finish();
    assert_unsafe(sandbox.unpack(&tar), "a/.wh...");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn directory_replaced_by_symlink_is_not_followed_later() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    // `d/x` leaves `d` as the cached parent, and the symlink replacing `d`
    // must not let `d/y` through.
    let tar = LayerTar::new()
        .dir("d/", 0o755)
        .file("d/x", b"first")
        .symlink("d", &target)
        .file("d/y", b"escaped")
        .finish();
    assert_unsafe(sandbox.unpack(&tar), "d/y");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn file_over_symlink_replaces_the_symlink() {
    let sandbox = Sandbox::new();
    let target = format!("{}/keep", sandbox.sentinel.display());
    let tar = LayerTar::new()
        .symlink("f", &target)
        .file("f", b"new content")
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    let meta = fs::symlink_metadata(sandbox.path("f")).expect("stat f");
    assert!(
        meta.file_type().is_file(),
        "the symlink is replaced, not written through"
    );
    assert_eq!(fs::read(sandbox.path("f")).expect("read f"), b"new content");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn directory_over_symlink_replaces_the_symlink() {
    let sandbox = Sandbox::new();
    let target = sandbox.sentinel.display().to_string();
    let tar = LayerTar::new()
        .symlink("d", &target)
        .dir("d/", 0o755)
        .file("d/x", b"inside")
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    assert!(
        fs::symlink_metadata(sandbox.path("d"))
            .expect("stat d")
            .is_dir()
    );
    assert_eq!(fs::read(sandbox.path("d/x")).expect("read d/x"), b"inside");
    sandbox.assert_sentinel_untouched();
}

#[test]
fn symlink_targets_are_stored_verbatim() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .symlink("abs", "/etc/passwd")
        .symlink("rel", "../../../outside")
        .finish();

    sandbox.unpack(&tar).expect("symlink targets are data");

    assert_eq!(
        fs::read_link(sandbox.path("abs")).expect("readlink"),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read_link(sandbox.path("rel")).expect("readlink"),
        Path::new("../../../outside")
    );
    sandbox.assert_sentinel_untouched();
}

#[test]
fn hard_link_to_symlink_links_symlink() {
    let sandbox = Sandbox::new();
    let target = format!("{}/keep", sandbox.sentinel.display());
    let tar = LayerTar::new()
        .symlink("s", &target)
        .hard_link("h", "s")
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    let meta = fs::symlink_metadata(sandbox.path("h")).expect("stat h");
    assert!(meta.file_type().is_symlink());
    sandbox.assert_sentinel_untouched();
}

// --- entry types and metadata ---

#[test]
fn regular_files_directories_and_links_are_unpacked() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o755)
        .file("./etc/hostname", b"box\n")
        .symlink("./etc/alias", "hostname")
        .hard_link("./etc/hostname2", "./etc/hostname")
        .file("deep/missing/parents/file", b"x")
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    assert_eq!(
        fs::read(sandbox.path("etc/hostname")).expect("read"),
        b"box\n"
    );
    assert_eq!(
        fs::read_link(sandbox.path("etc/alias")).expect("readlink"),
        Path::new("hostname")
    );
    let a = fs::metadata(sandbox.path("etc/hostname")).expect("stat");
    let b = fs::metadata(sandbox.path("etc/hostname2")).expect("stat");
    assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
    assert_eq!(
        fs::read(sandbox.path("deep/missing/parents/file")).expect("read"),
        b"x"
    );
    let implicit = fs::metadata(sandbox.path("deep/missing")).expect("stat implicit parent");
    assert_eq!(implicit.permissions().mode() & 0o7777, 0o755);
}

#[test]
fn ownership_mode_and_mtime_are_applied() {
    require_root!();
    let sandbox = Sandbox::new();
    let mut tar = LayerTar::new();
    let mut h = header(b"bin/su", EntryType::Regular, 3, 0o4755);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_mtime(1_000_000_000);
    tar.dir("bin/", 0o755).append(h, b"elf");
    let mut d = header(b"tmp/", EntryType::Directory, 0, 0o1777);
    d.set_mtime(1_500_000_000);
    tar.append(d, &[]).file("tmp/child", b"later");
    let mut g = header(b"shared/", EntryType::Directory, 0, 0o2775);
    g.set_gid(100);
    tar.append(g, &[]);
    let tar = tar.finish();

    sandbox.unpack(&tar).expect("unpack");

    let su = fs::metadata(sandbox.path("bin/su")).expect("stat su");
    assert_eq!(
        su.permissions().mode() & 0o7777,
        0o4755,
        "setuid survives chown"
    );
    assert_eq!(su.uid(), 1234);
    assert_eq!(su.gid(), 5678);
    assert_eq!(su.mtime(), 1_000_000_000);

    let tmp = fs::metadata(sandbox.path("tmp")).expect("stat tmp");
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "sticky bit");
    assert_eq!(
        tmp.mtime(),
        1_500_000_000,
        "directory mtime is set after its children"
    );

    let shared = fs::metadata(sandbox.path("shared")).expect("stat shared");
    assert_eq!(
        shared.permissions().mode() & 0o7777,
        0o2775,
        "setgid directory"
    );
    assert_eq!(shared.gid(), 100);
}

#[test]
fn symlink_metadata_spares_its_target() {
    require_root!();
    let sandbox = Sandbox::new();
    let target = format!("{}/keep", sandbox.sentinel.display());
    let mut h = header(b"link", EntryType::Symlink, 0, 0o777);
    set_link(&mut h, target.as_bytes());
    h.set_uid(4321);
    h.set_mtime(1_234_567_890);
    let tar = LayerTar::new().append(h, &[]).finish();
    let before = fs::metadata(sandbox.sentinel.join("keep")).expect("stat sentinel");

    sandbox.unpack(&tar).expect("unpack");

    let link = fs::symlink_metadata(sandbox.path("link")).expect("lstat link");
    assert_eq!(link.uid(), 4321);
    assert_eq!(link.mtime(), 1_234_567_890);
    let after = fs::metadata(sandbox.sentinel.join("keep")).expect("stat sentinel");
    assert_eq!(after.uid(), before.uid());
    assert_eq!(after.mtime(), before.mtime());
    sandbox.assert_sentinel_untouched();
}

#[test]
fn device_nodes_and_fifos_are_created() {
    require_root!();
    let sandbox = Sandbox::new();
    let mut tar = LayerTar::new();
    let mut null = header(b"dev/null", EntryType::Char, 0, 0o666);
    null.set_device_major(1).expect("major");
    null.set_device_minor(3).expect("minor");
    let mut loop0 = header(b"dev/loop0", EntryType::Block, 0, 0o660);
    loop0.set_device_major(7).expect("major");
    loop0.set_device_minor(0).expect("minor");
    let fifo = header(b"run/fifo", EntryType::Fifo, 0, 0o600);
    tar.append(null, &[]).append(loop0, &[]).append(fifo, &[]);
    let tar = tar.finish();

    sandbox.unpack(&tar).expect("unpack");

    let null = fs::symlink_metadata(sandbox.path("dev/null")).expect("stat null");
    assert!(null.file_type().is_char_device());
    assert_eq!(rustix::fs::major(null.rdev()), 1);
    assert_eq!(rustix::fs::minor(null.rdev()), 3);
    assert_eq!(null.permissions().mode() & 0o7777, 0o666);
    let loop0 = fs::symlink_metadata(sandbox.path("dev/loop0")).expect("stat loop0");
    assert!(loop0.file_type().is_block_device());
    assert_eq!(rustix::fs::major(loop0.rdev()), 7);
    let fifo = fs::symlink_metadata(sandbox.path("run/fifo")).expect("stat fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn pax_xattrs_and_mtime_are_applied() {
    require_root!();
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .pax(&[
            ("SCHILY.xattr.user.note", b"hello"),
            ("SCHILY.xattr.trusted.marker", b"m"),
            ("mtime", b"1700000000.25"),
            ("uid", b"3000000"),
        ])
        .file("file", b"data")
        .pax(&[("SCHILY.xattr.trusted.devnote", b"d")])
        .append(header(b"fifo", EntryType::Fifo, 0, 0o644), &[])
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    let file = sandbox.path("file");
    assert_eq!(xattr(&file, "user.note").as_deref(), Some(&b"hello"[..]));
    assert_eq!(xattr(&file, "trusted.marker").as_deref(), Some(&b"m"[..]));
    let meta = fs::metadata(&file).expect("stat file");
    assert_eq!(meta.mtime(), 1_700_000_000);
    assert_eq!(meta.mtime_nsec(), 250_000_000);
    assert_eq!(meta.uid(), 3_000_000, "PAX uid overrides the header");
    assert_eq!(
        xattr(&sandbox.path("fifo"), "trusted.devnote").as_deref(),
        Some(&b"d"[..])
    );
}

#[test]
fn overlay_xattrs_from_pax_records_are_dropped() {
    require_root!();
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .pax(&[
            ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.user.kept", b"k"),
        ])
        .dir("d/", 0o755)
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    let dir = sandbox.path("d");
    assert!(xattr(&dir, "trusted.overlay.redirect").is_none());
    assert!(xattr(&dir, "trusted.overlay.opaque").is_none());
    assert_eq!(xattr(&dir, "user.kept").as_deref(), Some(&b"k"[..]));
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    require_root!();
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .dir("etc/", 0o755)
        .file("etc/.wh.removed", b"")
        .file(".wh.toplevel", b"")
        .file("var/cache/.wh..wh..opq", b"")
        .file("etc/.wh..wh.plnk", b"")
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    for path in ["etc/removed", "toplevel"] {
        let meta = fs::symlink_metadata(sandbox.path(path)).expect("stat whiteout");
        assert!(
            meta.file_type().is_char_device(),
            "{path} is a character device"
        );
        assert_eq!(meta.rdev(), 0, "{path} is device 0:0");
    }
    assert!(!sandbox.path("etc/.wh.removed").exists());
    assert!(
        !sandbox.path("etc/.wh..wh.plnk").exists(),
        "aufs metadata is ignored"
    );
    assert!(!sandbox.path("var/cache/.wh..wh..opq").exists());
    assert_eq!(
        xattr(&sandbox.path("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
}

#[test]
fn later_entries_replace_earlier_ones() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .file("a", b"file first")
        .dir("a/", 0o755)
        .file("a/b", b"now a directory")
        .dir("c/", 0o755)
        .file("c/x", b"child")
        .file("c", b"now a file")
        .file("f", b"old")
        .file("f", b"new")
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    assert_eq!(
        fs::read(sandbox.path("a/b")).expect("read a/b"),
        b"now a directory"
    );
    assert_eq!(fs::read(sandbox.path("c")).expect("read c"), b"now a file");
    assert_eq!(fs::read(sandbox.path("f")).expect("read f"), b"new");
}

#[test]
fn repeated_directory_updates_metadata_and_keeps_children() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new()
        .dir("d/", 0o755)
        .file("d/f", b"kept")
        .dir("d/", 0o700)
        .finish();

    sandbox.unpack(&tar).expect("unpack");

    assert_eq!(fs::read(sandbox.path("d/f")).expect("read d/f"), b"kept");
    let mode = fs::metadata(sandbox.path("d"))
        .expect("stat d")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o700);
}

#[test]
fn root_entry_sets_root_metadata() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new().dir("./", 0o750).finish();
    sandbox.unpack(&tar).expect("unpack");
    let mode = fs::metadata(&sandbox.root)
        .expect("stat root")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o750);
}

#[test]
fn long_paths_are_unpacked() {
    let sandbox = Sandbox::new();
    let long = format!("{}/{}", "d".repeat(80), "f".repeat(80));
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h.set_entry_type(EntryType::Regular);
    builder
        .append_data(&mut h, &long, &b"long"[..])
        .expect("append long path");
    let tar = builder.into_inner().expect("finish");

    sandbox.unpack(&tar).expect("unpack");

    assert_eq!(
        fs::read(sandbox.path(&long)).expect("read long path"),
        b"long"
    );
}

// --- compression and diff IDs ---

fn sample_layer() -> Vec<u8> {
    LayerTar::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", b"ID=test\n")
        .finish()
}

#[test]
fn gzip_layer_is_unpacked_and_verified() {
    let sandbox = Sandbox::new();
    let tar = sample_layer();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&tar).expect("compress");
    let blob = encoder.finish().expect("finish gzip");
    assert_eq!(Compression::detect(&blob), Compression::Gzip);

    sandbox
        .unpack_as(&blob, &tar, Compression::Gzip)
        .expect("unpack gzip");

    assert_eq!(
        fs::read(sandbox.path("etc/os-release")).expect("read"),
        b"ID=test\n"
    );
}

#[test]
fn zstd_layer_is_unpacked_and_verified() {
    let sandbox = Sandbox::new();
    let tar = sample_layer();
    let blob = zstd::encode_all(&tar[..], 3).expect("compress");
    assert_eq!(Compression::detect(&blob), Compression::Zstd);

    sandbox
        .unpack_as(&blob, &tar, Compression::Zstd)
        .expect("unpack zstd");

    assert_eq!(
        fs::read(sandbox.path("etc/os-release")).expect("read"),
        b"ID=test\n"
    );
}

#[test]
fn diff_id_mismatch_is_reported() {
    let sandbox = Sandbox::new();
    let tar = sample_layer();
    let wrong = Digest::sha256_of(b"another layer");

    let err = unpack_layer(
        &tar[..],
        Layer {
            digest: LAYER,
            compression: Compression::None,
            diff_id: &wrong,
        },
        &sandbox.root,
    )
    .expect_err("wrong diff id");

    match err {
        ImageError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, wrong.to_string());
            assert_eq!(actual, Digest::sha256_of(&tar).to_string());
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
}

#[test]
fn diff_id_covers_bytes_after_the_last_entry() {
    let sandbox = Sandbox::new();
    let mut tar = sample_layer();
    // Extra zero blocks after the end-of-archive marker still count.
    tar.extend_from_slice(&[0u8; 2048]);
    sandbox.unpack(&tar).expect("unpack with trailing padding");
}

#[test]
fn truncated_layer_fails() {
    let sandbox = Sandbox::new();
    let tar = LayerTar::new().file("big", &[7u8; 4096]).finish();
    let truncated = &tar[..1024];
    let err = sandbox
        .unpack_as(truncated, &tar, Compression::None)
        .expect_err("truncated layer");
    assert!(
        matches!(
            err,
            ImageError::Unpack { .. } | ImageError::DigestMismatch { .. }
        ),
        "{err}"
    );
}

#[test]
fn media_types_map_to_compression() {
    let cases = [
        (
            "application/vnd.oci.image.layer.v1.tar",
            Some(Compression::None),
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            Some(Compression::Gzip),
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            Some(Compression::Zstd),
        ),
        (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            Some(Compression::Gzip),
        ),
        ("application/vnd.oci.image.config.v1+json", None),
    ];
    for (media_type, expected) in cases {
        assert_eq!(
            Compression::from_media_type(media_type),
            expected,
            "{media_type}"
        );
    }
}

#[test]
fn pax_times_parse_with_fractions_and_signs() {
    assert_eq!(parse_pax_time(b"12").expect("int"), (12, 0));
    assert_eq!(
        parse_pax_time(b"12.5").expect("fraction"),
        (12, 500_000_000)
    );
    assert_eq!(
        parse_pax_time(b"12.1234567891").expect("long fraction"),
        (12, 123_456_789)
    );
    assert_eq!(
        parse_pax_time(b"-1.5").expect("negative"),
        (-2, 500_000_000)
    );
    assert!(parse_pax_time(b"1.x").is_err());
}
