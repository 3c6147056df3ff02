//! Building a VM from a [`VmConfig`] and tearing it down again.
//!
//! Order of [`build`]: validate (no KVM needed), KVM (VM, irqchip, PIT),
//! memory, kernel and boot data, devices, vCPUs, then the threads: the
//! event loop and one per vCPU. Until the threads start, every resource is
//! owned by a local and released by `Drop` on any error.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::MutEventSubscriber;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, cmdline::MmioSlot};
use crate::devices::bus::Bus;
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{self, ConsoleLog, SerialDevice};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{blk, fs, net, vsock, VirtioDevice};
use crate::event_loop::{EventLoop, EventLoopHandle, Subscriber};
use crate::exit::ExitState;
use crate::memory::{GuestRam, KVM_TSS_ADDR, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::seccomp::{Profile, Spawner};
use crate::vcpu::{self, Buses, PauseControl, Vcpu};
use crate::{
    cpu, BootTimings, Error, ExitReason, VmConfig, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB,
};

/// First GSI of the virtio-mmio devices (0-4 are the PIT, keyboard,
/// cascade, COM2 and COM1).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// IO-APIC pins 5..=23 are free for virtio devices.
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// How long `start` waits for the boot vCPU thread to reach `KVM_RUN`.
const FIRST_RUN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `validate` settled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub vcpus: u8,
    pub kvm_pvm: bool,
    pub memory_bytes: u64,
}

/// Checks a config without touching KVM: every user mistake gets its named
/// error here, before any resource is allocated.
pub fn validate(config: &VmConfig, kvm_pvm: bool) -> Result<Plan, Error> {
    let plan = validate_shape(config, kvm_pvm)?;
    if !config.kernel.is_file() {
        return Err(Error::KernelNotFound {
            path: config.kernel.clone(),
        });
    }
    if let Some(initramfs) = &config.initramfs {
        if !initramfs.is_file() {
            return Err(Error::InitramfsNotFound {
                path: initramfs.clone(),
            });
        }
    }
    Ok(plan)
}

/// [`validate`] without the boot files (a restore does not read them).
fn validate_shape(config: &VmConfig, kvm_pvm: bool) -> Result<Plan, Error> {
    if config.vcpus == 0 {
        return Err(Error::ZeroVcpus);
    }
    if config.vcpus > MAX_VCPUS {
        return Err(Error::TooManyVcpus {
            vcpus: config.vcpus,
            max: MAX_VCPUS,
        });
    }
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(Error::MemoryTooSmall {
            mib: config.memory_mib,
            min_mib: MIN_MEMORY_MIB,
        });
    }
    if config.memory_mib > MAX_MEMORY_MIB {
        return Err(Error::MemoryTooLarge {
            mib: config.memory_mib,
            max_mib: MAX_MEMORY_MIB,
        });
    }
    let devices = virtio_device_count(config);
    if devices > MAX_VIRTIO_DEVICES {
        return Err(Error::Device {
            name: "virtio".into(),
            reason: format!("{devices} devices requested, at most {MAX_VIRTIO_DEVICES}"),
        });
    }
    if let Some(v) = &config.vsock {
        if v.guest_cid < 3 {
            return Err(Error::Device {
                name: "vsock".into(),
                reason: format!("guest cid {} is reserved; use 3 or above", v.guest_cid),
            });
        }
    }
    if let Some(n) = &config.net {
        if !net::is_unicast_mac(&n.mac) {
            return Err(Error::Device {
                name: "virtio-net".into(),
                reason: format!(
                    "mac address {} is not a unicast address",
                    net::format_mac(&n.mac)
                ),
            });
        }
    }
    for (i, f) in config.fs.iter().enumerate() {
        let name = || format!("virtio-fs {i}");
        fs::check_tag(&f.tag).map_err(|e| device_err(&name(), e))?;
        if config.fs[..i].iter().any(|other| other.tag == f.tag) {
            return Err(device_err(
                &name(),
                format!("mount tag {:?} is used twice", f.tag),
            ));
        }
    }
    let mut vcpus = config.vcpus;
    if kvm_pvm && vcpus > 1 {
        tracing::warn!(
            requested = vcpus,
            "kvm_pvm host: running 1 vcpu, since a second one hangs the guest at bring-up"
        );
        vcpus = 1;
    }
    Ok(Plan {
        vcpus,
        kvm_pvm,
        memory_bytes: config.memory_mib as u64 * 1024 * 1024,
    })
}

/// How many virtio-mmio devices `config` asks for.
fn virtio_device_count(config: &VmConfig) -> usize {
    config.disks.len()
        + config.vsock.is_some() as usize
        + config.net.is_some() as usize
        + config.fs.len()
}

/// The virtio-mmio slots, disks first (so the first disk is `/dev/vda`),
/// then the vsock device, then the network card, then the virtio-fs
/// devices (each addition after the others, so that the slots of a VM
/// without it are what they were before it existed).
pub fn mmio_slots(config: &VmConfig) -> Vec<MmioSlot> {
    let count = virtio_device_count(config);
    (0..count)
        .map(|i| MmioSlot {
            base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            irq: VIRTIO_FIRST_IRQ + i as u32,
        })
        .collect()
}

