//! Pulls from a real registry: Debian's `docker-registry` (distribution
//! 2.8) listening on 127.0.0.1, filled with `skopeo` from an OCI layout
//! that the test writes itself.
//!
//! Skipped with a message when `docker-registry` or `skopeo` is missing.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hatoba_image::{ImageConfig, ImageError, ImageManager, PullEvent, RegistryConfig};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

const REGISTRY: &str = "/usr/bin/docker-registry";
const SKOPEO: &str = "/usr/bin/skopeo";

fn tools_present() -> bool {
    let present = Path::new(REGISTRY).exists() && Path::new(SKOPEO).exists();
    if !present {
        eprintln!("skipping: needs {REGISTRY} and {SKOPEO} (Debian docker-registry and skopeo)");
    }
    present
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A registry process on a free loopback port, killed by PID on drop.
struct Registry {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("registry dir");
        // Take a free port from the kernel, then hand it to the registry.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write registry config");
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = Self {
            child,
            addr,
            _dir: dir,
        };

        for _ in 0..200 {
            if TcpStream::connect(addr).is_ok() {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not listen on {addr}");
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        builder
            .append_data(&mut header, path, *data)
            .expect("append");
    }
    builder.into_inner().expect("finish layer")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("finish gzip")
}

/// Writes an OCI layout with one image of the given layers and returns the
/// image ID (config digest).
fn write_layout(dir: &Path, layers: &[Vec<u8>], tag: &str) -> String {
    let blobs_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs_dir).expect("blobs dir");
    let put = |bytes: &[u8]| {
        let digest = sha(bytes);
        std::fs::write(blobs_dir.join(&digest[7..]), bytes).expect("write blob");
        digest
    };

    let blobs: Vec<Vec<u8>> = layers.iter().map(|t| gzip(t)).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": { "User": "65534" },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|t| sha(t)).collect::<Vec<_>>() },
    }))
    .expect("config");
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": blobs.iter().map(|b| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(b), "size": b.len(),
        })).collect::<Vec<_>>(),
    }))
    .expect("manifest");
    let manifest_digest = put(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    config_digest
}

/// Pushes an OCI layout's image to the registry under `repo:tag`.
fn push(layout: &Path, layout_tag: &str, registry: &Registry, target: &str) {
    let status = Command::new(SKOPEO)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{layout_tag}", layout.display()))
        .arg(format!("docker://{}/{target}", registry.host()))
        .status()
        .expect("run skopeo");
    assert!(status.success(), "skopeo copy to {target}");
}

