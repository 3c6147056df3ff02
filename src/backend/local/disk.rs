//! The machine disk: a sparse raw file formatted ext4 on the host the first
//! time, attached as `/dev/vda`. The agent mounts it as the upper layer of
//! the guest root overlay, so whatever a user writes survives stop/start.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
/// Kernel command line telling the agent which device is the machine disk.
pub(crate) const DISK_CMDLINE: &str = "smol.disk=/dev/vda";
/// virtio-blk serial of the machine disk.
pub(crate) const DISK_ID: &str = "smol-root";

/// Creates `path` (which must not exist) as a sparse file of `size_mb` MiB
/// and formats it ext4. Removes the file again if formatting fails.
pub(crate) async fn create_disk(path: &Path, size_mb: u64) -> Result<()> {
    let mkfs = find_mkfs().ok_or_else(|| Error::Disk {
        path: path.to_path_buf(),
        reason: "mkfs.ext4 not found in PATH, /usr/sbin or /sbin (install e2fsprogs: apt-get install e2fsprogs)"
            .into(),
    })?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating disk {}", path.display()), e))?;
    file.set_len(size_mb * MIB).map_err(|e| {
        Error::io(
            format!("sizing disk {} to {size_mb} MiB", path.display()),
            e,
        )
    })?;
    drop(file);
    let out = tokio::process::Command::new(&mkfs)
        .args(["-F", "-q", "-m", "0", "-L", DISK_ID, "-E"])
        // The file is sparse, so its inode tables already read as zeroes:
        // telling mke2fs spares the guest kernel from zeroing them lazily
        // (slow where guest kernel code is emulated).
        .arg("lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let failure = match out {
        Ok(o) if o.status.success() => return Ok(()),
        Ok(o) => format!(
            "{} failed ({}): {}",
            mkfs.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("running {}: {e}", mkfs.display()),
    };
    let _ = std::fs::remove_file(path);
    Err(Error::Disk {
        path: path.to_path_buf(),
        reason: failure,
    })
}

/// mkfs.ext4 lives in /usr/sbin, which is not in every user's PATH.
fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn creates_a_sparse_ext4_disk() {
        if find_mkfs().is_none() {
            panic!("mkfs.ext4 is missing on this host: install e2fsprogs");
        }
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk.img");
        create_disk(&p, 64).await.unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 64 * MIB);
        assert!(
            m.blocks() * 512 < 16 * MIB,
            "not sparse: {} blocks",
            m.blocks()
        );
        // ext4 superblock magic 0xEF53 at offset 1024 + 0x38.
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        // An existing file is never overwritten.
        assert!(matches!(create_disk(&p, 64).await, Err(Error::Io { .. })));
    }
}
