//! Warm creates: one booted snapshot per machine shape per host.
//!
//! A shape is what a booted guest depends on: the kernel and initramfs
//! (by file identity: device, inode, size, modification time), memory,
//! vCPUs, disk size, the agent protocol, the snapshot formats, and the
//! host's boot: a guest's clock and TSC resume from values that belong to
//! the boot of the host they were saved on, so a snapshot kept in a cache
//! that outlives a reboot (or moves to another host) is never restored
//! there; that host boots the shape once of its own. The first
//! create of a shape boots and then snapshots its machine into
//! `<cache>/warm/<shape>/`; every later create restores that snapshot
//! instead of booting. Rebuilt assets give a new shape, so an old snapshot
//! is never restored with new assets. A lock file per shape makes
//! concurrent creates of a new shape boot once: the others wait for the
//! snapshot and restore it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::backend::local::assets::GuestAssets;
use crate::config::ResourceSpec;
use crate::error::{Error, Result};

/// One machine shape's place in the warm cache.
#[derive(Debug, Clone)]
pub(crate) struct WarmShape {
    /// The snapshot directory (present once the shape was booted).
    pub dir: PathBuf,
    lock: PathBuf,
    /// The part of the name that changes with the guest assets.
    assets_key: String,
}

/// Held while a shape's snapshot is looked up or made.
pub(crate) struct ShapeLock {
    _lock: Flock<File>,
}

fn identity(path: &Path) -> Result<String> {
    let m =
        std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Ok(format!(
        "{}:{}:{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// This boot of the host (changes with every reboot and every host).
fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl WarmShape {
    /// The shape of a machine with `resources` and `shares` virtio-fs
    /// devices (`MachineConfig.mounts`) booted from `assets`, in the cache
    /// directory `cache`: `<cache>/warm/<assets>-<resources>`, where
    /// `<assets>` hashes the boot files' identities and the formats.
    pub fn new(
        cache: &Path,
        assets: &GuestAssets,
        resources: &ResourceSpec,
        shares: usize,
    ) -> Result<WarmShape> {
        let mut h = Sha256::new();
        for part in [
            format!("snapshot {}", smol_vmm::snapshot::FORMAT_VERSION),
            format!("record {}", crate::backend::local::snapshot::RECORD_VERSION),
            format!("protocol {}", smol_protocol::PROTOCOL_VERSION),
            format!("kvm_pvm {}", smol_vmm::is_kvm_pvm_host()),
            format!("host boot {}", host_boot_id()),
            format!("kernel {}", identity(&assets.kernel)?),
            format!("initramfs {}", identity(&assets.initramfs)?),
        ] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        let assets_key = hex::encode(&h.finalize()[..8]);
        // A machine with a network or shares has more devices: another
        // shape (a restore needs the snapshot's devices, no more, no less).
        let key = format!(
            "{assets_key}-{}cpu-{}m-{}d{}{}",
            resources.cpus,
            resources.memory_mb,
            resources.disk_mb,
            if resources.network { "-net" } else { "" },
            match shares {
                0 => String::new(),
                n => format!("-{n}fs"),
            }
        );
        let warm = cache.join("warm");
        Ok(WarmShape {
            dir: warm.join(&key),
            lock: warm.join(format!("{key}.lock")),
            assets_key,
        })
    }

    /// Takes the shape's lock, waiting for a create that is making its
    /// snapshot (a guest boot: up to minutes on kvm_pvm hosts).
    pub async fn lock(&self) -> Result<ShapeLock> {
        let path = self.lock.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            }
            let file = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
                Error::io(format!("locking {}", path.display()), errno.into())
            })?;
            Ok(ShapeLock { _lock: lock })
        })
        .await
        .map_err(|e| Error::Internal(format!("warm cache lock task: {e}")))?
    }

    /// A fresh directory beside the snapshot's, to fill and then
    /// [`WarmShape::publish`].
    pub fn staging(&self) -> PathBuf {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.dir
            .with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    }

    /// Moves a filled staging directory into place (under the lock), and
    /// removes the snapshots of assets that are gone (a machine running
    /// from one keeps its memory mapped).
    pub fn publish(&self, staging: &Path) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::rename(staging, &self.dir)
            .map_err(|e| Error::io(format!("publishing {}", self.dir.display()), e))?;
        let Some(warm) = self.dir.parent() else {
            return Ok(());
        };
        for entry in std::fs::read_dir(warm).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = !name.starts_with('.')
                && !name.ends_with(".lock")
                && !name.starts_with(&format!("{}-", self.assets_key));
            if stale && entry.path().is_dir() {
                tracing::info!(dir = %entry.path().display(), "removing the warm snapshot of older guest assets");
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(warm.join(format!("{name}.lock")));
            }
        }
        Ok(())
    }

    /// Drops a snapshot that failed to restore, so the next create boots.
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_resources_and_assets() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("vmlinux");
        let i = t.path().join("initramfs.cpio");
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initramfs").unwrap();
        let assets = GuestAssets {
            kernel: k.clone(),
            initramfs: i,
        };
        let r = ResourceSpec::default();
        let a = WarmShape::new(t.path(), &assets, &r, 0).unwrap();
        assert_eq!(a.dir, WarmShape::new(t.path(), &assets, &r, 0).unwrap().dir);
        let bigger = ResourceSpec {
            memory_mb: 256,
            ..r
        };
        assert_ne!(
            a.dir,
            WarmShape::new(t.path(), &assets, &bigger, 0).unwrap().dir
        );
        let networked = ResourceSpec { network: true, ..r };
        let n = WarmShape::new(t.path(), &assets, &networked, 0)
            .unwrap()
            .dir;
        assert_ne!(a.dir, n, "a network device is another shape");
        assert!(n.to_string_lossy().ends_with("-net"), "{}", n.display());
        let one = WarmShape::new(t.path(), &assets, &r, 1).unwrap().dir;
        let two = WarmShape::new(t.path(), &assets, &networked, 2)
            .unwrap()
            .dir;
        assert_ne!(a.dir, one, "a share is a device: another shape");
        assert!(
            one.to_string_lossy().ends_with("d-1fs"),
            "{}",
            one.display()
        );
        assert!(
            two.to_string_lossy().ends_with("-net-2fs"),
            "{}",
            two.display()
        );
        // A rebuilt kernel is another shape.
        std::fs::remove_file(&k).unwrap();
        std::fs::write(&k, b"kernel 2").unwrap();
        assert_ne!(a.dir, WarmShape::new(t.path(), &assets, &r, 0).unwrap().dir);
        assert!(a.staging().starts_with(t.path().join("warm")));

        // Publishing the new assets' snapshot drops the old assets' one.
        let b = WarmShape::new(t.path(), &assets, &r, 0).unwrap();
        std::fs::create_dir_all(&a.dir).unwrap();
        let staging = b.staging();
        std::fs::create_dir_all(&staging).unwrap();
        b.publish(&staging).unwrap();
        assert!(b.dir.is_dir() && !staging.exists());
        assert!(!a.dir.exists(), "the old assets' snapshot is gone");
        let name = b.dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.ends_with("-1cpu-128m-1024d"), "{name}");
    }
}
