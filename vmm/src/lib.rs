//! smol's virtual machine monitor.
//!
//! A [`VmConfig`] goes in, a running [`Vm`] comes out. The monitor knows
//! nothing of images, machine names or the agent protocol: it boots a kernel
//! with an initramfs, serves a serial console into a log file, and exposes
//! virtio-mmio devices (block disks, a vsock whose host side is a Unix socket,
//! a network card whose host side is passt).

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod event_loop;
pub mod exit;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
mod sparse;
pub mod vcpu;
pub mod vm;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Smallest guest memory accepted. Our kernel loads at 16 MiB and the
/// initramfs (a few MiB, unpacked into page cache) must fit above it with
/// room for user space; 64 MiB leaves a margin, anything less is refused
/// rather than left to fail deep in the guest's boot.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest guest memory accepted (the guest physical map goes up to 1 TiB).
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Largest vCPU count (the MP table and the LAPIC ids are 8 bits; keep a
/// margin for the IO-APIC id).
pub const MAX_VCPUS: u8 = 254;

/// What to boot and with which devices.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed kernel (`vmlinux` ELF with a PVH entry note).
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs, loaded as the PVH module.
    pub initramfs: Option<PathBuf>,
    /// A directory where the kernel and initramfs, prepared for mapping,
    /// are kept across processes (`boot::store`): the first VM of a later
    /// process maps them instead of preparing them. `None` prepares them
    /// once per process.
    pub image_cache: Option<PathBuf>,
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
    /// A virtio-net device, if any.
    pub net: Option<NetConfig>,
    /// virtio-fs devices (vhost-user, each served by its own virtiofsd).
    /// With any, every byte of guest RAM lives in its shared memfd, since
    /// the back ends map it (see [`memory`]).
    pub fs: Vec<FsConfig>,
}

/// A virtio-fs device: the guest mounts `tag` (`mount -t virtiofs <tag>
/// <dir>`), and the requests go to the vhost-user back end listening on
/// `socket` (virtiofsd's `--socket-path`), which must be up before the
/// VM is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The mount tag the guest sees: 1 to 36 bytes, no NUL.
    pub tag: String,
    /// The back end's vhost-user socket.
    pub socket: PathBuf,
}

impl FsConfig {
    pub fn new(tag: impl Into<String>, socket: impl Into<PathBuf>) -> FsConfig {
        FsConfig {
            tag: tag.into(),
            socket: socket.into(),
        }
    }
}

pub use devices::virtio::net::{IpNet, IpNetError};

/// A virtio-net device whose host side is passt (or anything else that
/// speaks qemu's stream framing: each Ethernet frame preceded by its length
/// as a 4-byte big-endian integer).
///
/// The socket is shared (`Arc`) so that the config stays `Clone`; the
/// device never closes it early, but shuts the connection down when the
/// stream fails, which passt sees as its guest leaving.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// A connected `SOCK_STREAM` socket to passt, e.g. one end of a
    /// `socketpair` whose other end passt got with `--fd`.
    pub backend: Arc<OwnedFd>,
    /// The guest's MAC address (a unicast address).
    pub mac: [u8; 6],
    /// Egress allow-list: `None` lets every frame out; with a list, only
    /// ARP, DHCP, NDP and IP to an address inside one of the networks.
    pub allow: Option<Vec<IpNet>>,
}

impl NetConfig {
    /// A locally administered unicast address: every machine can have
    /// the same one, each being alone on its link with its own passt.
    pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x73, 0x6d, 0x6f, 0x6c, 0x01];

    /// A device on `backend` with [`NetConfig::DEFAULT_MAC`] and no
    /// allow-list.
    pub fn new(backend: OwnedFd) -> NetConfig {
        NetConfig {
            backend: Arc::new(backend),
            mac: Self::DEFAULT_MAC,
            allow: None,
        }
    }
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

/// Why a VM is no longer running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked to power off or reboot (i8042 reset, `reboot=k`).
    GuestShutdown,
    /// [`Vm::stop`] (or dropping the [`Vm`]) ended it.
    HostStop,
    /// A vCPU failed: KVM internal error, emulation failure, triple fault...
    Crashed(String),
}

/// How long each phase of the host-side set-up took, from the start of
/// [`Vm::start`] to the first `KVM_RUN` of the boot vCPU.
///
/// KVM's part (irqchip, PIT, memory slot registration) and the initramfs
/// copy run on a helper thread while the kernel is copied in: `kernel_load`
/// is the wall time of that whole section, and the helper's `kvm` and
/// `memory` shares overlap it, so the phases can add up to more than
/// `total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// Opening /dev/kvm, creating the VM, irqchip, PIT and CPUID query.
    pub kvm: Duration,
    /// Creating the memfd and its mappings, registering them with KVM.
    pub memory: Duration,
    /// Loading the kernel and initramfs, writing boot structures (wall time,
    /// overlapping KVM's side of the set-up).
    pub kernel_load: Duration,
    /// Serial, i8042, virtio-mmio transports and their devices.
    pub devices: Duration,
    /// Creating and configuring the vCPUs.
    pub vcpus: Duration,
    /// From the vCPUs being configured to the first `KVM_RUN`.
    pub first_run: Duration,
    /// The whole: from the start of [`Vm::start`] to the first `KVM_RUN`.
    pub total: Duration,
}

