//! smol's virtual machine monitor.
//!
//! A [`VmConfig`] goes in, a running [`Vm`] comes out. The monitor knows
//! nothing of images, machine names or the agent protocol: it boots a kernel
//! with an initramfs, serves a serial console into a log file, and exposes
//! virtio-mmio devices (block disks, a vsock whose host side is a Unix socket).

pub mod devices;

use std::path::PathBuf;

/// What to boot and with which devices.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed kernel (`vmlinux` ELF with a PVH entry note).
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs, loaded as the PVH module.
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended after the monitor's own arguments.
    pub cmdline: String,
    /// Number of vCPUs (clamped to 1 on kvm_pvm hosts, with a warning).
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// File that receives the serial console output. `None` discards it.
    pub console_log: Option<PathBuf>,
    /// A virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in order: the first is `/dev/vda`.
    pub disks: Vec<DiskConfig>,
}

/// A virtio-vsock device whose host side is a Unix socket.
///
/// A host process connects to `uds_path`, writes `CONNECT <port>\n`, reads
/// `OK <port>\n`, and then has a byte stream to the guest's vsock port.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id (>= 3).
    pub guest_cid: u32,
    /// Path of the Unix socket the monitor listens on.
    pub uds_path: PathBuf,
}

/// A raw disk image file exposed as a virtio-blk device.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    pub id: String,
}
