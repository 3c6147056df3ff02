//! virtio devices and the virtio-mmio transport that carries them.
//!
//! The contract between the transport (`mmio.rs`) and a device (`blk/`,
//! `vsock/`, `net/`) is [`VirtioDevice`]. A device is shared as
//! `Arc<Mutex<D>>` between the transport, which runs on vCPU threads, and the
//! event-loop thread, where the device is also registered as an
//! `event_manager::MutEventSubscriber`. `activate` is called on a vCPU thread
//! and must not block: it stores the queues and wakes the device's subscriber
//! (for instance by writing an activation `EventFd`), which then registers
//! the queue notification fds with the event loop.
//!
//! A device that finds the driver broke the protocol in a way it cannot
//! recover from calls [`Interrupt::signal_needs_reset`] and stops using its
//! queues; the transport shows DEVICE_NEEDS_RESET in the Status register
//! until the driver resets the device.

pub mod blk;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

// The device tests' driver, also for the fuzz targets (`crate::fuzzing`).
#[cfg(any(test, fuzzing))]
pub(crate) mod test_queue;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// virtio device ids (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// VIRTIO_F_VERSION_1: every device offers it; the transport is modern only.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// The interrupt line of one virtio-mmio device: the InterruptStatus
/// register shared with the transport, the irqfd that raises the GSI, and
/// whether the device needs a reset (DEVICE_NEEDS_RESET, virtio 1.2 2.1).
///
/// The needs-reset flag lives here rather than in the transport because a
/// device finds its errors on its own threads, where it holds this and not
/// the transport; the transport reads it into the Status register.
#[derive(Clone, Debug)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irq_evt: Arc<EventFd>,
    needs_reset: Arc<AtomicBool>,
}

impl Interrupt {
    pub fn new(irq_evt: EventFd) -> Self {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            irq_evt: Arc::new(irq_evt),
            needs_reset: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Tells the driver that a used ring has new entries; nothing once the
    /// device needs a reset (a request finishing after the failure): its
    /// queues are dead to the driver until it resets the device, and the
    /// configuration interrupt of the failure was the last word.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        if self.needs_reset() {
            return Ok(());
        }
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The device hit an error only a reset recovers from: from now until
    /// the driver resets it, the Status register shows DEVICE_NEEDS_RESET,
    /// and the driver gets a configuration-change interrupt (what virtio
    /// 1.2, 2.1.2 asks of a device that sets it). Only the first call
    /// raises the interrupt: the driver was told once it is set.
    pub fn signal_needs_reset(&self) -> io::Result<()> {
        // Set before the interrupt, so the driver's handler reads it.
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.signal_config_change()
    }

    /// Whether the device needs a reset: a device uses no queue while it
    /// does, so that a restore or a late kick does not start it again.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The device was reset: no interrupt pending and no reset needed.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Sets the used-ring bit without raising the line: for a restore,
    /// which raises it once the vCPUs' interrupt state is in place.
    pub fn mark_used_queue(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
    }

    /// Sets the configuration-change bit without raising the line: for a
    /// restore, like [`Interrupt::mark_used_queue`].
    pub fn mark_config_change(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
    }