fn store_config(root: PathBuf, registry: &Registry) -> ImageConfig {
    ImageConfig {
        root,
        registries: BTreeMap::from([(
            registry.host(),
            RegistryConfig {
                plain_http: true,
                ..RegistryConfig::default()
            },
        )]),
        ..ImageConfig::default()
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<PullEvent>) -> Vec<PullEvent> {
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_local_registry() {
    if !tools_present() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().expect("work dir");
    let layout = work.path().join("layout");
    let base = layer_tar(&[("etc/os-release", b"ID=hatoba\n")]);
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let top = layer_tar(&[("data/big.bin", &big)]);
    let image_id = write_layout(&layout, &[base, top], "v1");
    push(&layout, "v1", &registry, "test/app:v1");
    push(&layout, "v1", &registry, "test/app:v2");

    let manager = ImageManager::open(store_config(work.path().join("store"), &registry))
        .await
        .expect("open store");
    let reference = format!("{}/test/app:v1", registry.host());

    // Two concurrent pulls of the same image share the work.
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    let (first, second) = tokio::join!(
        manager.pull(&reference, None, Some(tx1)),
        manager.pull(&reference, None, Some(tx2)),
    );
    let first = first.expect("first pull");
    let second = second.expect("second pull");
    assert_eq!(first.id, image_id);
    assert_eq!(second.id, image_id);
    assert_eq!(first.repo_tags, vec![reference.clone()]);
    assert_eq!(first.user, "65534");
    assert_eq!(first.repo_digests.len(), 1);
    assert!(first.repo_digests[0].starts_with(&format!("{}/test/app@sha256:", registry.host())));

    let events: Vec<PullEvent> = drain(&mut rx1).into_iter().chain(drain(&mut rx2)).collect();
    for layer in &first.layers {
        let fetched = events
            .iter()
            .filter(|e| matches!(e, PullEvent::Downloaded { digest, reused: false } if digest == &layer.digest))
            .count();
        let unpacked = events
            .iter()
            .filter(|e| matches!(e, PullEvent::Unpacked { digest, reused: false } if digest == &layer.digest))
            .count();
        assert_eq!(fetched, 1, "layer {} fetched once", layer.digest);
        assert_eq!(unpacked, 1, "layer {} unpacked once", layer.digest);
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PullEvent::Downloading { .. }))
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, PullEvent::Done { .. }))
            .count(),
        2
    );

    let dirs = manager.snapshot_dirs(&first);
    assert_eq!(
        std::fs::read(dirs[0].join("etc/os-release")).expect("base file"),
        b"ID=hatoba\n"
    );
    assert_eq!(
        std::fs::read(dirs[1].join("data/big.bin")).expect("top file"),
        big
    );

    // The same image under another tag gains the tag; nothing is fetched.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let v2 = format!("{}/test/app:v2", registry.host());
    let again = manager.pull(&v2, None, Some(tx)).await.expect("pull v2");
    assert_eq!(again.id, image_id);
    assert_eq!(again.repo_tags, vec![reference.clone(), v2.clone()]);
    assert!(
        drain(&mut rx)
            .iter()
            .all(|e| !matches!(e, PullEvent::Downloaded { reused: false, .. })),
        "a re-pull reuses every layer"
    );
    assert_eq!(manager.list().len(), 1);

    // Pulling by digest finds the same image.
    let by_digest = manager
        .pull(&first.repo_digests[0], None, None)
        .await
        .expect("pull by digest");
    assert_eq!(by_digest.id, image_id);

    let missing = manager
        .pull(&format!("{}/test/app:absent", registry.host()), None, None)
        .await
        .expect_err("unknown tag");
    assert!(matches!(missing, ImageError::NotFound { .. }), "{missing}");

    // Removal frees everything; a later pull fetches again.
    manager
        .remove(&v2)
        .await
        .expect("remove")
        .expect("was stored");
    assert!(manager.list().is_empty());
    let snapshots = std::fs::read_dir(work.path().join("store/snapshots"))
        .expect("snapshots")
        .count();
    assert_eq!(snapshots, 0);
    manager
        .pull(&reference, None, None)
        .await
        .expect("pull after remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_pull_leaves_reusable_content() {
    if !tools_present() {
        return;
    }
    let registry = Registry::start();
    let work = tempfile::tempdir().expect("work dir");
    let layout = work.path().join("layout");
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let layers = [layer_tar(&[("a", b"small")]), layer_tar(&[("big", &big)])];
    let image_id = write_layout(&layout, &layers, "v1");
    push(&layout, "v1", &registry, "test/cancel:v1");
    let reference = format!("{}/test/cancel:v1", registry.host());

    let config = store_config(work.path().join("store"), &registry);
    let manager = std::sync::Arc::new(ImageManager::open(config.clone()).await.expect("open"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = {
        let manager = std::sync::Arc::clone(&manager);
        let reference = reference.clone();
        tokio::spawn(async move { manager.pull(&reference, None, Some(tx)).await })
    };
    // Cancel as soon as the first layer is stored, as a client that goes away would.
    while let Some(event) = rx.recv().await {
        if matches!(event, PullEvent::Downloaded { .. }) {
            task.abort();
            break;
        }
    }
    let _ = task.await;

    let record = manager
        .pull(&reference, None, None)
        .await
        .expect("pull after cancel");
    assert_eq!(record.id, image_id);
    let ingest = std::fs::read_dir(work.path().join("store/ingest"))
        .expect("ingest")
        .count();
    assert_eq!(ingest, 0, "no ingest file is left behind");

    // Reopening keeps the complete image.
    drop(manager);
    let reopened = ImageManager::open(config).await.expect("reopen");
    let found = reopened.find(&reference).expect("find").expect("stored");
    for dir in reopened.snapshot_dirs(&found) {
        assert!(dir.is_dir());
    }
}