/// Everything a running VM owns. Field order is drop order: threads first
/// (joined in [`Running::stop`]), then devices, memory and the VM fd.
pub struct Running {
    pub exit: Arc<ExitState>,
    plan: Plan,
    vcpu_threads: Vec<JoinHandle<()>>,
    event_loop: Option<EventLoopHandle>,
    /// Turns PIT reinjection off beside the guest (see
    /// [`disable_pit_reinjection`]); joined before the VM fd closes.
    pit_tuning: Option<JoinHandle<()>>,
    /// Starts the threads the filtered ones ask for (a disk's I/O thread
    /// when the guest activates it); joined once those have stopped.
    spawner: Spawner,
    pause: Arc<PauseControl>,
    /// The virtio-mmio transports in slot order (also on the MMIO bus).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    _buses: Arc<Buses>,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    _kvm: Kvm,
}

impl Running {
    /// Saves the whole VM into `dir` (see [`crate::snapshot`]) and lets it
    /// run on. `config` is the VM's: its disk files are copied while it is
    /// paused.
    pub fn snapshot(
        &self,
        dir: &Path,
        config: &VmConfig,
    ) -> Result<crate::SnapshotTimings, crate::snapshot::Error> {
        use crate::snapshot::{self as snap, Error as S};
        let disks = &config.disks;
        let t0 = Instant::now();
        if self.exit.should_stop() {
            return Err(S::NotRunning);
        }
        let vcpus = self.pause.pause(&self.exit, PAUSE_TIMEOUT)?;
        let paused = t0.elapsed();
        // Whatever happens now, the VM runs on afterwards.
        let result = (|| {
            let mut vm = snap::vm_state::save(&self.vm_fd)?;
            let readings = vcpus
                .iter()
                .map(|v| snap::kvmclock::guest_reading(self.ram.memory(), &v.msrs));
            let resume = snap::kvmclock::resume_from(vm.clock.clock, readings);
            if resume > vm.clock.clock {
                tracing::debug!(
                    ahead_ns = resume - vm.clock.clock,
                    "the guest's clock is ahead of KVM's; resuming from the guest's"
                );
                vm.clock.clock = resume;
            }
            let transports: Vec<_> = self
                .transports
                .iter()
                .map(|t| crate::devices::bus::lock(t).save_state())
                .collect();
            let serial = crate::devices::bus::lock(&self.serial).save_state();
            let t_disk = Instant::now();
            let mut saved_disks = Vec::with_capacity(disks.len());
            for (i, d) in disks.iter().enumerate() {
                let file = snap::disk_file(i);
                snap::clone_file(&d.path, &dir.join(&file))?;
                saved_disks.push(snap::SavedDisk {
                    file,
                    read_only: d.read_only,
                    id: d.id.clone(),
                });
            }
            let disk_time = t_disk.elapsed();
            let t_mem = Instant::now();
            let mem_path = dir.join(snap::MEMORY_FILE);
            let written = snap::memory::write(&self.ram, &mem_path)
                .map_err(S::io(format!("cannot write {}", mem_path.display())))?;
            let memory_time = t_mem.elapsed();
            let state = snap::VmSnapshot {
                version: snap::FORMAT_VERSION,
                memory_mib: (self.plan.memory_bytes >> 20) as u32,
                kvm_pvm: self.plan.kvm_pvm,
                vcpus,
                vm,
                serial,
                transports,
                disks: saved_disks,
                vsock_cid: config.vsock.as_ref().map(|v| v.guest_cid),
                net_mac: config.net.as_ref().map(|n| n.mac),
                fs_tags: config.fs.iter().map(|f| f.tag.clone()).collect(),
            };
            state.store(dir)?;
            Ok::<_, S>((disk_time, memory_time, written))
        })();
        for t in &self.transports {
            crate::devices::bus::lock(t).resume_device();
        }
        self.pause.resume();
        let (disks, memory, written) = result?;
        Ok(crate::SnapshotTimings {
            pause: paused,
            disks,
            memory,
            memory_bytes: written.data_bytes,
            total: t0.elapsed(),
        })
    }

    /// Stops every thread and releases every resource; returns how the VM
    /// ended.
    pub fn stop(mut self) -> ExitReason {
        self.shutdown()
    }

    /// [`Running::stop`] in place; idempotent, and what `Drop` does, so that
    /// no vCPU runs on guest memory being unmapped, whatever path drops it.
    fn shutdown(&mut self) -> ExitReason {
        self.exit.finish(ExitReason::HostStop);
        self.pause.resume();
        self.exit.forget_vcpu_threads();
        for t in self.vcpu_threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vcpu thread panicked");
            }
        }
        if let Some(mut el) = self.event_loop.take() {
            el.stop();
        }
        if let Some(t) = self.pit_tuning.take() {
            if t.join().is_err() {
                tracing::error!("the pit tuning thread panicked");
            }
        }
        self.exit.reason().unwrap_or(ExitReason::HostStop)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Fields drop after this: the threads are joined first.
        self.shutdown();
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

fn device_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

fn map_boot_err(e: boot::Error) -> Error {
    match e {
        boot::Error::KernelNotFound(path) => Error::KernelNotFound { path },
        boot::Error::KernelInvalid { path, reason } => Error::KernelInvalid { path, reason },
        boot::Error::KernelRead { path, source } => Error::Io {
            what: format!("cannot read kernel {}", path.display()),
            source,
        },
        boot::Error::InitramfsNotFound(path) => Error::InitramfsNotFound { path },
        boot::Error::InitramfsRead { path, source } => Error::Io {
            what: format!("cannot read initramfs {}", path.display()),
            source,
        },
        boot::Error::InitramfsTooLarge { path, size } => Error::InitramfsTooLarge { path, size },
        other => Error::BootData(other.to_string()),
    }
}