    /// Raises the line if the status has bits set (after a restore).
    pub fn raise_if_pending(&self) -> io::Result<()> {
        if self.status() != 0 {
            self.irq_evt.write(1)?;
        }
        Ok(())
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The InterruptStatus register, as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the InterruptStatus register and the needs-reset flag without
    /// raising the line (restoring a snapshot; see `raise_if_pending`).
    pub fn restore(&self, bits: u32, needs_reset: bool) {
        self.status.store(bits, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// InterruptACK: the driver clears the bits it has handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd, for registration with KVM.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// A queue the driver has set up, with the fd that KVM signals (through an
/// ioeventfd on QueueNotify) when the driver kicks it.
#[derive(Debug)]
pub struct ActivatedQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("device cannot activate: {0}")]
    Backend(String),
    #[error("cannot wake the device's event loop")]
    Wake(#[source] io::Error),
}

/// A virtio device behind the virtio-mmio transport.
/// A guest read of `data.len()` bytes at `offset` of a device's config
/// space `config`: copied when wholly inside it, else left as it is (the
/// transport zeroes it), never a panic on a guest's offset.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = start
        .checked_add(data.len())
        .and_then(|end| config.get(start..end))
    {
        data.copy_from_slice(src);
    }
}

pub trait VirtioDevice: Send {
    /// The virtio device id (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space. Out-of-range reads
    /// leave `data` untouched.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; out-of-range writes
    /// are ignored. By default nothing is writable (none of our devices
    /// offers a feature that makes a field writable: no CONFIG_WCE, no
    /// writable MAC) and the write is dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            device_type = self.device_type(),
            offset,
            len = data.len(),
            "ignoring a config write"
        );
    }
    /// The driver set DRIVER_OK. Runs on a vCPU thread: store what is given
    /// and wake the event-loop side; never block.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// The driver wrote 0 to Status. Returns true when the device dropped its
    /// queues and can be activated again.
    fn reset(&mut self) -> bool {
        false
    }
    /// Whether `activate` succeeded and no reset followed.
    fn is_activated(&self) -> bool;
    /// For a snapshot, with every vCPU parked: finishes the requests the
    /// device holds and returns its queues as it sees them (indices
    /// included), or `None` when it is not activated. The device goes on
    /// running afterwards, unless its host side can fill guest buffers on
    /// its own (virtio-net): such a device leaves its queues as saved until
    /// [`VirtioDevice::resume`], so that guest memory, copied after this,
    /// matches the saved indices.
    fn quiesce_queues(&mut self) -> Option<Vec<QueueState>>;
    /// The snapshot that called [`VirtioDevice::quiesce_queues`] is done
    /// (or failed) and the vCPUs run again: the device may use its queues.
    fn resume(&mut self) {}
    /// What the device keeps beyond its queues, for a snapshot.
    fn save_device(&self) -> DeviceState {
        DeviceState::None
    }
    /// Called once after a restore activated the device from saved queues,
    /// before any vCPU runs, with what [`VirtioDevice::save_device`] gave:
    /// for what the guest must be told (the vsock transport reset). It must
    /// not raise the interrupt: restoring the LAPICs afterwards would drop
    /// it (or leave a level-triggered pin waiting for an EOI forever); mark
    /// it with [`Interrupt::mark_used_queue`] and the restore raises it.
    fn restored(&mut self, _state: &DeviceState) {}
}

/// Device-specific state in a snapshot, beside the queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    /// Nothing beyond the queues (virtio-blk: the disk is copied apart).
    #[default]
    None,
    /// virtio-vsock: where host connections' local ports go on.
    Vsock { next_local_port: u32 },
    /// virtio-net: the MAC the driver read, and the link status it was
    /// last told (the back end itself is not saved: a restore gets a new
    /// one).
    Net { mac: [u8; 6], link_up: bool },
}

/// A queue's state in a snapshot (virtio-queue's `QueueState`, which has
/// no serde). Untrusted when read back: `Queue::try_from` validates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After DEVICE_NEEDS_RESET a late used buffer raises no interrupt;
    /// after the reset they do again.
    #[test]
    fn no_used_interrupt_once_the_device_needs_a_reset() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let line = Interrupt::new(irq.try_clone().unwrap());
        line.signal_used_queue().unwrap();
        assert_eq!(line.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        line.ack(VIRTIO_MMIO_INT_VRING);
        line.signal_needs_reset().unwrap();
        assert_eq!(line.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1);
        line.signal_used_queue().unwrap();
        assert_eq!(line.status(), VIRTIO_MMIO_INT_CONFIG, "no vring bit");
        assert!(irq.read().is_err(), "no interrupt raised");
        line.reset();
        line.signal_used_queue().unwrap();
        assert_eq!(line.status(), VIRTIO_MMIO_INT_VRING);
    }
}
