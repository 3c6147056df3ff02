//! The virtio-mmio transport, modern layout only (version 2, virtio 1.2
//! section 4.2.2).
//!
//! One transport per device: a 4 KiB register window on the MMIO bus, one
//! ioeventfd per queue on QueueNotify (datamatch = the queue index, so a kick
//! never leaves the kernel) and one irqfd for the interrupt line. The driver
//! negotiates features and sets the queues up through registers; DRIVER_OK
//! hands the queues to the device ([`VirtioDevice::activate`]), a status of
//! 0 resets it. DEVICE_NEEDS_RESET is not the driver's to write: it reads
//! back while the [`Interrupt`]'s needs-reset flag is set (by a failed
//! activation, or by the device itself) and a reset clears it.
//!
//! Every register access is guest controlled: unknown offsets, odd sizes and
//! out-of-order writes are ignored (logged at debug), never a panic.

use std::io;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivatedQueue, DeviceState, GuestMemory, Interrupt, QueueSnapshot, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::devices::bus::{lock, BusDevice};

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
pub const VERSION: u32 = 2;
/// "SMOL".
pub const VENDOR_ID: u32 = 0x4c4f_4d53;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_SEL: u64 = 0x0ac;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 0x01;
pub const STATUS_DRIVER: u32 = 0x02;
pub const STATUS_DRIVER_OK: u32 = 0x04;
pub const STATUS_FEATURES_OK: u32 = 0x08;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// VIRTIO_RING_F_EVENT_IDX: the transport turns it on in the queues.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Errors of transport set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device has no queues")]
    NoQueues,
    #[error("queue {index}: maximum size {size} is not a power of two in 1..=32768")]
    BadQueueSize { index: usize, size: u16 },
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot register the ioeventfd of queue {0}")]
    IoEvent(usize, #[source] kvm_ioctls::Error),
    #[error("cannot register the irqfd on gsi {0}")]
    IrqFd(u32, #[source] kvm_ioctls::Error),
    #[error("{0} notify fds for {1} queues")]
    NotifyCount(usize, usize),
    #[error("cannot restore the device state: {0}")]
    Restore(String),
}

/// A transport and its device in a snapshot: the registers as the driver
/// set them and, when the device was running, its own queue indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    /// The Status register as the driver reads it: DEVICE_NEEDS_RESET in
    /// it is the device's needs-reset flag, so a stopped device stays
    /// stopped after a restore (and a state of an older monitor, which had
    /// the bit only after a failed activation, means the same).
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// The queue registers (addresses, size, ready).
    pub queues: Vec<QueueSnapshot>,
    /// The device's queues, with the indices it had reached.
    pub device_queues: Option<Vec<QueueSnapshot>>,
    /// What the device keeps beyond its queues.
    #[serde(default)]
    pub device: DeviceState,
}