/// A virtio device as both the transport and the event loop hold it.
struct SharedDevice {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Subscriber,
}

fn share<D>(name: String, device: D) -> SharedDevice
where
    D: VirtioDevice + MutEventSubscriber + Send + 'static,
{
    let arc = Arc::new(Mutex::new(device));
    SharedDevice {
        name,
        device: arc.clone(),
        subscriber: arc,
    }
}

/// The configured virtio devices, in slot order.
fn create_virtio_devices(config: &VmConfig) -> Result<Vec<SharedDevice>, Error> {
    let mut devices = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("virtio-blk {} ({})", i, disk.path.display());
        let block = blk::Block::new(disk).map_err(|e| device_err(&name, e))?;
        devices.push(share(name, block));
    }
    if let Some(v) = &config.vsock {
        let name = "virtio-vsock".to_string();
        let dev =
            vsock::Vsock::new(v.guest_cid as u64, &v.uds_path).map_err(|e| device_err(&name, e))?;
        devices.push(share(name, dev));
    }
    if let Some(n) = &config.net {
        let name = "virtio-net".to_string();
        let dev = net::Net::new(n).map_err(|e| device_err(&name, e))?;
        devices.push(share(name, dev));
    }
    for (i, f) in config.fs.iter().enumerate() {
        let name = format!("virtio-fs {i} ({}, {})", f.tag, f.socket.display());
        let dev = fs::Fs::new(f).map_err(|e| device_err(&name, e))?;
        devices.push(share(name, dev));
    }
    Ok(devices)
}

fn open_console_log(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::Io {
            what: format!("cannot open console log {}", path.display()),
            source,
        })
}

/// What the helper thread of [`build`] produced.
struct KvmSide {
    cpuid: kvm_bindings::CpuId,
    /// Irqchip, PIT and CPUID.
    kvm: Duration,
    /// Registering the memory slots.
    memory: Duration,
}

// KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71); kvm-ioctls has no wrapper.
vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// Turns off the PIT's catch-up of lost ticks.
///
/// On kvm_pvm the guest kernel is emulated and a timer interrupt costs
/// milliseconds; whenever the vCPU thread is descheduled (two cores shared
/// with builds) KVM queues the ticks it missed and replays them one after
/// the other, and the guest then does little but run its tick handler.
/// Linux keeps time from kvm-clock, not by counting ticks, so dropping
/// them is harmless.
///
/// The ioctl waits for two SRCU grace periods (unregistering the PIT's
/// ack and mask notifiers), about 12 ms here, so it runs on its own thread
/// while the guest starts: it is a runtime switch KVM serialises itself,
/// and the guest programs the PIT seconds into its boot on these hosts.
fn disable_pit_reinjection(vm_fd: &VmFd) {
    let control = kvm_bindings::kvm_reinject_control {
        pit_reinject: 0,
        ..Default::default()
    };
    // SAFETY: KVM_REINJECT_CONTROL reads a `kvm_reinject_control` that
    // lives for the call; the fd is a VM fd with a PIT.
    let ret =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm_fd, KVM_REINJECT_CONTROL(), &control) };
    if ret < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "KVM_REINJECT_CONTROL");
    }
}

fn setup_kvm_side(kvm: &Kvm, vm_fd: &VmFd, ram: &GuestRam) -> Result<KvmSide, Error> {
    let t = Instant::now();
    // The memory slot first: registering it waits for an SRCU grace period,
    // which is quick on a VM fresh from KVM_CREATE_VM but took 6-7 ms on
    // kvm_pvm once the irqchip and PIT were created (measured with strace).
    ram.register(vm_fd)
        .map_err(|e| Error::Memory(e.to_string()))?;
    let mem_time = t.elapsed();
    vm_fd
        .set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    let cpuid = cpu::supported_cpuid(kvm).map_err(|e| device_err("cpuid", e))?;
    Ok(KvmSide {
        cpuid,
        kvm: t.elapsed() - mem_time,
        memory: mem_time,
    })
}

/// Opens KVM, checks the capabilities the monitor needs and creates a VM.
fn open_kvm() -> Result<(Kvm, VmFd), Error> {
    let kvm = Kvm::new().map_err(|source| Error::KvmUnavailable { source })?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::Kvm {
                op: name,
                source: kvm_ioctls::Error::new(libc::ENOTSUP),
            });
        }
    }
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    Ok((kvm, vm_fd))
}

/// The serial irqfd and the virtio-mmio transports, registered with KVM.
fn attach_devices(
    vm_fd: &VmFd,
    mem: &crate::devices::virtio::GuestMemory,
    devices: &[SharedDevice],
    slots: &[MmioSlot],
) -> Result<(EventFd, Vec<(MmioTransport, MmioSlot)>), Error> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Io {
        what: "cannot create the serial irqfd".into(),
        source,
    })?;
    vm_fd
        .register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let mut transports = Vec::with_capacity(devices.len());
    for (dev, slot) in devices.iter().zip(slots) {
        let transport =
            MmioTransport::attach(vm_fd, dev.device.clone(), mem.clone(), slot.base, slot.irq)
                .map_err(|e| device_err(&dev.name, e))?;
        transports.push((transport, *slot));
    }
    Ok((serial_irq, transports))
}

