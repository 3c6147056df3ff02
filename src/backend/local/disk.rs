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
    format_disk(&mkfs, path, size_mb).await
}

async fn format_disk(mkfs: &Path, path: &Path, size_mb: u64) -> Result<()> {
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
    // A cancelled create (its future dropped) kills mkfs and removes the
    // file: nothing of it stays behind.
    let mut unmade = RemoveOnDrop(Some(path.to_path_buf()));
    let out = tokio::process::Command::new(mkfs)
        .args(["-F", "-q", "-m", "0", "-L", DISK_ID, "-E"])
        // The file is sparse, so its inode tables already read as zeroes:
        // telling mke2fs spares the guest kernel from zeroing them lazily
        // (slow where guest kernel code is emulated).
        .arg("lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let failure = match out {
        Ok(o) if o.status.success() => {
            unmade.0 = None;
            return Ok(());
        }
        Ok(o) => format!(
            "{} failed ({}): {}",
            mkfs.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("running {}: {e}", mkfs.display()),
    };
    drop(unmade);
    Err(Error::Disk {
        path: path.to_path_buf(),
        reason: failure,
    })
}

/// Removes a file when dropped, unless emptied first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
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

    /// Issue 15: a create cancelled while mkfs runs kills it and leaves no
    /// disk file. (A stand-in mkfs that sleeps, so that it is caught
    /// running; the real one takes milliseconds.)
    #[tokio::test]
    async fn a_cancelled_create_kills_mkfs_and_removes_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mkfs = t.path().join("slow-mkfs");
        let started = t.path().join("started");
        std::fs::write(
            &mkfs,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
                started.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&mkfs, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = t.path().join("cancelled.img");
        let mut fut = Box::pin(format_disk(&mkfs, &p, 64));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let pid: i32 = loop {
            tokio::select! {
                r = &mut fut => panic!("mkfs ended: {r:?}"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
            }
            if let Some(pid) = std::fs::read_to_string(&started)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "mkfs never ran");
        };
        assert!(p.exists());
        drop(fut);
        assert!(!p.exists(), "the disk file is removed");
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "mkfs {pid} still runs"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