/// Errors of [`Vm::start`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel not found: {}", path.display())]
    KernelNotFound { path: PathBuf },
    #[error("kernel {} is not a bootable vmlinux: {reason}", path.display())]
    KernelInvalid { path: PathBuf, reason: String },
    #[error("initramfs not found: {}", path.display())]
    InitramfsNotFound { path: PathBuf },
    #[error("initramfs {} ({size} bytes) does not fit in guest memory", path.display())]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("guest memory of {mib} MiB is below the {min_mib} MiB needed to boot")]
    MemoryTooSmall { mib: u32, min_mib: u32 },
    #[error("guest memory of {mib} MiB is above the {max_mib} MiB supported")]
    MemoryTooLarge { mib: u32, max_mib: u32 },
    #[error("a vm needs at least one vcpu")]
    ZeroVcpus,
    #[error("{vcpus} vcpus requested, at most {max} supported")]
    TooManyVcpus { vcpus: u8, max: u8 },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot open /dev/kvm (is kvm loaded and may this user open it?)")]
    KvmUnavailable {
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("kvm {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("cannot write boot data: {0}")]
    BootData(String),
    #[error("device {name}: {reason}")]
    Device { name: String, reason: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
}

/// What [`Vm::snapshot`] spent, phase by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotTimings {
    /// Until every vCPU was parked with its state saved.
    pub pause: Duration,
    /// Copying (or reflinking) the disks.
    pub disks: Duration,
    /// Writing guest memory.
    pub memory: Duration,
    /// Bytes of guest memory written (non-zero pages).
    pub memory_bytes: u64,
    /// The whole, from the pause request to the vCPUs running again.
    pub total: Duration,
}

/// Drops the kernel and initramfs images this process prepared for mapping
/// into guest memory (at most a few of each, one memfd apiece; see
/// `boot::template`). VMs already running keep theirs through their
/// mappings; the next VM prepares its images again. For long-running
/// processes that switch kernels, and for leak checks that count fds.
pub fn release_boot_images() {
    boot::template::KERNELS.clear();
    boot::template::INITRAMFS.clear();
}

/// Whether `/dev/kvm` is provided by the `kvm_pvm` module (software nested
/// virtualisation): guests then need compatibility flags and one vCPU.
pub fn is_kvm_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A running (or exited) virtual machine.
///
/// Dropping it stops the VM and releases every thread and fd.
pub struct Vm {
    config: VmConfig,
    timings: BootTimings,
    exit: Arc<exit::ExitState>,
    running: Option<vm::Running>,
}

impl Vm {
    /// Validates `config`, builds the VM, starts its vCPUs and event loop,
    /// and returns once the boot vCPU has entered `KVM_RUN` (it does not
    /// wait for the guest to boot).
    pub fn start(config: VmConfig) -> Result<Vm, Error> {
        let (running, timings) = vm::build(&config)?;
        tracing::debug!(?timings, "vm started");
        Ok(Vm {
            config,
            timings,
            exit: running.exit.clone(),
            running: Some(running),
        })
    }

    /// Builds a VM from the snapshot in `dir` (see [`snapshot`]) and starts
    /// it where the snapshot stopped. `config` gives its host side: the
    /// console log, the vsock socket, disk files that hold the snapshot's
    /// disks (copy them with [`snapshot::clone_file`]) and a new network
    /// back end (a new passt; frames the old one held are lost, which the
    /// guest's TCP recovers from); its memory, vCPUs and devices (the net
    /// device's MAC included) must match the snapshot's, and its kernel and
    /// initramfs are not read.
    pub fn restore(config: VmConfig, dir: &Path) -> Result<Vm, Error> {
        let snap = snapshot::VmSnapshot::load(dir)?;
        let (running, timings) = vm::restore(&config, dir, &snap)?;
        tracing::debug!(?timings, "vm restored");
        Ok(Vm {
            config,
            timings,
            exit: running.exit.clone(),
            running: Some(running),
        })
    }

    /// Saves the running VM into the directory `dir` (which must exist and
    /// should be empty): memory, vCPU and device state, and a copy of each
    /// disk taken at the same instant. The VM is paused meanwhile and runs
    /// on afterwards.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotTimings, Error> {
        let running = self
            .running
            .as_ref()
            .ok_or(Error::Snapshot(snapshot::Error::NotRunning))?;
        Ok(running.snapshot(dir, &self.config)?)
    }

    /// Host-initiated stop: kicks the vCPUs out of `KVM_RUN`, joins every
    /// thread and closes every fd. Idempotent; returns how the VM ended
    /// (the guest's own exit if it came first).
    pub fn stop(&mut self) -> ExitReason {
        match self.running.take() {
            Some(running) => running.stop(),
            None => self.exit.reason().unwrap_or(ExitReason::HostStop),
        }
    }

    /// Blocks until the guest exits (shutdown, crash) or `timeout` passes.
    /// After [`Vm::stop`] it returns the recorded reason at once.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        self.exit.wait(timeout)
    }

    /// How the VM ended, if it has.
    pub fn try_exit(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Logs, at info level, where each vCPU is (instruction pointer,
    /// privilege level): for diagnosing a guest that hangs.
    pub fn log_vcpu_state(&self) {
        if self.running.is_some() {
            self.exit.sample_vcpus();
        }
    }

    /// Host-side set-up phases.
    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// The Unix socket of the vsock device, if the VM has one.
    pub fn vsock_uds_path(&self) -> Option<&Path> {
        self.config.vsock.as_ref().map(|v| v.uds_path.as_path())
    }

    /// The console log file, if any.
    pub fn console_log(&self) -> Option<&Path> {
        self.config.console_log.as_deref()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn vm_is_send_and_sync() {
        assert_send_sync::<Vm>();
    }
}
