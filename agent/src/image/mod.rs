//! OCI images inside the guest: the machine's image store (unpacked layers
//! and image records) and the types the host shares with it.
//!
//! Layout under the store root (on the machine disk, so that an overlay
//! upper directory can live next to it; tmpfs when there is no disk):
//!
//! ```text
//! layers/<hex>/          one unpacked layer per compressed-blob digest
//! layers/.tmp-<hex>-<n>/ a layer being unpacked (removed at open)
//! images/<hex>.json      an ImageRecord per manifest digest
//! ```
//!
//! A layer directory appears only by rename once its digest is verified and
//! it is fully unpacked, so nothing half-unpacked is ever used.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

pub mod container;
pub mod serve;
pub mod unpack;

pub use unpack::{unpack_layer, UnpackStats};

pub use smol_protocol::image::{
    ContainerSpec, ImageConfig, ImageRecord, LayerRecord, NoCommand, ResolvedCommand, DEFAULT_PATH,
};

/// What storing one layer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// Bytes received (the compressed blob).
    pub size: u64,
    pub unpack: UnpackStats,
    /// The layer was there already; nothing was unpacked.
    pub cached: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("not a tar archive: {0}")]
    NotATar(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("unsafe path in layer: {0}")]
    UnsafePath(String),
    #[error("hard link {path} points to {target}, which is not in the layer")]
    HardLinkTarget { path: String, target: String },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("image {0} not found in this machine")]
    ImageNotFound(String),
    #[error("layer {0} is not in this machine")]
    LayerMissing(String),
    #[error(transparent)]
    NoCommand(#[from] NoCommand),
    #[error("no space left on the device for {0}")]
    NoSpace(String),
    #[error("malformed image record {path}: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return ImageError::NoSpace(path.display().to_string());
        }
        ImageError::Io { what, path, source }
    }
}

/// The hex part of a `sha256:<64 hex>` digest, validated (it names paths).
pub fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => Err(ImageError::InvalidDigest(
            digest.chars().take(100).collect(),
        )),
    }
}

/// Hashes and counts what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The machine's image store.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    /// Serialises record updates (a tag moving between records).
    records: Mutex<()>,
}

