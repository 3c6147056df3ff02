//! Test images built by the test suite itself (no internet): a busybox
//! rootfs layer from the host's static `/bin/busybox`, a second layer that
//! deletes a file of the first with a whiteout, image configs with env,
//! workdir, user, entrypoint and cmd; and writers for the local sources
//! (an OCI image layout directory, a `docker save` archive).

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};

pub const BUSYBOX: &str = "/bin/busybox";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MTIME: u64 = 1_700_000_000;

/// Applets linked in the test rootfs (what the tests use, and a few more).
const APPLETS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "echo",
    "env",
    "pwd",
    "id",
    "true",
    "false",
    "sleep",
    "printenv",
    "whoami",
    "hostname",
    "ps",
    "mount",
    "wc",
    "test",
    "stat",
    "readlink",
    "sha256sum",
    "grep",
    "head",
    "uname",
    "cut",
    "tr",
    "mkdir",
    "rm",
    "touch",
    "df",
    "ln",
];

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    // A fixed header (no name, mtime 0) keeps the digest stable.
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// A tar layer under construction.
pub struct LayerBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }
}

impl LayerBuilder {
    fn header(kind: tar::EntryType, mode: u32, size: u64, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(MTIME);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32, uid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0, uid);
        self.b.append_data(&mut h, path, &[][..]).expect("tar dir");
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64, 0);
        self.b.append_data(&mut h, path, data).expect("tar file");
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 0);
        self.b
            .append_link(&mut h, path, target)
            .expect("tar symlink");
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("tar")
    }
}

/// Layer one: busybox, applet links, /etc with a user `app` (1000:1000)
/// and /etc/motd (which layer two deletes).
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e} (apt-get install busybox-static)"));
    let mut l = LayerBuilder::default()
        .dir("bin", 0o755, 0)
        .dir("etc", 0o755, 0)
        .dir("tmp", 0o1777, 0)
        .dir("root", 0o700, 0)
        .dir("proc", 0o555, 0)
        .dir("dev", 0o755, 0)
        .dir("sys", 0o555, 0)
        .dir("home", 0o755, 0)
        .dir("home/app", 0o755, 1000)
        .file("bin/busybox", 0o755, &busybox);
    for a in APPLETS {
        l = l.symlink(&format!("bin/{a}"), "busybox");
    }
    l.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n")
    .file("etc/motd", 0o644, b"from layer one\n")
    .finish()
}

/// Layer two: deletes /etc/motd (whiteout), adds /srv/app and /etc/layer2.
pub fn second_layer() -> Vec<u8> {
    LayerBuilder::default()
        .dir("etc", 0o755, 0)
        .file("etc/.wh.motd", 0o644, b"")
        .file("etc/layer2", 0o644, b"layer two\n")
        .dir("srv", 0o755, 0)
        .dir("srv/app", 0o755, 0)
        .file("srv/app/hello.txt", 0o644, b"hello from /srv/app\n")
        .finish()
}

/// One layer as both the uncompressed tar and the blob a registry serves.
#[derive(Clone)]
pub struct Layer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub media_type: &'static str,
}

impl Layer {
    pub fn gzip(tar: Vec<u8>) -> Layer {
        Layer {
            blob: gzip(&tar),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }
    pub fn plain(tar: Vec<u8>) -> Layer {
        Layer {
            blob: tar.clone(),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// A complete image: config, layers and OCI manifest.
#[derive(Clone)]
pub struct TestImage {
    pub config: Vec<u8>,
    pub layers: Vec<Layer>,
    pub manifest: Vec<u8>,
    pub manifest_media_type: &'static str,
}

impl TestImage {
    /// `run` is the OCI `config` object (Env, WorkingDir, User, Entrypoint, Cmd).
    pub fn new(run: serde_json::Value, layers: Vec<Layer>) -> TestImage {
        Self::for_platform(run, layers, "amd64")
    }

    pub fn for_platform(run: serde_json::Value, layers: Vec<Layer>, arch: &str) -> TestImage {
        let config = serde_json::to_vec(&json!({
            "created": "2024-01-02T03:04:05Z",
            "architecture": arch,
            "os": "linux",
            "config": run,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(&l.tar)).collect::<Vec<_>>()},
        }))
        .expect("config json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": sha256(&l.blob), "size": l.blob.len()})).collect::<Vec<_>>(),
        }))
        .expect("manifest json");
        TestImage {
            config,
            layers,
            manifest,
            manifest_media_type: OCI_MANIFEST,
        }
    }

    pub fn digest(&self) -> String {
        sha256(&self.manifest)
    }

    /// (digest, bytes) of the config and every layer blob.
    pub fn blobs(&self) -> Vec<(String, &[u8])> {
        let mut v = vec![(sha256(&self.config), self.config.as_slice())];
        v.extend(
            self.layers
                .iter()
                .map(|l| (sha256(&l.blob), l.blob.as_slice())),
        );
        v
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| sha256(&l.blob)).collect()
    }
}

