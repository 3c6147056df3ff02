//! Snapshots of a running VM: vCPU and VM state, device state, guest
//! memory and disks in one directory, and the VM brought back from it.
//!
//! A snapshot directory holds:
//! - `vm.json`: [`VmSnapshot`], written last (its presence marks a
//!   complete snapshot), with a format version;
//! - `memory.bin`: guest memory, sparse, laid out like the memfd
//!   ([`memory`]); a restore maps it copy-on-write, so it never changes and
//!   serves any number of restores;
//! - `disk<N>.img`: each disk at the same instant (a reflink where the
//!   filesystem has them, else a sparse copy of its data extents).
//!
//! The order follows Firecracker: park the vCPUs (each saves its own state,
//! [`vcpu`]), save the VM-wide state ([`vm_state`], with the clock the
//! guest last read, [`kvmclock`]), quiesce and save the
//! devices, copy disks and memory, resume.

pub mod kvmclock;
pub mod memory;
pub mod vcpu;
pub mod vm_state;

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;

/// Bumped whenever [`VmSnapshot`] or the memory layout changes meaning.
pub const FORMAT_VERSION: u32 = 1;
pub const STATE_FILE: &str = "vm.json";
pub const MEMORY_FILE: &str = "memory.bin";
/// A state file larger than this is not a snapshot of ours.
const MAX_STATE_BYTES: u64 = 16 << 20;

/// The file name of disk `index` in a snapshot directory.
pub fn disk_file(index: usize) -> String {
    format!("disk{index}.img")
}

/// Errors of taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no snapshot at {}", path.display())]
    NotFound { path: PathBuf },
    #[error("snapshot {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("snapshot format version {found} is not this monitor's version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("the snapshot needs cpu features this host lacks (cpuid leaf {leaf:#x} {register} bits {bits:#x})")]
    CpuFeatures {
        leaf: u32,
        register: &'static str,
        bits: u32,
    },
    #[error("the snapshot has {what} {snapshot}, the vm config asks for {config}")]
    Mismatch {
        what: &'static str,
        snapshot: String,
        config: String,
    },
    #[error("cannot pause the vm: {0}")]
    Pause(String),
    #[error("the vm is not running")]
    NotRunning,
    #[error("kvm {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// A disk as recorded in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// File name inside the snapshot directory.
    pub file: String,
    pub read_only: bool,
    pub id: String,
}

/// Everything of a VM but its memory and disks.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub version: u32,
    pub memory_mib: u32,
    /// Whether it was taken on a kvm_pvm host (the guest's boot flags
    /// differ, so it restores only on the same kind of host).
    pub kvm_pvm: bool,
    pub vcpus: Vec<vcpu::VcpuState>,
    pub vm: vm_state::VmState,
    pub serial: SerialSnapshot,
    /// One per virtio-mmio slot, in slot order (disks, vsock, net, fs).
    pub transports: Vec<TransportState>,
    pub disks: Vec<SavedDisk>,
    pub vsock_cid: Option<u32>,
    /// The net device's MAC, when the VM has one. Absent from snapshots
    /// of monitors without virtio-net, which had none: an addition, not a
    /// change of meaning, so the format version stays.
    #[serde(default)]
    pub net_mac: Option<[u8; 6]>,
    /// The mount tags of the virtio-fs devices, in slot order (after the
    /// net device). An addition like `net_mac`: older snapshots have none.
    #[serde(default)]
    pub fs_tags: Vec<String>,
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

