//! API keys of `smol serve`: `<SMOL_HOME>/keys.json` holds each key's name
//! and the SHA-256 of the key, never the key itself. A key is `smk_` and 64
//! hex digits, shown once by `smol key create`.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What every key starts with.
pub const KEY_PREFIX: &str = "smk_";
/// Longest key we hash (a longer bearer is not one of ours).
const MAX_KEY_LEN: usize = 128;

/// A key as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub name: String,
    sha256: String,
    pub created_unix: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    keys: Vec<KeyRecord>,
}

/// The key file of one `SMOL_HOME`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    path: PathBuf,
}

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Equal strings, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl KeyStore {
    /// The keys under `home` (the store's root, `SMOL_HOME`).
    pub fn new(home: &Path) -> KeyStore {
        KeyStore {
            path: home.join("keys.json"),
        }
    }

    fn load(&self) -> Result<KeyFile> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Store {
                path: self.path.clone(),
                reason: format!("unreadable key file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile {
                version: 1,
                keys: Vec::new(),
            }),
            Err(e) => Err(Error::io(format!("reading {}", self.path.display()), e)),
        }
    }

    /// Written owner-only, atomically, synced.
    fn save(&self, file: &KeyFile) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(file).map_err(|e| Error::Internal(e.to_string()))?;
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            });
        written.map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        fs::rename(&tmp, &self.path)
            .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))?;
        let _ = File::open(dir).and_then(|d| d.sync_all());
        Ok(())
    }

    /// A new key named `name`; the key is returned once and not kept.
    pub fn create(&self, name: &str) -> Result<String> {
        crate::config::validate_name(name)?;
        let mut file = self.load()?;
        if file.keys.iter().any(|k| k.name == name) {
            return Err(Error::AlreadyExists {
                name: format!("key {name}"),
            });
        }
        let key = format!("{KEY_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        file.keys.push(KeyRecord {
            name: name.to_string(),
            sha256: hash(&key),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        file.version = 1;
        self.save(&file)?;
        Ok(key)
    }

    pub fn list(&self) -> Result<Vec<KeyRecord>> {
        Ok(self.load()?.keys)
    }

    pub fn revoke(&self, name: &str) -> Result<()> {
        let mut file = self.load()?;
        let before = file.keys.len();
        file.keys.retain(|k| k.name != name);
        if file.keys.len() == before {
            return Err(Error::NotFound {
                name: format!("key {name}"),
            });
        }
        self.save(&file)
    }

    /// The name of the key `key`, if it is a current one. Read from the
    /// file each time, so that a revoke takes effect at once.
    pub fn verify(&self, key: &str) -> Option<String> {
        if !key.starts_with(KEY_PREFIX) || key.len() > MAX_KEY_LEN {
            return None;
        }
        let h = hash(key);
        let file = self.load().ok()?;
        file.keys
            .into_iter()
            .find(|k| same(&k.sha256, &h))
            .map(|k| k.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_revoke() {
        let t = tempfile::tempdir().unwrap();
        let s = KeyStore::new(t.path());
        let a = s.create("alice").unwrap();
        let b = s.create("bob").unwrap();
        assert!(a.starts_with(KEY_PREFIX) && a.len() == 68, "{a}");
        assert_ne!(a, b);
        assert_eq!(s.verify(&a).as_deref(), Some("alice"));
        assert_eq!(s.verify(&b).as_deref(), Some("bob"));
        assert_eq!(s.verify("smk_nope"), None);
        assert_eq!(s.verify(""), None);
        assert!(matches!(
            s.create("alice"),
            Err(Error::AlreadyExists { .. })
        ));
        // Only hashes on disk, owner-only.
        let text = fs::read_to_string(t.path().join("keys.json")).unwrap();
        assert!(!text.contains(&a[KEY_PREFIX.len()..]));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(t.path().join("keys.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        s.revoke("alice").unwrap();
        assert_eq!(s.verify(&a), None);
        assert_eq!(s.verify(&b).as_deref(), Some("bob"));
        assert!(matches!(s.revoke("alice"), Err(Error::NotFound { .. })));
        assert_eq!(s.list().unwrap().len(), 1);
        assert!(s.create("Bad Name").is_err());
    }
}