/// The standard pair of layers (busybox, whiteout layer), gzip-compressed.
pub fn busybox_layers() -> Vec<Layer> {
    vec![Layer::gzip(busybox_layer()), Layer::gzip(second_layer())]
}

/// The busybox image: Env with a marker variable, WorkingDir /srv/app, Cmd sh.
pub fn busybox_image() -> TestImage {
    TestImage::new(
        json!({
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello from the image config"],
            "WorkingDir": "/srv/app",
            "Cmd": ["sh"],
        }),
        busybox_layers(),
    )
}

/// Same layers; Entrypoint `sh -c`, Cmd printing the user id, User `app`.
pub fn entrypoint_image() -> TestImage {
    TestImage::new(
        json!({
            "Env": ["PATH=/bin"],
            "User": "app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default cmd as $(id -u):$(id -g) in $(pwd) home $HOME"],
        }),
        busybox_layers(),
    )
}

/// An image whose only layer is not a tar archive (the host cannot tell;
/// the guest must refuse it).
pub fn not_a_tar_image() -> TestImage {
    let junk = b"this layer is plain text, not a tar archive\n".repeat(40);
    TestImage::new(
        json!({"Cmd": ["sh"]}),
        vec![Layer {
            tar: junk.clone(),
            blob: junk,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }],
    )
}

/// The busybox layers with a config marking where it came from.
pub fn marked_image(source: &str) -> TestImage {
    TestImage::new(
        json!({"Env": [format!("SOURCE={source}")], "Cmd": ["sh"]}),
        busybox_layers(),
    )
}

/// An image index over `(image, architecture)` pairs.
pub fn index(entries: &[(&TestImage, &str)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries.iter().map(|(img, arch)| json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.digest(),
            "size": img.manifest.len(),
            "platform": {"os": "linux", "architecture": arch},
        })).collect::<Vec<_>>(),
    }))
    .expect("index json")
}

/// Writes an OCI image layout at `dir` holding `images` under their tags.
pub fn write_oci_layout(dir: &Path, images: &[(&str, &TestImage)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    let mut manifests = Vec::new();
    for (tag, img) in images {
        for (d, bytes) in img.blobs() {
            std::fs::write(blobs.join(&d["sha256:".len()..]), bytes).expect("blob");
        }
        let d = img.digest();
        std::fs::write(blobs.join(&d["sha256:".len()..]), &img.manifest).expect("manifest");
        manifests.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": d,
            "size": img.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index.json");
}

/// Writes a `docker save` archive (legacy layout: `<id>/layer.tar`,
/// `<config hex>.json`, `manifest.json`) of `img` tagged `repo_tag`.
pub fn write_docker_archive(path: &Path, repo_tag: &str, img: &TestImage) {
    let mut b = tar::Builder::new(std::fs::File::create(path).expect("archive"));
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).expect("archive entry");
    };
    let config_name = format!("{}.json", &sha256(&img.config)["sha256:".len()..]);
    add(&config_name, &img.config);
    let mut layer_names = Vec::new();
    for l in &img.layers {
        let id = &sha256(&l.tar)["sha256:".len()..];
        let name = format!("{id}/layer.tar");
        add(&name, &l.tar);
        layer_names.push(name);
    }
    let manifest = json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]);
    add(
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("json"),
    );
    b.into_inner().expect("archive").flush().expect("flush");
}
