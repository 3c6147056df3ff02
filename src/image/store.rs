//! The content-addressed blob cache shared by every machine:
//! `<root>/blobs/sha256/<hex>`.
//!
//! A blob is written to `<root>/tmp/`, hashed on the way, and renamed into
//! place only when its digest matches, so a file under `blobs/` is always
//! complete and correct. Writers of one digest are serialised by an
//! in-process lock and a `flock` on `<root>/locks/<hex>.lock`, so concurrent
//! pulls (threads or processes) fetch each blob once.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::error::ImageError;

/// A sha256 content digest, `sha256:<64 lowercase hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 hex>`; anything else is `InvalidDigest`.
    pub fn parse(s: &str) -> Result<Digest, ImageError> {
        match s.strip_prefix("sha256:") {
            Some(hex)
                if hex.len() == 64
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                Ok(Digest(s.to_string()))
            }
            _ => Err(ImageError::InvalidDigest(s.chars().take(100).collect())),
        }
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    pub(crate) fn from_hasher(h: Sha256) -> Digest {
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = ImageError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::str::FromStr for Digest {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// The blob cache rooted at a directory (normally `$SMOL_HOME/images`).
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// Held while one writer fetches a digest; see [`BlobStore::lock`].
pub struct BlobLock {
    // Dropped in declaration order: the file lock first, then the in-process one.
    _file: Flock<File>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// In-process locks per blob path; entries are cheap and bounded by the
/// number of distinct blobs this process touched.
fn process_locks() -> &'static Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    LOCKS.get_or_init(Default::default)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file that is removed unless persisted.
struct TempBlob {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl BlobStore {
    /// `$SMOL_HOME/images`, where `SMOL_HOME` defaults to `~/.local/share/smol`.
    pub fn default_root() -> PathBuf {
        smol_home().join("images")
    }

    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<BlobStore, ImageError> {
        let root = root.into();
        for dir in ["blobs/sha256", "tmp", "locks"] {
            let d = root.join(dir);
            fs::create_dir_all(&d).map_err(|e| ImageError::io("create", &d, e))?;
        }
        Ok(BlobStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, ImageError> {
        let p = self.path(digest);
        fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|e| ImageError::io("stat", p, e))
    }

    /// Reads a whole (small) blob: manifests and configs.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ImageError> {
        let p = self.path(digest);
        fs::read(&p).map_err(|e| ImageError::io("read", p, e))
    }

    /// Takes the writer lock of `digest`, across tasks and processes.
    pub async fn lock(&self, digest: &Digest) -> Result<BlobLock, ImageError> {
        let key = self.path(digest);
        let entry = process_locks()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let guard = entry.lock_owned().await;
        let lock_path = self
            .root
            .join("locks")
            .join(format!("{}.lock", digest.hex()));
        let file = tokio::task::spawn_blocking(move || -> Result<Flock<File>, ImageError> {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| ImageError::io("open lock", &lock_path, e))?;
            Flock::lock(f, FlockArg::LockExclusive)
                .map_err(|(_, e)| ImageError::io("lock", &lock_path, io::Error::from(e)))
        })
        .await
        .map_err(|e| ImageError::io("lock", self.root.clone(), io::Error::other(e)))??;
        Ok(BlobLock {
            _file: file,
            _guard: guard,
        })
    }

    fn temp(&self, label: &str) -> TempBlob {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{label}.{}.{n}", std::process::id());
        TempBlob {
            path: self.root.join("tmp").join(name),
            keep: false,
        }
    }

    /// Moves a verified temporary file into place as `digest`.
    fn commit(&self, mut tmp: TempBlob, digest: &Digest) -> Result<(), ImageError> {
        let dest = self.path(digest);
        fs::rename(&tmp.path, &dest).map_err(|e| ImageError::io("rename into", &dest, e))?;
        tmp.keep = true;
        Ok(())
    }

    /// Writes a blob from a stream of chunks, verifying `expected` (and
    /// `size` when known) before it becomes visible. `progress` gets the
    /// running byte count. The caller holds [`BlobStore::lock`].
    pub async fn write_stream<S>(
        &self,
        expected: &Digest,
        size: Option<u64>,
        mut stream: S,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, ImageError>
    where
        S: Stream<Item = Result<Bytes, ImageError>> + Unpin,
    {
        let tmp = self.temp(expected.hex());
        let mut file = tokio::fs::File::create(&tmp.path)
            .await
            .map_err(|e| ImageError::io("create", &tmp.path, e))?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            if size.is_some_and(|s| written > s) {
                return Err(ImageError::SizeMismatch {
                    digest: expected.to_string(),
                    expected: size.unwrap_or(0),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ImageError::io("write", &tmp.path, e))?;
            progress(written);
        }
        file.sync_all()
            .await
            .map_err(|e| ImageError::io("sync", &tmp.path, e))?;
        drop(file);
        let actual = Digest::from_hasher(hasher);
        if &actual != expected {
            return Err(ImageError::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        if let Some(s) = size {
            if written != s {
                return Err(ImageError::SizeMismatch {
                    digest: expected.to_string(),
                    expected: s,
                });
            }
        }
        self.commit(tmp, expected)?;
        Ok(written)
    }

    /// Writes a small blob held in memory, verifying it against `expected`.
    pub fn write_bytes(&self, expected: &Digest, data: &[u8]) -> Result<(), ImageError> {
        let actual = Digest::of(data);
        if &actual != expected {
            return Err(ImageError::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        if self.contains(expected) {
            return Ok(());
        }
        let tmp = self.temp(expected.hex());
        fs::write(&tmp.path, data).map_err(|e| ImageError::io("write", &tmp.path, e))?;
        self.commit(tmp, expected)
    }

    /// Copies a blob from a reader (a local image source), hashing it. With
    /// `expected`, a different digest is an error and nothing is stored;
    /// without, the computed digest names the blob. Returns (digest, size,
    /// whether it was new to the store).
    /// Blocking: call from a blocking context.
    pub fn import(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64, bool), ImageError> {
        let label = expected.map_or("import", |d| d.hex());
        let tmp = self.temp(label);
        let mut file =
            File::create(&tmp.path).map_err(|e| ImageError::io("create", &tmp.path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImageError::io("read source for", &tmp.path, e)),
            };
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|e| ImageError::io("write", &tmp.path, e))?;
            size += n as u64;
        }
        file.sync_all()
            .map_err(|e| ImageError::io("sync", &tmp.path, e))?;
        drop(file);
        let actual = Digest::from_hasher(hasher);
        if let Some(exp) = expected {
            if &actual != exp {
                return Err(ImageError::DigestMismatch {
                    expected: exp.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        if self.contains(&actual) {
            return Ok((actual, size, false));
        }
        self.commit(tmp, &actual)?;
        Ok((actual, size, true))
    }

    /// Removes temporary files left by a crashed process (older than an hour).
    pub fn clean_temp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// smol's data directory, for machines, images and keys alike:
/// `SMOL_HOME`, else `$XDG_DATA_HOME/smol`, else `~/.local/share/smol`.
pub fn smol_home() -> PathBuf {
    home_from(&|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

fn home_from(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(h) = env("SMOL_HOME") {
        return PathBuf::from(h);
    }
    if let Some(d) = env("XDG_DATA_HOME") {
        return PathBuf::from(d).join("smol");
    }
    PathBuf::from(env("HOME").unwrap_or_else(|| "/root".into())).join(".local/share/smol")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_rules() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.into())
        };
        assert_eq!(
            home_from(&env(&[("SMOL_HOME", "/s"), ("HOME", "/h")])),
            PathBuf::from("/s")
        );
        assert_eq!(
            home_from(&env(&[("XDG_DATA_HOME", "/x"), ("HOME", "/h")])),
            PathBuf::from("/x/smol")
        );
        assert_eq!(
            home_from(&env(&[("HOME", "/h")])),
            PathBuf::from("/h/.local/share/smol")
        );
    }

    fn chunks(data: &'static [u8]) -> impl Stream<Item = Result<Bytes, ImageError>> + Unpin {
        futures::stream::iter(
            data.chunks(3)
                .map(|c| Ok(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn digest_parsing() {
        let d = Digest::of(b"hello");
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
        for bad in [
            "",
            "sha256:",
            "sha512:00",
            "sha256:XYZ",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(ImageError::InvalidDigest(_))),
                "{bad}"
            );
        }
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }

    #[tokio::test]
    async fn verified_write_and_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: &'static [u8] = b"layer bytes here";
        let d = Digest::of(data);
        let _lock = store.lock(&d).await.unwrap();
        let mut seen = 0;
        let n = store
            .write_stream(&d, Some(data.len() as u64), chunks(data), |b| seen = b)
            .await
            .unwrap();
        assert_eq!((n, seen), (16, 16));
        assert_eq!(store.read(&d).unwrap(), data);

        let wrong = Digest::of(b"something else");
        let err = store
            .write_stream(&wrong, None, chunks(data), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&wrong));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        let err = store
            .write_stream(&Digest::of(data), Some(4), chunks(data), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn import_computes_or_checks_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let (d, n, new) = store.import(&b"abc"[..], None).unwrap();
        assert_eq!((d.clone(), n, new), (Digest::of(b"abc"), 3, true));
        assert!(!store.import(&b"abc"[..], None).unwrap().2);
        assert!(store.contains(&d));
        let err = store.import(&b"abd"[..], Some(&d)).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }));
        assert!(store.write_bytes(&d, b"abd").is_err());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn lock_serialises_writers_of_one_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        let first = store.lock(&d).await.unwrap();
        let s2 = store.clone();
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { s2.lock(&d2).await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap().unwrap();
        // Another digest is not blocked.
        let _a = store.lock(&d).await.unwrap();
        let _b = store.lock(&Digest::of(b"y")).await.unwrap();
    }
}