/// What boot and restore have built before the devices and vCPUs join.
struct Shell {
    plan: Plan,
    exit: Arc<ExitState>,
    kvm: Kvm,
    vm_fd: VmFd,
    ram: GuestRam,
    devices: Vec<SharedDevice>,
    transports: Vec<(MmioTransport, MmioSlot)>,
    serial_irq: EventFd,
}

/// How the vCPUs get their first state.
enum CpuStart<'a> {
    /// The PVH entry of a fresh boot.
    Boot {
        cpuid: kvm_bindings::CpuId,
        entry: u64,
    },
    /// A snapshot's states, one per vCPU.
    Restore(&'a crate::snapshot::VmSnapshot),
}

/// Builds and starts the VM described by `config`.
pub fn build(config: &VmConfig) -> Result<(Running, BootTimings), Error> {
    let t_start = Instant::now();
    let plan = validate(config, crate::is_kvm_pvm_host())?;
    let mut timings = BootTimings::default();

    // The device back ends first: a bad disk path or socket is the user's
    // mistake and gets its error before any KVM work.
    let exit = Arc::new(ExitState::new());
    let devices = create_virtio_devices(config)?;

    // KVM: the VM, the in-kernel irqchip (PIC, IO-APIC, LAPICs) and PIT.
    let (kvm, vm_fd) = open_kvm()?;
    let t_mem = Instant::now();
    timings.kvm = t_mem - t_start;
    // vhost-user back ends map the memfd: they must see every byte.
    let ram = if config.fs.is_empty() {
        GuestRam::new(plan.memory_bytes)
    } else {
        GuestRam::new_shared(plan.memory_bytes)
    }
    .map_err(|e| Error::Memory(e.to_string()))?;
    let mem = ram.memory().clone();
    let slots = mmio_slots(config);
    timings.memory = t_mem.elapsed();

    // Two loads overlap: a helper thread does KVM's side (the memory slot,
    // irqchip, PIT, the irqfds and ioeventfds) and then maps the initramfs,
    // while this thread maps the kernel. Both are mapped copy-on-write from
    // images prepared once per process (boot::template), or once per host
    // with an image cache (boot::store); the first VM of a process with
    // neither pays the preparation (about 15 ms here).
    let t_load = Instant::now();
    let store = config.image_cache.as_deref();
    let (helper, kernel) = std::thread::scope(|scope| {
        let helper = scope.spawn(|| {
            let kvm_side = setup_kvm_side(&kvm, &vm_fd, &ram)?;
            let t_dev = Instant::now();
            let (serial_irq, transports) = attach_devices(&vm_fd, &mem, &devices, &slots)?;
            let devices_time = t_dev.elapsed();
            let initramfs = match &config.initramfs {
                Some(path) => Some(boot::load_initramfs(&ram, path, store).map_err(map_boot_err)?),
                None => None,
            };
            Ok::<_, Error>((kvm_side, serial_irq, transports, devices_time, initramfs))
        });
        let kernel = boot::load_kernel(&ram, &config.kernel, store).map_err(map_boot_err);
        let helper = helper
            .join()
            .unwrap_or_else(|_| Err(device_err("kvm set-up", "the set-up thread panicked")));
        (helper, kernel)
    });
    let kernel = kernel?;
    let (kvm_side, serial_irq, transports, devices_time, initramfs) = helper?;
    if let (Some(path), Some(placed)) = (&config.initramfs, initramfs) {
        boot::check_initramfs_fits(path, placed, kernel.end).map_err(map_boot_err)?;
    }
    let cmdline = boot::cmdline::build(plan.kvm_pvm, &slots, &config.cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    boot::write_boot_data(&mem, &cmdline, plan.vcpus, initramfs).map_err(map_boot_err)?;
    timings.kvm += kvm_side.kvm;
    timings.memory += kvm_side.memory;
    timings.kernel_load = t_load.elapsed();
    timings.devices = devices_time;
    let shell = Shell {
        plan,
        exit,
        kvm,
        vm_fd,
        ram,
        devices,
        transports,
        serial_irq,
    };
    let start = CpuStart::Boot {
        cpuid: kvm_side.cpuid,
        entry: kernel.entry,
    };
    let running = assemble(config, shell, start, &mut timings, t_start)?;
    Ok((running, timings))
}

/// Checks that `config` describes the machine `snap` was taken of.
fn check_restore_shape(
    config: &VmConfig,
    plan: &Plan,
    snap: &crate::snapshot::VmSnapshot,
) -> Result<(), Error> {
    use crate::snapshot::Error as S;
    let mismatch = |what, snapshot: String, config: String| {
        Err(Error::Snapshot(S::Mismatch {
            what,
            snapshot,
            config,
        }))
    };
    let read_only = |flags: Vec<bool>| format!("{flags:?}");
    let pairs = [
        (
            "memory (MiB)",
            snap.memory_mib.to_string(),
            config.memory_mib.to_string(),
        ),
        (
            "vcpus",
            snap.vcpus.len().to_string(),
            plan.vcpus.to_string(),
        ),
        (
            "host kind (kvm_pvm)",
            snap.kvm_pvm.to_string(),
            plan.kvm_pvm.to_string(),
        ),
        (
            "disks (read-only flags)",
            read_only(snap.disks.iter().map(|d| d.read_only).collect()),
            read_only(config.disks.iter().map(|d| d.read_only).collect()),
        ),
        (
            "a vsock device",
            snap.vsock_cid.is_some().to_string(),
            config.vsock.is_some().to_string(),
        ),
        (
            "a net device",
            snap.net_mac.is_some().to_string(),
            config.net.is_some().to_string(),
        ),
        // The guest knows its shares by tag.
        (
            "virtio-fs mount tags",
            format!("{:?}", snap.fs_tags),
            format!("{:?}", config.fs.iter().map(|f| &f.tag).collect::<Vec<_>>()),
        ),
        // The guest read its MAC at probe and keeps it.
        (
            "net mac address",
            snap.net_mac
                .as_ref()
                .map(net::format_mac)
                .unwrap_or_default(),
            config
                .net
                .as_ref()
                .map(|n| net::format_mac(&n.mac))
                .unwrap_or_default(),
        ),
    ];
    if let Some((what, snapshot, config)) = pairs.into_iter().find(|(_, s, c)| s != c) {
        return mismatch(what, snapshot, config);
    }
    let devices = virtio_device_count(config);
    if snap.transports.len() != devices {
        return Err(Error::Snapshot(S::Corrupt {
            what: "device list".into(),
            reason: format!("{} devices for {devices} slots", snap.transports.len()),
        }));
    }
    Ok(())
}

/// Builds a VM from the snapshot in `dir` and starts it where the snapshot
/// stopped. `config` gives the host side (console log, vsock socket, the
/// disk files, already copied from the snapshot's) and must describe the
/// same machine; its kernel and initramfs are not used.
pub fn restore(
    config: &VmConfig,
    dir: &Path,
    snap: &crate::snapshot::VmSnapshot,
) -> Result<(Running, BootTimings), Error> {
    let t_start = Instant::now();
    let mut timings = BootTimings::default();
    let mut plan = validate_shape(config, crate::is_kvm_pvm_host())?;
    plan.vcpus = plan.vcpus.min(snap.vcpus.len() as u8);
    check_restore_shape(config, &plan, snap)?;
    let exit = Arc::new(ExitState::new());
    let devices = create_virtio_devices(config)?;
    let (kvm, vm_fd) = open_kvm()?;
    let host = crate::snapshot::vcpu::host_features(
        cpu::supported_cpuid(&kvm)
            .map_err(|e| device_err("cpuid", e))?
            .as_slice(),
    );
    for state in &snap.vcpus {
        if let Some((leaf, register, bits)) =
            crate::snapshot::vcpu::missing_features(&state.cpuid, &host)
        {
            return Err(Error::Snapshot(crate::snapshot::Error::CpuFeatures {
                leaf,
                register,
                bits,
            }));
        }
    }
    timings.kvm = t_start.elapsed();
    let t_mem = Instant::now();
    let mem_path = dir.join(crate::snapshot::MEMORY_FILE);
    let mem_file = File::open(&mem_path).map_err(|source| Error::Io {
        what: format!("cannot open {}", mem_path.display()),
        source,
    })?;
    let ram = if config.fs.is_empty() {
        GuestRam::from_snapshot(mem_file, plan.memory_bytes)
    } else {
        GuestRam::from_snapshot_shared(&mem_file, plan.memory_bytes)
    }
    .map_err(|e| Error::Memory(e.to_string()))?;
    timings.memory = t_mem.elapsed();
    let kvm_side = setup_kvm_side(&kvm, &vm_fd, &ram)?;
    timings.kvm += kvm_side.kvm;
    timings.memory += kvm_side.memory;
    let t_dev = Instant::now();
    let slots = mmio_slots(config);
    let (serial_irq, transports) = attach_devices(&vm_fd, ram.memory(), &devices, &slots)?;
    timings.devices = t_dev.elapsed();
    let shell = Shell {
        plan,
        exit,
        kvm,
        vm_fd,
        ram,
        devices,
        transports,
        serial_irq,
    };
    let running = assemble(
        config,
        shell,
        CpuStart::Restore(snap),
        &mut timings,
        t_start,
    )?;
    Ok((running, timings))
}

/// The part boot and restore share: serial, i8042 and the virtio-mmio
/// transports on their buses, the event loop, the vCPUs, then the threads.
fn assemble(
    config: &VmConfig,
    shell: Shell,
    start: CpuStart<'_>,
    timings: &mut BootTimings,
    t_start: Instant,
) -> Result<Running, Error> {
    let Shell {
        plan,
        exit,
        kvm,
        vm_fd,
        ram,
        devices,
        transports,
        serial_irq,
    } = shell;
    let mut t = Instant::now();
    let restoring = match &start {
        CpuStart::Restore(snap) => Some(*snap),
        CpuStart::Boot { .. } => None,
    };

    // Devices: COM1 on its irqfd, the i8042, the virtio-mmio transports.
    let console = match &config.console_log {
        Some(path) => Some(open_console_log(path)?),
        None => None,
    };
    let log = ConsoleLog::new(console, exit.clone());
    let serial = match restoring {
        Some(snap) => SerialDevice::restore(serial_irq, log, &snap.serial).map_err(|e| {
            Error::Snapshot(crate::snapshot::Error::Corrupt {
                what: "serial state".into(),
                reason: e,
            })
        })?,
        None => SerialDevice::new(serial_irq, log),
    };
    let serial = Arc::new(Mutex::new(serial));
    let mut pio = Bus::new();
    let bus_err = |e| device_err("bus", e);
    pio.insert(serial.clone(), serial::COM1_BASE, serial::COM1_LEN)
        .map_err(bus_err)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        i8042::PORT_BASE,
        i8042::PORT_LEN,
    )
    .map_err(bus_err)?;

    let mut event_loop = EventLoop::new().map_err(|e| device_err("event loop", e))?;
    let mut mmio = Bus::new();
    let mut shared_transports = Vec::with_capacity(transports.len());
    for (i, (mut transport, slot)) in transports.into_iter().enumerate() {
        if let Some(snap) = restoring {
            transport
                .restore_state(&snap.transports[i])
                .map_err(|e| device_err(&devices[i].name, e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), slot.base, slot.size)
            .map_err(bus_err)?;
        shared_transports.push(transport);
    }
    let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
    for dev in devices {
        event_loop.add(dev.subscriber);
    }
    let buses = Arc::new(Buses { pio, mmio });
    timings.devices += t.elapsed();
    t = Instant::now();

    // vCPUs.
    let msrs = crate::snapshot::vcpu::msr_list(&kvm)?;
    let pause = Arc::new(PauseControl::new(plan.vcpus as usize, msrs));
    let mut vcpu_fds = Vec::with_capacity(plan.vcpus as usize);
    for id in 0..plan.vcpus {
        let fd = vm_fd
            .create_vcpu(id as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        match &start {
            CpuStart::Boot { cpuid, entry } => {
                cpu::configure(&fd, id, plan.vcpus, cpuid, *entry, plan.kvm_pvm)
                    .map_err(|e| device_err("vcpu", e))?
            }
            CpuStart::Restore(snap) => {
                crate::snapshot::vcpu::restore(&fd, &snap.vcpus[id as usize])?
            }
        }
        vcpu_fds.push(fd);
    }
    if let Some(snap) = restoring {
        // Only now: an interrupt injected before the LAPICs were restored
        // would be lost with their old state. The VM-wide state re-arms
        // the PIT, so it too comes after them (`snapshot::vm_state`).
        crate::snapshot::vm_state::restore(&vm_fd, &snap.vm)?;
        for (t, dev) in shared_transports.iter().zip(&names) {
            crate::devices::bus::lock(t)
                .raise_restored_interrupt()
                .map_err(|e| device_err(dev, e))?;
        }
    }
    vcpu::install_kick_handler().map_err(kvm_err("sigaction"))?;
    timings.vcpus = t.elapsed();
    t = Instant::now();

    // Threads, each under its seccomp filter. From here on, a failure must
    // stop what already runs.
    let spawner = Spawner::new().map_err(|source| Error::Io {
        what: "cannot start the thread spawner".into(),
        source,
    })?;
    // Every thread is started before any filter is waited for: their
    // starts overlap, on other cores, instead of adding up.
    let (event_loop, loop_filter) = event_loop
        .spawn_pending(&spawner)
        .map_err(|e| device_err("event loop", e))?;
    let mut filters = vec![("event loop".to_string(), loop_filter)];
    let vm_fd = Arc::new(vm_fd);
    // Not on a restore: the guest (which has no LAPIC timer on kvm_pvm,
    // `noapictimer`) already runs its PIT one-shot, and KVM drops the ack
    // notifier ~12 ms before it stops gating injection on acks, so a tick
    // acked in that window leaves the next one never injected: the guest's
    // timers stopped for good, once in some 50 restores. In one-shot mode
    // there is no backlog of ticks to replay, so reinjection is harmless.
    // (The same symptom had a second cause, found later: the PIT restored
    // before the LAPICs, `snapshot::vm_state`.)
    let mut pit_filter = None;
    let pit_tuning = if plan.kvm_pvm && restoring.is_none() {
        let fd = vm_fd.clone();
        let spawned = spawner.spawn_pending("smol-pit", Profile::PitTuning, move || {
            disable_pit_reinjection(&fd)
        });
        match spawned {
            // Its filter is confirmed with the others'; a failure there
            // ends this thread only, as a failed start does.
            Ok(pending) => {
                pit_filter = Some(pending.filter);
                Some(pending.thread)
            }
            // Only the catch-up of lost ticks stays on: slower, not wrong.
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the pit tuning thread");
                None
            }
        }
    } else {
        None
    };
    let mut running = Running {
        exit: exit.clone(),
        plan,
        vcpu_threads: Vec::new(),
        event_loop: Some(event_loop),
        pit_tuning,
        spawner,
        pause: pause.clone(),
        transports: shared_transports,
        serial,
        _buses: buses.clone(),
        vm_fd,
        ram,
        _kvm: kvm,
    };
    let (first_tx, first_rx) = mpsc::channel();
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let vcpu = Vcpu {
            id: id as u8,
            fd,
            buses: buses.clone(),
            exit: exit.clone(),
            pause: pause.clone(),
            first_run: (id == 0).then(|| first_tx.clone()),
        };
        let name = format!("smol-vcpu{id}");
        let spawned = running
            .spawner
            .spawn_pending(&name, Profile::Vcpu, move || vcpu.run());
        match spawned {
            Ok(pending) => {
                use std::os::unix::thread::JoinHandleExt;
                exit.add_vcpu_thread(pending.thread.as_pthread_t());
                running.vcpu_threads.push(pending.thread);
                filters.push((name, pending.filter));
            }
            Err(source) => {
                running.stop();
                return Err(Error::Io {
                    what: format!("cannot start vcpu thread {id}"),
                    source,
                });
            }
        }
    }
    drop(first_tx);
    for (name, filter) in filters {
        if let Err(source) = filter.wait() {
            running.stop();
            return Err(Error::Io {
                what: format!("cannot start the {name} thread under its seccomp filter"),
                source,
            });
        }
    }
    if let Some(filter) = pit_filter {
        if let Err(e) = filter.wait() {
            tracing::warn!(error = %e, "the pit tuning thread did not start");
        }
    }
    match first_rx.recv_timeout(FIRST_RUN_TIMEOUT) {
        Ok(at) => {
            timings.first_run = at.saturating_duration_since(t);
            timings.total = at.saturating_duration_since(t_start);
        }
        Err(_) => {
            // The boot vCPU ended before its first run, or is stuck.
            let reason = running.stop();
            return Err(device_err(
                "vcpu",
                format!("boot vcpu never ran: {reason:?}"),
            ));
        }
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskConfig, VsockConfig};
    use std::path::PathBuf;

    fn config(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initramfs: None,
            image_cache: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            console_log: None,
            vsock: None,
            disks: Vec::new(),
            net: None,
            fs: Vec::new(),
        }
    }

    fn some_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().unwrap()
    }

    #[test]
    fn zero_vcpus() {
        let k = some_file();
        let mut c = config(k.path().into());
        c.vcpus = 0;
        assert!(matches!(validate(&c, false), Err(Error::ZeroVcpus)));
        c.vcpus = 255;
        assert!(matches!(
            validate(&c, false),
            Err(Error::TooManyVcpus { vcpus: 255, .. })
        ));
    }

    #[test]
    fn memory_bounds() {
        let k = some_file();
        let mut c = config(k.path().into());
        c.memory_mib = MIN_MEMORY_MIB - 1;
        let err = validate(&c, false).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MemoryTooSmall {
                    mib: 63,
                    min_mib: 64
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "guest memory of 63 MiB is below the 64 MiB needed to boot"
        );
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(matches!(
            validate(&c, false),
            Err(Error::MemoryTooLarge { .. })
        ));
        c.memory_mib = MIN_MEMORY_MIB;
        assert_eq!(validate(&c, false).unwrap().memory_bytes, 64 << 20);
    }

    #[test]
    fn missing_files() {
        let c = config("/nonexistent/vmlinux".into());
        assert!(matches!(
            validate(&c, false),
            Err(Error::KernelNotFound { .. })
        ));
        let k = some_file();
        let mut c = config(k.path().into());
        c.initramfs = Some("/nonexistent/initramfs.cpio".into());
        assert!(matches!(
            validate(&c, false),
            Err(Error::InitramfsNotFound { .. })
        ));
        // A directory is not a kernel.
        let c = config(std::env::temp_dir());
        assert!(matches!(
            validate(&c, false),
            Err(Error::KernelNotFound { .. })
        ));
    }

    #[test]
    fn kvm_pvm_clamps_vcpus() {
        let k = some_file();
        let mut c = config(k.path().into());
        c.vcpus = 4;
        assert_eq!(validate(&c, true).unwrap().vcpus, 1);
        assert_eq!(validate(&c, false).unwrap().vcpus, 4);
    }

    #[test]
    fn vsock_cid_and_device_count() {
        let k = some_file();
        let mut c = config(k.path().into());
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/tmp/x.sock".into(),
        });
        assert!(matches!(validate(&c, false), Err(Error::Device { .. })));
        c.vsock = None;
        c.disks = vec![
            DiskConfig {
                path: "/tmp/d".into(),
                read_only: false,
                id: "d".into(),
            };
            MAX_VIRTIO_DEVICES + 1
        ];
        assert!(matches!(validate(&c, false), Err(Error::Device { .. })));
    }

    #[test]
    fn slots_are_disks_then_vsock() {
        let mut c = config("/k".into());
        c.disks = vec![
            DiskConfig {
                path: "/tmp/d".into(),
                read_only: false,
                id: "d".into(),
            };
            2
        ];
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/x.sock".into(),
        });
        let slots = mmio_slots(&c);
        assert_eq!(slots.len(), 3);
        assert_eq!(
            slots[0],
            MmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5
            }
        );
        assert_eq!(
            slots[2],
            MmioSlot {
                base: 0xd000_2000,
                size: 0x1000,
                irq: 7
            }
        );
    }
    fn net_config(mac: [u8; 6]) -> crate::NetConfig {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        crate::NetConfig {
            mac,
            ..crate::NetConfig::new(ours.into())
        }
    }

    #[test]
    fn net_comes_last_and_counts_as_a_device() {
        let mut c = config("/k".into());
        c.disks = vec![
            DiskConfig {
                path: "/tmp/d".into(),
                read_only: false,
                id: "d".into(),
            };
            MAX_VIRTIO_DEVICES - 1
        ];
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: "/tmp/x.sock".into(),
        });
        let without = mmio_slots(&c);
        c.net = Some(net_config(crate::NetConfig::DEFAULT_MAC));
        let with = mmio_slots(&c);
        assert_eq!(with.len(), MAX_VIRTIO_DEVICES + 1);
        assert_eq!(
            &with[..without.len()],
            &without[..],
            "the others keep their slots"
        );
        assert!(matches!(
            validate_shape(&c, false),
            Err(Error::Device { .. })
        ));
        c.disks.pop();
        assert!(validate_shape(&c, false).is_ok());
    }

    #[test]
    fn net_mac_must_be_unicast() {
        let mut c = config("/k".into());
        c.net = Some(net_config([0xff; 6]));
        let err = validate_shape(&c, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device virtio-net: mac address ff:ff:ff:ff:ff:ff is not a unicast address"
        );
        c.net = Some(net_config([0; 6]));
        assert!(matches!(
            validate_shape(&c, false),
            Err(Error::Device { .. })
        ));
    }

    /// The plan of [`bare_snapshot`]'s machine.
    fn bare_plan() -> Plan {
        Plan {
            vcpus: 1,
            kvm_pvm: false,
            memory_bytes: 128 << 20,
        }
    }

    /// The smallest snapshot `check_restore_shape` can look at: one vCPU,
    /// no devices.
    fn bare_snapshot() -> crate::snapshot::VmSnapshot {
        use crate::snapshot::{vcpu::VcpuState, vm_state::VmState, VmSnapshot, FORMAT_VERSION};
        VmSnapshot {
            version: FORMAT_VERSION,
            memory_mib: 128,
            kvm_pvm: false,
            vcpus: vec![VcpuState {
                cpuid: Vec::new(),
                mp_state: Default::default(),
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: None,
                debug_regs: Default::default(),
                lapic: Default::default(),
                msrs: Vec::new(),
                vcpu_events: Default::default(),
            }],
            vm: VmState {
                pit: Default::default(),
                clock: Default::default(),
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
            },
            serial: crate::devices::serial::SerialSnapshot {
                baud_divisor_low: 0,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 0,
                line_control: 0,
                line_status: 0,
                modem_control: 0,
                modem_status: 0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            transports: Vec::new(),
            disks: Vec::new(),
            vsock_cid: None,
            net_mac: None,
            fs_tags: Vec::new(),
        }
    }

    #[test]
    fn fs_tags_are_checked_and_fs_devices_come_last() {
        let mut c = config("/k".into());
        c.net = Some(net_config(crate::NetConfig::DEFAULT_MAC));
        c.fs = vec![
            crate::FsConfig::new("a", "/s0"),
            crate::FsConfig::new("b", "/s1"),
        ];
        assert_eq!(validate_shape(&c, false).unwrap().vcpus, 1);
        let slots = mmio_slots(&c);
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[2].irq, VIRTIO_FIRST_IRQ + 2);
        for (tags, bad) in [
            (vec!["", "b"], "\"\""),
            (vec!["a", &"x".repeat(37)], "xxxx"),
            (vec!["a\0b"], "a\\0b"),
            (vec!["a", "a"], "used twice"),
        ] {
            c.fs = tags
                .iter()
                .map(|t| crate::FsConfig::new(*t, "/s"))
                .collect();
            let err = validate_shape(&c, false).unwrap_err().to_string();
            assert!(err.contains("virtio-fs") && err.contains(bad), "{err}");
        }
        c.fs = vec![crate::FsConfig::new("x".repeat(36), "/s")];
        validate_shape(&c, false).unwrap();
    }

    #[test]
    fn restore_names_an_fs_tag_mismatch() {
        use crate::snapshot::Error as S;
        let plan = bare_plan();
        let mut c = config("/k".into());
        let mut snap = bare_snapshot();
        snap.fs_tags = vec!["smol0".into()];
        let err = check_restore_shape(&c, &plan, &snap).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Snapshot(S::Mismatch {
                    what: "virtio-fs mount tags",
                    ..
                })
            ),
            "{err}"
        );
        c.fs = vec![crate::FsConfig::new("smol0", "/new.sock")];
        // Tags match; the one device has no saved transport here.
        let err = check_restore_shape(&c, &plan, &snap).unwrap_err();
        assert!(matches!(err, Error::Snapshot(S::Corrupt { .. })), "{err}");
        // Older snapshots carry no tags: no virtio-fs device.
        let mut json = serde_json::to_value(bare_snapshot()).unwrap();
        json.as_object_mut().unwrap().remove("fs_tags");
        let back: crate::snapshot::VmSnapshot = serde_json::from_value(json).unwrap();
        assert!(back.fs_tags.is_empty());
    }

    #[test]
    fn restore_names_a_net_device_mismatch() {
        use crate::snapshot::Error as S;
        let plan = bare_plan();
        let mut c = config("/k".into());
        let mut snap = bare_snapshot();
        check_restore_shape(&c, &plan, &snap).unwrap();

        c.net = Some(net_config(crate::NetConfig::DEFAULT_MAC));
        let err = check_restore_shape(&c, &plan, &snap).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Snapshot(S::Mismatch {
                    what: "a net device",
                    ..
                })
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "the snapshot has a net device false, the vm config asks for true"
        );

        snap.net_mac = Some([0x02, 0, 0, 0, 0, 9]);
        let err = check_restore_shape(&c, &plan, &snap).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Snapshot(S::Mismatch {
                    what: "net mac address",
                    ..
                })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("02:00:00:00:00:09"), "{err}");

        c.net = None;
        let err = check_restore_shape(&c, &plan, &snap).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Snapshot(S::Mismatch {
                    what: "a net device",
                    ..
                })
            ),
            "{err}"
        );

        // Same device, same MAC: only the device list must match now.
        c.net = Some(net_config([0x02, 0, 0, 0, 0, 9]));
        let err = check_restore_shape(&c, &plan, &snap).unwrap_err();
        assert!(
            matches!(err, Error::Snapshot(S::Corrupt { .. })),
            "one slot, no saved transport: {err}"
        );
    }

    /// A snapshot of a monitor without virtio-net has no `net_mac`: it
    /// still loads, as a VM without one.
    #[test]
    fn older_snapshots_have_no_net_device() {
        let snap = bare_snapshot();
        let mut json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("net_mac");
        let back: crate::snapshot::VmSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back.net_mac, None);
    }
}
