//! Where built assets are cached, and the content hashes that key them.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// `$SMOL_CACHE_DIR`, else `$XDG_CACHE_HOME/smol`, else `~/.cache/smol`.
/// Outside the checkout so that a fresh clone on the same machine reuses it.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SMOL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("smol");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("smol")
}

/// The directory where the current assets are published for the SDK and the
/// tests to find: `<cache>/assets/{vmlinux,initramfs.cpio}`.
pub fn assets_dir() -> PathBuf {
    cache_dir().join("assets")
}

/// Hex sha256 over a list of labelled inputs (label and bytes both count).
pub fn hash_inputs(inputs: &[(&str, &[u8])]) -> String {
    let mut h = Sha256::new();
    for (label, bytes) in inputs {
        h.update((label.len() as u64).to_le_bytes());
        h.update(label.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(&h.finalize()[..16])
}

fn same_contents(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if ma.len() != mb.len() {
        return false;
    }
    matches!((std::fs::read(a), std::fs::read(b)), (Ok(x), Ok(y)) if x == y)
}

/// Copies `built` to `<assets_dir>/<name>` atomically (write then rename).
pub fn publish(built: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = assets_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let dest = dir.join(name);
    // The same bytes already published stay as they are: the SDK keys its
    // warm snapshots by the assets' file identity (inode, mtime), so a copy
    // would make every machine shape boot anew after each `xtask assets`.
    if same_contents(built, &dest) {
        return Ok(dest);
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::copy(built, &tmp)
        .map_err(|e| format!("copy {} to {}: {e}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest).map_err(|e| format!("rename to {}: {e}", dest.display()))?;
    Ok(dest)
}