impl VmSnapshot {
    /// Reads and checks the state file of the snapshot in `dir`: present,
    /// whole, of this format version, with a memory file of the right size.
    pub fn load(dir: &Path) -> Result<VmSnapshot, Error> {
        let path = dir.join(STATE_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    path: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(Error::io(format!("cannot open {}", path.display()))(e)),
        };
        let mut text = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(Error::io(format!("cannot read {}", path.display())))?;
        let corrupt = |reason: String| Error::Corrupt {
            what: path.display().to_string(),
            reason,
        };
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(corrupt(format!("larger than {MAX_STATE_BYTES} bytes")));
        }
        let probe: VersionProbe =
            serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if probe.version != FORMAT_VERSION {
            return Err(Error::Version {
                found: probe.version,
                expected: FORMAT_VERSION,
            });
        }
        let snap: VmSnapshot = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if snap.vcpus.is_empty() || snap.vcpus.len() > crate::MAX_VCPUS as usize {
            return Err(corrupt(format!("{} vcpus", snap.vcpus.len())));
        }
        if !(crate::MIN_MEMORY_MIB..=crate::MAX_MEMORY_MIB).contains(&snap.memory_mib) {
            return Err(corrupt(format!("{} MiB of memory", snap.memory_mib)));
        }
        for d in &snap.disks {
            if d.file
                != Path::new(&d.file)
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
            {
                return Err(corrupt(format!("disk file name {:?}", d.file)));
            }
        }
        let mem = dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&mem)
            .map_err(|e| Error::Corrupt {
                what: mem.display().to_string(),
                reason: e.to_string(),
            })?
            .len();
        let want = snap.memory_mib as u64 * 1024 * 1024;
        if len != want {
            return Err(Error::Corrupt {
                what: mem.display().to_string(),
                reason: format!("{len} bytes where the guest has {want}"),
            });
        }
        Ok(snap)
    }

    /// Writes the state file into `dir` atomically (a temporary name, then
    /// a rename), so a reader sees a whole snapshot or none.
    pub fn store(&self, dir: &Path) -> Result<(), Error> {
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_vec(self).map_err(|e| Error::Corrupt {
            what: "state".into(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(Error::io(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
            .map_err(Error::io(format!("cannot rename {}", tmp.display())))
    }
}

// FICLONE = _IOW(0x94, 9, int).
vmm_sys_util::ioctl_iow_nr!(FICLONE, 0x94, 9, libc::c_int);

/// How [`clone_file`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    /// A reflink: no data copied, blocks shared copy-on-write.
    Reflink,
    /// The data extents copied (holes stay holes), this many bytes.
    Sparse(u64),
}

/// Copies `src` to a new file `dst` (which must not exist): a reflink
/// where the filesystem supports it, else the data extents only. Removes
/// `dst` again on failure.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneKind, Error> {
    let input = File::open(src).map_err(Error::io(format!("cannot open {}", src.display())))?;
    let out = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(Error::io(format!("cannot create {}", dst.display())))?;
    let r = clone_into(&input, &out);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r.map_err(Error::io(format!(
        "cannot copy {} to {}",
        src.display(),
        dst.display()
    )))
}

fn clone_into(input: &File, out: &File) -> io::Result<CloneKind> {
    // SAFETY: FICLONE reads an int (the source fd) passed by value; both
    // fds are open for the call.
    let r = unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(out, FICLONE(), input.as_raw_fd() as libc::c_ulong)
    };
    if r == 0 {
        return Ok(CloneKind::Reflink);
    }
    let len = input.metadata()?.len();
    out.set_len(len)?;
    let mut copied = 0u64;
    for (data, hole) in crate::sparse::data_extents(input, 0, len)? {
        let mut off_in = data as libc::loff_t;
        let mut off_out = data as libc::loff_t;
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: both fds are open; the offsets are valid loff_t
            // values the kernel updates; no buffer of ours is involved.
            let n = unsafe {
                libc::copy_file_range(
                    input.as_raw_fd(),
                    &mut off_in,
                    out.as_raw_fd(),
                    &mut off_out,
                    left.min(1 << 30),
                    0,
                )
            };
            match n {
                n if n > 0 => left -= n as usize,
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        copied += hole - data;
    }
    Ok(CloneKind::Sparse(copied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn clone_file_keeps_data_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("a.img");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let dst = t.path().join("b.img");
        let kind = clone_file(&src, &dst).unwrap();
        if let CloneKind::Sparse(n) = kind {
            assert!(n < 1 << 20, "copied {n} bytes of a sparse file");
        }
        let back = std::fs::read(&dst).unwrap();
        assert_eq!(back.len(), 64 << 20);
        assert_eq!(&back[..4], b"head");
        assert_eq!(&back[back.len() - 4..], b"tail");
        assert!(back[4..back.len() - 4].iter().all(|&b| b == 0));
        assert!(
            matches!(clone_file(&src, &dst), Err(Error::Io { .. })),
            "never overwrites"
        );
        assert!(dst.exists(), "a refused copy leaves the existing file");
    }

    #[test]
    fn load_names_what_is_wrong() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            VmSnapshot::load(t.path()),
            Err(Error::NotFound { .. })
        ));
        std::fs::write(t.path().join(STATE_FILE), b"{\"version\": 1, \"memo").unwrap();
        assert!(matches!(
            VmSnapshot::load(t.path()),
            Err(Error::Corrupt { .. })
        ));
        std::fs::write(t.path().join(STATE_FILE), b"{\"version\": 99}").unwrap();
        assert!(matches!(
            VmSnapshot::load(t.path()),
            Err(Error::Version {
                found: 99,
                expected: FORMAT_VERSION
            })
        ));
        std::fs::write(t.path().join(STATE_FILE), b"{\"version\": 1}").unwrap();
        let e = VmSnapshot::load(t.path()).err().unwrap();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    }
}