/// One device's virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    avail_features: u64,
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device` whose queue kicks arrive on `notify` (one
    /// eventfd per queue) and whose interrupt is `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Interrupt,
        notify: Vec<EventFd>,
    ) -> Result<Self, Error> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() {
            return Err(Error::NoQueues);
        }
        if avail_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::NotModern);
        }
        if notify.len() != max_sizes.len() {
            return Err(Error::NotifyCount(notify.len(), max_sizes.len()));
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| Queue::new(size).map_err(|_| Error::BadQueueSize { index, size }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            device_type,
            avail_features,
            mem,
            interrupt,
            queues,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// Creates the eventfds, registers them with KVM (an ioeventfd per queue
    /// at `base` + QueueNotify, an irqfd on `gsi`) and builds the transport.
    pub fn attach(
        vm: &VmFd,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        base: u64,
        gsi: u32,
    ) -> Result<Self, Error> {
        let queue_count = lock(&device).queue_max_sizes().len();
        let mut notify = Vec::with_capacity(queue_count);
        for index in 0..queue_count {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                index as u32,
            )
            .map_err(|e| Error::IoEvent(index, e))?;
            notify.push(evt);
        }
        let irq = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|e| Error::IrqFd(gsi, e))?;
        Self::new(device, mem, Interrupt::new(irq), notify)
    }

    /// The device's interrupt line.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device status register, as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Saves the registers and the device's queues; the device finishes
    /// the requests it holds first (see [`VirtioDevice::quiesce_queues`]).
    /// Every vCPU must be parked.
    pub fn save_state(&mut self) -> TransportState {
        let mut device = lock(&self.device);
        let device_queues = if self.status & STATUS_DRIVER_OK != 0 {
            device
                .quiesce_queues()
                .map(|qs| qs.into_iter().map(QueueSnapshot::from).collect())
        } else {
            None
        };
        let device_state = device.save_device();
        drop(device);
        TransportState {
            device_type: self.device_type,
            status: self.status(),
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device_queues,
            device: device_state,
        }
    }

    /// Brings a fresh transport (and its device) to `state`, activating the
    /// device from its saved queues if it was running. Before any vCPU runs.
    /// The state is untrusted: every queue is validated as at activation.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), Error> {
        let fail = |r: String| Error::Restore(r);
        if state.device_type != self.device_type {
            return Err(fail(format!(
                "saved device type {} where the vm has type {}",
                state.device_type, self.device_type
            )));
        }
        if state.driver_features & !self.avail_features != 0 {
            return Err(fail(format!(
                "saved features {:#x} beyond the device's {:#x}",
                state.driver_features, self.avail_features
            )));
        }
        let queue = |i: usize, q: &QueueSnapshot| {
            let max = self.queues.get(i).map(|q| q.max_size());
            if max != Some(q.max_size) {
                return Err(fail(format!(
                    "queue {i}: saved maximum size {}",
                    q.max_size
                )));
            }
            Queue::try_from(QueueState::from(*q)).map_err(|e| fail(format!("queue {i}: {e}")))
        };
        if state.queues.len() != self.queues.len() {
            return Err(fail(format!(
                "{} saved queues, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let registers = state
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| queue(i, q))
            .collect::<Result<Vec<_>, _>>()?;
        let running = state.status & STATUS_DRIVER_OK != 0;
        let device_queues = match (&state.device_queues, running) {
            (Some(qs), true) if qs.len() == self.queues.len() => Some(
                qs.iter()
                    .enumerate()
                    .map(|(i, q)| {
                        let q = queue(i, q)?;
                        if q.ready() && !q.is_valid(&self.mem) {
                            return Err(fail(format!("queue {i} is not valid in guest memory")));
                        }
                        Ok(q)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            (None, false) => None,
            _ => return Err(fail("device queues do not match the device status".into())),
        };
        self.queues = registers;
        // The bit goes back to the flag, which the device reads too: set
        // before `activate` below, so it never uses its restored queues.
        self.status = state.status & !STATUS_DEVICE_NEEDS_RESET;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.restore(
            state.interrupt_status,
            state.status & STATUS_DEVICE_NEEDS_RESET != 0,
        );
        let mut device = lock(&self.device);
        if state.status & STATUS_FEATURES_OK != 0 {
            device.set_acked_features(state.driver_features);
        }
        if let Some(queues) = device_queues {
            let mut activated = Vec::with_capacity(queues.len());
            for (queue, notify) in queues.into_iter().zip(&self.notify) {
                let notify = notify
                    .try_clone()
                    .map_err(|e| fail(format!("cannot clone the notify fd: {e}")))?;
                activated.push(ActivatedQueue { queue, notify });
            }
            device
                .activate(self.mem.clone(), self.interrupt.clone(), activated)
                .map_err(|e| fail(e.to_string()))?;
            device.restored(&state.device);
        }
        Ok(())
    }

    /// After a snapshot (taken or failed): lets the device use its queues
    /// again (see [`VirtioDevice::resume`]).
    pub fn resume_device(&self) {
        lock(&self.device).resume();
    }

    /// After a restore, once the vCPUs' LAPICs are restored: raises the
    /// interrupt the saved or restored status holds.
    pub fn raise_restored_interrupt(&self) -> io::Result<()> {
        self.interrupt.raise_if_pending()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready() as u32),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            // No shared memory regions: length and base read as all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    offset,
                    "virtio-mmio read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let activated = self.status & STATUS_DRIVER_OK != 0;
        let features_done = self.status & STATUS_FEATURES_OK != 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if !features_done => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value as u64,
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | ((value as u64) << 32)
                }
                _ => tracing::debug!(
                    sel = self.driver_features_sel,
                    "driver features beyond 64 bits"
                ),
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => {
                // Normally absorbed by the ioeventfd; forward it if it lands here.
                if let Some(evt) = self.notify.get(value as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::debug!(error = %e, "queue notify");
                    }
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if !activated =>
            {
                let Some(q) = self.selected_queue() else {
                    tracing::debug!(offset, "virtio-mmio queue register with no queue selected");
                    return;
                };
                match offset {
                    REG_QUEUE_NUM => q.set_size(value.min(u16::MAX as u32) as u16),
                    REG_QUEUE_READY => q.set_ready(value == 1),
                    REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                    REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                    REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                    _ => q.set_used_ring_address(None, Some(value)),
                }
            }
            REG_SHM_SEL => {}
            _ => tracing::debug!(offset, value, "virtio-mmio write ignored"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Linux writes back what it read plus one bit, so DEVICE_NEEDS_RESET
        // comes along; it stays the device's (the flag), never the driver's.
        let mut value = value & !STATUS_DEVICE_NEEDS_RESET;
        // The driver only ever adds bits; anything else is ignored.
        if value & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = value,
                "virtio-mmio status cleared bits without reset"
            );
            return;
        }
        let newly = value & !self.status;

        if newly & STATUS_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.avail_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                // Leaving FEATURES_OK clear tells the driver we refuse.
                tracing::debug!(features = self.driver_features, "driver features refused");
                value &= !STATUS_FEATURES_OK;
            } else {
                lock(&self.device).set_acked_features(self.driver_features);
            }
        }

        if newly & STATUS_DRIVER_OK != 0 {
            if value & STATUS_FEATURES_OK == 0 {
                tracing::debug!("driver ok before features ok");
                return;
            }
            if self.interrupt.needs_reset() {
                // A failed activation is only retried after a reset.
                tracing::debug!("driver ok while the device needs a reset");
                return;
            }
            tracing::debug!(
                device_type = self.device_type,
                features = self.driver_features,
                "virtio device activating"
            );
            if let Err(reason) = self.activate() {
                tracing::warn!(device_type = self.device_type, %reason, "virtio device activation failed");
                self.status = value & !STATUS_DRIVER_OK;
                if let Err(e) = self.interrupt.signal_needs_reset() {
                    tracing::warn!(error = %e, "cannot interrupt the driver");
                }
                return;
            }
        }
        self.status = value;
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut activated = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!("queue {index} is not valid in guest memory"));
            }
            q.set_event_idx(event_idx);
            let notify = self.notify[index]
                .try_clone()
                .map_err(|e| format!("cannot clone the notify fd: {e}"))?;
            // The device gets its own copy; the transport keeps the
            // registers' view for reads and for the next reset.
            let queue = Queue::try_from(q.state())
                .map_err(|e| format!("queue {index} cannot be handed over: {e}"))?;
            activated.push(ActivatedQueue { queue, notify });
        }
        let mut device = lock(&self.device);
        if device.is_activated() {
            return Err("device is still active from before a reset it refused".into());
        }
        device
            .activate(self.mem.clone(), self.interrupt.clone(), activated)
            .map_err(|e| e.to_string())
    }

    fn reset(&mut self) {
        tracing::debug!(
            device_type = self.device_type,
            status = self.status,
            "virtio device reset"
        );
        if self.status & STATUS_DRIVER_OK != 0 {
            let mut device = lock(&self.device);
            if !device.reset() {
                tracing::debug!(
                    device_type = self.device_type,
                    "device cannot be reset; it stays unusable until the vm restarts"
                );
            }
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        // After the device's own reset, which dropped its queues: it cannot
        // set the flag again behind us. (One that refused the reset has
        // its next activation fail, which sets the flag anew.)
        self.interrupt.reset();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            data.fill(0);
            lock(&self.device).read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio read with bad size or alignment"
            );
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            lock(&self.device).write_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio write with bad size or alignment"
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{
        ActivateError, TYPE_BLOCK, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
    };
    use vm_memory::GuestAddress;

    /// What a device saw of one queue at activation: desc, avail, used,
    /// size, ready, event idx.
    type QueueSeen = (u64, u64, u64, u16, bool, bool);

    /// A device that records what the transport tells it: the transport's
    /// contract, observed from the device side.
    #[derive(Default)]
    struct Probe {
        acked: u64,
        config: [u8; 8],
        activated: Option<Vec<QueueSeen>>,
        /// The queues and the line it was given, to report from.
        queues: Vec<QueueState>,
        interrupt: Option<Interrupt>,
        refuse: bool,
        resets: usize,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 128]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let off = offset as usize;
            if let Some(src) = self.config.get(off..off.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let off = offset as usize;
            if let Some(dst) = self.config.get_mut(off..off.saturating_add(data.len())) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            interrupt: Interrupt,
            queues: Vec<ActivatedQueue>,
        ) -> Result<(), ActivateError> {
            if self.refuse {
                return Err(ActivateError::Backend("refused".into()));
            }
            queues[0].notify.write(1).unwrap();
            interrupt.signal_used_queue().unwrap();
            self.queues = queues.iter().map(|q| q.queue.state()).collect();
            self.interrupt = Some(interrupt);
            self.activated = Some(
                queues
                    .iter()
                    .map(|q| {
                        (
                            q.queue.desc_table(),
                            q.queue.avail_ring(),
                            q.queue.used_ring(),
                            q.queue.size(),
                            q.queue.ready(),
                            q.queue.event_idx_enabled(),
                        )
                    })
                    .collect(),
            );
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.activated = None;
            true
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
        fn quiesce_queues(&mut self) -> Option<Vec<QueueState>> {
            self.activated.as_ref().map(|_| self.queues.clone())
        }
    }

    struct Rig {
        t: MmioTransport,
        dev: Arc<Mutex<Probe>>,
        notify: Vec<EventFd>,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Probe::default()));
        let notify: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            dev.clone(),
            mem,
            Interrupt::new(irq.try_clone().unwrap()),
            notify.iter().map(|e| e.try_clone().unwrap()).collect(),
        )
        .unwrap();
        Rig {
            t,
            dev,
            notify,
            irq,
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// The Linux driver's sequence up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, REG_QUEUE_SEL, index);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, 0);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let Rig { mut t, .. } = rig();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), TYPE_BLOCK);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (1 << 29) | 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 128);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn full_driver_sequence_activates_with_the_queues() {
        let Rig {
            mut t,
            dev,
            notify,
            irq,
        } = rig();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(
            r(&mut t, REG_STATUS) & STATUS_FEATURES_OK,
            STATUS_FEATURES_OK
        );
        assert_eq!(
            dev.lock().unwrap().acked,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
        setup_queue(&mut t, 0, 256, 0x1_0000);
        setup_queue(&mut t, 1, 64, 0x2_0000);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK);

        let act = dev.lock().unwrap().activated.clone().unwrap();
        assert_eq!(act[0], (0x1_0000, 0x1_1000, 0x1_2000, 256, true, true));
        assert_eq!(act[1], (0x2_0000, 0x2_1000, 0x2_2000, 64, true, true));
        // The device got the very fds KVM signals and the irqfd.
        assert_eq!(notify[0].read().unwrap(), 1);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);

        // Queue registers are frozen while the device runs.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn reactivation_after_reset() {
        let Rig { mut t, dev, .. } = rig();
        for _ in 0..2 {
            negotiate(&mut t, VIRTIO_F_VERSION_1);
            setup_queue(&mut t, 0, 256, 0x1_0000);
            setup_queue(&mut t, 1, 128, 0x2_0000);
            w(&mut t, REG_STATUS, ALL_OK);
            assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
            let act = dev.lock().unwrap().activated.clone().unwrap();
            assert!(!act[0].5, "event idx not negotiated");
            w(&mut t, REG_STATUS, 0);
        }
    }

    #[test]
    fn features_the_device_lacks_are_refused() {
        let Rig { mut t, dev, .. } = rig();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().acked, 0);
        // DRIVER_OK without FEATURES_OK does nothing.
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn legacy_driver_without_version_1_is_refused() {
        let Rig { mut t, .. } = rig();
        negotiate(&mut t, 1);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queue_fails_activation_with_needs_reset() {
        let Rig {
            mut t, dev, irq, ..
        } = rig();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // Descriptor table outside guest memory.
        setup_queue(&mut t, 0, 256, 0xfff0_0000);
        w(&mut t, REG_STATUS, ALL_OK);
        let status = r(&mut t, REG_STATUS);
        assert_eq!(status & STATUS_DRIVER_OK, 0);
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS) & 2, 2);
        assert_eq!(irq.read().unwrap(), 1);

        // A fixed queue is not retried before a reset; after one it is.
        setup_queue(&mut t, 0, 256, 0x1_0000);
        w(&mut t, REG_STATUS, ALL_OK);
        assert!(dev.lock().unwrap().activated.is_none());
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1_0000);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
        assert!(dev.lock().unwrap().activated.is_some());
    }

    /// Brings the rig's device up with queue 0, its activation interrupt
    /// read and acked, and returns the line the device was given.
    fn running(rig: &mut Rig) -> Interrupt {
        negotiate(&mut rig.t, VIRTIO_F_VERSION_1);
        setup_queue(&mut rig.t, 0, 256, 0x1_0000);
        w(&mut rig.t, REG_STATUS, ALL_OK);
        assert_eq!(rig.irq.read().unwrap(), 1);
        w(&mut rig.t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        rig.dev.lock().unwrap().interrupt.clone().unwrap()
    }

    /// A running device that finds the driver broke the protocol says so
    /// through its line: the driver reads DEVICE_NEEDS_RESET in Status,
    /// gets a configuration-change interrupt, and the bit stays until it
    /// resets the device.
    #[test]
    fn device_signalled_needs_reset_shows_until_reset() {
        let mut rig = rig();
        let line = running(&mut rig);
        let Rig {
            mut t, dev, irq, ..
        } = rig;
        // Not the driver's bit to set.
        w(&mut t, REG_STATUS, ALL_OK | STATUS_DEVICE_NEEDS_RESET);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
        line.signal_needs_reset().unwrap();
        line.signal_needs_reset().unwrap();
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK | STATUS_DEVICE_NEEDS_RESET);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.read().unwrap(), 1, "one interrupt for one error");

        // Linux adds a status bit by writing back what it read plus the
        // bit: accepted, and the device's bit is still the device's.
        let failed = ALL_OK | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED;
        w(&mut t, REG_STATUS, failed);
        assert_eq!(r(&mut t, REG_STATUS), failed);
        assert_eq!(t.save_state().status, failed);

        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        assert!(!line.needs_reset());
        assert_eq!(dev.lock().unwrap().resets, 1);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1_0000);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK, "set up again, it runs");
    }

    /// A device stopped over a driver error stays stopped after a restore:
    /// the saved Status holds DEVICE_NEEDS_RESET and the restored device
    /// gets a line with the flag already set. A state saved after a failed
    /// activation (the only way an older monitor set the bit) means the
    /// same.
    #[test]
    fn needs_reset_survives_a_snapshot() {
        let mut from = rig();
        running(&mut from).signal_needs_reset().unwrap();
        let state = from.t.save_state();
        assert_eq!(state.status, ALL_OK | STATUS_DEVICE_NEEDS_RESET);
        assert_ne!(state.interrupt_status & VIRTIO_MMIO_INT_CONFIG, 0);

        let Rig { mut t, dev, .. } = rig();
        t.restore_state(&state).unwrap();
        let line = dev.lock().unwrap().interrupt.clone().unwrap();
        assert!(line.needs_reset(), "the restored device would run again");
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK | STATUS_DEVICE_NEEDS_RESET);
        // The probe signals a used buffer when it is activated: a device
        // that needs a reset raises nothing for it.
        let again = t.save_state();
        assert_eq!(again.interrupt_status & VIRTIO_MMIO_INT_VRING, 0);
        assert_eq!(again, state);
        w(&mut t, REG_STATUS, 0);
        assert!(!line.needs_reset());

        let Rig { t: mut from, .. } = rig();
        negotiate(&mut from, VIRTIO_F_VERSION_1);
        setup_queue(&mut from, 0, 256, 0xfff0_0000);
        w(&mut from, REG_STATUS, ALL_OK);
        let state = from.save_state();
        assert_eq!(
            state.status,
            (ALL_OK & !STATUS_DRIVER_OK) | STATUS_DEVICE_NEEDS_RESET
        );
        let Rig { mut t, dev, .. } = rig();
        t.restore_state(&state).unwrap();
        assert_eq!(r(&mut t, REG_STATUS), state.status);
        w(&mut t, REG_STATUS, ALL_OK);
        assert!(
            dev.lock().unwrap().activated.is_none(),
            "activated before a reset"
        );
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn device_refusal_sets_needs_reset() {
        let Rig { mut t, dev, .. } = rig();
        dev.lock().unwrap().refuse = true;
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 256, 0x1_0000);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn bad_queue_size_is_ignored() {
        let Rig { mut t, dev, .. } = rig();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 64, 0x1_0000);
        w(&mut t, REG_QUEUE_READY, 0);
        w(&mut t, REG_QUEUE_NUM, 1000); // not a power of two
        w(&mut t, REG_QUEUE_NUM, 512); // above the maximum
        w(&mut t, REG_QUEUE_NUM, 0x1_0000_u32); // above u16
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, ALL_OK);
        let act = dev.lock().unwrap().activated.clone().unwrap();
        assert_eq!(act[0].3, 64, "the last valid size stands");
        assert!(!act[1].4, "queue 1 was never made ready");
    }

    #[test]
    fn config_space_passes_through() {
        let Rig { mut t, .. } = rig();
        t.write(REG_CONFIG + 2, &[0xab, 0xcd]);
        let mut b = [0u8; 4];
        t.read(REG_CONFIG, &mut b);
        assert_eq!(b, [0, 0, 0xab, 0xcd]);
        let mut big = [0x11u8; 8];
        t.read(REG_CONFIG + 4, &mut big);
        assert_eq!(big, [0; 8], "out of range reads are zero");
    }

    #[test]
    fn hostile_accesses_never_panic() {
        let Rig { mut t, .. } = rig();
        let mut rng_state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        for _ in 0..20_000 {
            let x = next();
            let offset = x % 0x1000;
            let len = [0usize, 1, 2, 3, 4, 8, 16][(x >> 12) as usize % 7];
            let mut buf = vec![0u8; len];
            if x >> 20 & 1 == 0 {
                t.read(offset, &mut buf);
            } else {
                let v = next();
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (v >> (8 * (i % 8))) as u8;
                }
                // Keep hitting the interesting registers too.
                let offset = if x >> 21 & 1 == 0 {
                    offset
                } else {
                    ((x >> 24) % 0x100) & !3
                };
                t.write(offset, &buf);
            }
        }
    }

    #[test]
    fn notify_written_to_the_register_reaches_the_queue_fd() {
        let Rig { mut t, notify, .. } = rig();
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        w(&mut t, REG_QUEUE_NOTIFY, 9);
        assert_eq!(notify[1].read().unwrap(), 1);
        assert!(notify[0].read().is_err());
    }

    #[test]
    fn construction_checks() {
        struct NoQueues;
        impl VirtioDevice for NoQueues {
            fn device_type(&self) -> u32 {
                TYPE_BLOCK
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &[]
            }
            fn avail_features(&self) -> u64 {
                VIRTIO_F_VERSION_1
            }
            fn set_acked_features(&mut self, _: u64) {}
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(
                &mut self,
                _: GuestMemory,
                _: Interrupt,
                _: Vec<ActivatedQueue>,
            ) -> Result<(), ActivateError> {
                Ok(())
            }
            fn is_activated(&self) -> bool {
                false
            }
            fn quiesce_queues(&mut self) -> Option<Vec<QueueState>> {
                None
            }
        }
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let err = MmioTransport::new(
            Arc::new(Mutex::new(NoQueues)),
            mem.clone(),
            irq.clone(),
            vec![],
        );
        assert!(matches!(err, Err(Error::NoQueues)));
        let err = MmioTransport::new(Arc::new(Mutex::new(Probe::default())), mem, irq, vec![]);
        assert!(matches!(err, Err(Error::NotifyCount(0, 2))));
    }
}