impl ImageStore {
    /// Opens (creating) the store at `root` and removes leftovers of
    /// interrupted unpacks.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, ImageError> {
        let root = root.into();
        for d in ["layers", "images"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| ImageError::io("create", &p, e))?;
        }
        let layers = root.join("layers");
        if let Ok(entries) = fs::read_dir(&layers) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(ImageStore {
            root,
            records: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of an unpacked layer.
    pub fn layer_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers").join(digest_hex(digest)?))
    }

    pub fn has_layer(&self, digest: &str) -> bool {
        self.layer_dir(digest).is_ok_and(|d| d.is_dir())
    }

    /// The digests of `digests` that are not unpacked here yet.
    pub fn missing_layers(&self, digests: &[String]) -> Result<Vec<String>, ImageError> {
        let mut missing = Vec::new();
        for d in digests {
            if !self.layer_dir(d)?.is_dir() {
                missing.push(d.clone());
            }
        }
        Ok(missing)
    }

    /// Receives the compressed layer blob `digest` from `reader`, unpacks it
    /// while hashing, and keeps it only if the digest matches.
    pub fn put_layer<R: Read>(&self, digest: &str, reader: R) -> Result<LayerStats, ImageError> {
        let dest = self.layer_dir(digest)?;
        let mut reader = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
            count: 0,
        };
        if dest.is_dir() {
            io::copy(&mut reader, &mut io::sink())
                .map_err(|e| ImageError::io("receive", &dest, e))?;
            return Ok(LayerStats {
                size: reader.count,
                unpack: UnpackStats::default(),
                cached: true,
            });
        }
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("layers").join(format!(
            ".tmp-{}-{}-{n}",
            digest_hex(digest)?,
            std::process::id()
        ));
        fs::create_dir(&tmp).map_err(|e| ImageError::io("create", &tmp, e))?;
        let result = unpack_layer(&mut reader, &tmp);
        // Read what the unpacker left (tar padding, gzip trailer) so that the
        // digest covers the whole blob, and so that a corrupt blob is
        // reported as a digest mismatch rather than as whatever broke first.
        let drained = io::copy(&mut reader, &mut io::sink());
        let actual = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
        let outcome = match (result, drained) {
            _ if actual != digest => Err(ImageError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            }),
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(ImageError::io("receive", &tmp, e)),
            (Ok(stats), Ok(_)) => Ok(stats),
        };
        let unpack = match outcome {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_dir_all(&tmp);
            // A concurrent put of the same layer won the race: same content.
            if !dest.is_dir() {
                return Err(ImageError::io("rename into", &dest, e));
            }
        }
        Ok(LayerStats {
            size: reader.count,
            unpack,
            cached: false,
        })
    }

    fn record_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", digest_hex(digest)?)))
    }

    /// Records an image whose layers are all here. Its references are taken
    /// away from any other record (tags move).
    pub fn record(&self, record: &ImageRecord) -> Result<ImageRecord, ImageError> {
        for l in &record.layers {
            if !self.layer_dir(&l.digest)?.is_dir() {
                return Err(ImageError::LayerMissing(l.digest.clone()));
            }
        }
        self.record_path(&record.digest)?;
        let _guard = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut merged = record.clone();
        for other in self.list_unlocked()? {
            if other.digest == record.digest {
                for r in other.references {
                    if !merged.references.contains(&r) {
                        merged.references.push(r);
                    }
                }
            } else if other
                .references
                .iter()
                .any(|r| record.references.contains(r))
            {
                let mut moved = other.clone();
                moved.references.retain(|r| !record.references.contains(r));
                self.write_record(&moved)?;
            }
        }
        self.write_record(&merged)?;
        Ok(merged)
    }

    fn write_record(&self, record: &ImageRecord) -> Result<(), ImageError> {
        let path = self.record_path(&record.digest)?;
        let tmp = path.with_extension(format!(
            "json.tmp-{}",
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| ImageError::io("encode", &path, io::Error::other(e)))?;
        fs::write(&tmp, json).map_err(|e| ImageError::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            ImageError::io("rename into", &path, e)
        })
    }

    /// Every recorded image, sorted by digest.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let _guard = self.records.lock().unwrap_or_else(|p| p.into_inner());
        self.list_unlocked()
    }

    fn list_unlocked(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| ImageError::io("read", &dir, e))? {
            let e = e.map_err(|e| ImageError::io("read", &dir, e))?;
            let name = e.file_name();
            if !name.to_string_lossy().ends_with(".json") {
                continue;
            }
            let bytes = fs::read(e.path()).map_err(|err| ImageError::io("read", e.path(), err))?;
            let rec: ImageRecord =
                serde_json::from_slice(&bytes).map_err(|err| ImageError::BadRecord {
                    path: e.path(),
                    reason: err.to_string(),
                })?;
            out.push(rec);
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Finds an image by manifest digest or by a reference it was recorded under.
    pub fn find(&self, image: &str) -> Result<ImageRecord, ImageError> {
        self.list()?
            .into_iter()
            .find(|r| r.digest == image || r.references.iter().any(|x| x == image))
            .ok_or_else(|| ImageError::ImageNotFound(image.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn resolve_follows_docker_rules() {
        let c = ImageConfig {
            env: vec!["PATH=/custom".into(), "A=1".into(), "junk".into()],
            working_dir: Some("/w".into()),
            user: Some("1000".into()),
            entrypoint: vec!["/bin/ep".into()],
            cmd: vec!["default".into()],
        };
        let r = c.resolve(&[], &[], None).unwrap();
        assert_eq!(r.argv, vec!["/bin/ep", "default"]);
        assert_eq!(
            r.env,
            vec![("PATH".into(), "/custom".into()), ("A".into(), "1".into())]
        );
        assert_eq!(
            (r.workdir.as_str(), r.user.as_deref()),
            ("/w", Some("1000"))
        );
        let r = c
            .resolve(&["x".into()], &[("A".into(), "2".into())], Some("/tmp"))
            .unwrap();
        assert_eq!(r.argv, vec!["/bin/ep", "x"]);
        assert_eq!(r.env[1], ("A".into(), "2".into()));
        assert_eq!(r.workdir, "/tmp");
        let plain = ImageConfig::default()
            .resolve(&["sh".into()], &[], None)
            .unwrap();
        assert_eq!(plain.env, vec![("PATH".into(), DEFAULT_PATH.into())]);
        assert_eq!(plain.workdir, "/");
        assert!(matches!(
            ImageConfig::default().resolve(&[], &[], None),
            Err(NoCommand)
        ));
    }

    #[test]
    fn put_layer_verifies_and_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let blob = tar_with(&[("a/b.txt", b"hi")]);
        let d = digest(&blob);
        let stats = store.put_layer(&d, &blob[..]).unwrap();
        assert!(!stats.cached);
        assert_eq!(stats.size, blob.len() as u64);
        assert_eq!(
            fs::read(store.layer_dir(&d).unwrap().join("a/b.txt")).unwrap(),
            b"hi"
        );
        assert!(store.put_layer(&d, &blob[..]).unwrap().cached);

        // A corrupted blob is a digest mismatch and leaves nothing.
        let mut bad = blob.clone();
        bad[600] ^= 1;
        let other = digest(&tar_with(&[("x", b"y")]));
        let err = store.put_layer(&other, &bad[..]).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        // Bytes that are no tar, under their true digest: not a tar.
        let junk = b"this is not a tar archive, just some text".repeat(20);
        let err = store.put_layer(&digest(&junk), &junk[..]).unwrap_err();
        assert!(matches!(err, ImageError::NotATar(_)), "{err}");
        let left: Vec<_> = fs::read_dir(dir.path().join("layers"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(store.put_layer("sha256:../../x", &blob[..]).is_err());
    }

    #[test]
    fn a_full_disk_is_named_and_leaves_nothing() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=256k"),
        )
        .unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let big: Vec<u8> = (0..600_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let blob = tar_with(&[("big.bin", &big)]);
        let err = store.put_layer(&digest(&blob), &blob[..]).unwrap_err();
        let layers: Vec<_> = fs::read_dir(dir.path().join("layers"))
            .unwrap()
            .flatten()
            .collect();
        nix::mount::umount(dir.path()).unwrap();
        assert!(matches!(err, ImageError::NoSpace(_)), "{err}");
        assert!(layers.is_empty(), "{layers:?}");
    }

    #[test]
    fn records_move_tags_and_need_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let blob = tar_with(&[("f", b"1")]);
        let ld = digest(&blob);
        let layer = LayerRecord {
            digest: ld.clone(),
            media_type: "t".into(),
            size: 1,
        };
        let rec = |d: &str, r: &str| ImageRecord {
            digest: d.into(),
            references: vec![r.into()],
            layers: vec![layer.clone()],
            config: ImageConfig::default(),
            created: None,
            size: 1,
        };
        let a = digest(b"a");
        let b = digest(b"b");
        assert!(matches!(
            store.record(&rec(&a, "x:1")),
            Err(ImageError::LayerMissing(_))
        ));
        store.put_layer(&ld, &blob[..]).unwrap();
        store.record(&rec(&a, "x:1")).unwrap();
        store.record(&rec(&a, "x:latest")).unwrap();
        assert_eq!(
            store.find("x:1").unwrap().references,
            vec!["x:latest", "x:1"]
        );
        store.record(&rec(&b, "x:latest")).unwrap();
        assert_eq!(store.find("x:latest").unwrap().digest, b);
        assert_eq!(store.find(&a).unwrap().references, vec!["x:1"]);
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(matches!(
            store.find("nope"),
            Err(ImageError::ImageNotFound(_))
        ));
    }
}
