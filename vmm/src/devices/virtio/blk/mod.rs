//! virtio-blk: a raw disk image as a virtio block device.
//!
//! Three parts, each testable without KVM:
//! - [`request`] parses a guest descriptor chain into a [`request::Request`]
//!   (pure, untrusted input);
//! - [`disk`] serves a request against the image file with positional I/O
//!   straight into guest memory;
//! - [`worker`] moves requests from the queue to an I/O thread and
//!   completions back into the used ring.
//!
//! [`Block`] itself is the configuration (features, config space) and the
//! thin event-loop glue: it registers an activation `EventFd` with the event
//! manager, and once the transport activates it, the queue's notify fd. The
//! event loop only pops and parses; the disk I/O runs on the worker.

pub mod disk;
pub mod request;
pub mod worker;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::disk::DiskFile;
use self::request::{MAX_RANGES, SECTOR_SIZE};
use self::worker::{BlockQueue, IoWorker};
use super::{
    ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};
use crate::DiskConfig;

/// Descriptors in the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use: the queue minus header and
/// status (the Linux driver's own bound without indirect descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most sectors in one discard or write-zeroes range (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
/// Discard granularity in sectors: holes are punched by the page.
pub const DISCARD_ALIGNMENT: u32 = 4096 / SECTOR_SIZE as u32;
/// Bytes of config space we expose: `struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: usize = 60;

const ACTIVATE_EVENT: u32 = 0;
const QUEUE_EVENT: u32 = 1;

/// Why a block device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("disk {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("disk id {id:?} is longer than 20 bytes")]
    IdTooLong { id: String },
    #[error("cannot create the activation eventfd")]
    EventFd(#[source] io::Error),
}

/// A running queue and the thread serving it.
#[derive(Debug)]
struct Active {
    queue: Arc<BlockQueue>,
    /// Dropping it waits for the request being served, drops the queued
    /// ones and joins the thread.
    worker: IoWorker,
}

/// A virtio-blk device backed by a raw image file.
#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskFile>,
    config: [u8; CONFIG_LEN],
    avail_features: u64,
    acked_features: u64,
    /// Written by `activate` and `reset` (vCPU threads) to make the event
    /// loop (un)register the queue notify fd.
    activate_evt: EventFd,
    active: Option<Active>,
    /// Notify fd handed over by `activate`, not yet registered.
    pending_notify: Option<EventFd>,
    /// Notify fd the event loop watches.
    registered_notify: Option<EventFd>,
}

impl Block {
    /// Opens the disk image of `config`. Read-only disks are opened
    /// read-only and advertised with VIRTIO_BLK_F_RO.
    pub fn new(config: &DiskConfig) -> Result<Block, Error> {
        let disk = DiskFile::open(&config.path, config.read_only, &config.id)?;
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;

        let mut avail_features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        Ok(Block {
            config: config_space(disk.capacity_sectors()),
            disk: Arc::new(disk),
            avail_features,
            acked_features: 0,
            activate_evt,
            active: None,
            pending_notify: None,
            registered_notify: None,
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    fn wake_event_loop(&self) -> io::Result<()> {
        self.activate_evt.write(1)
    }

    /// Event loop: the device was activated or reset.
    fn update_registration(&mut self, ops: &mut EventOps) {
        // Drain the counter; EAGAIN only means a spurious wake-up.
        let _ = self.activate_evt.read();
        if self.active.is_none() || self.pending_notify.is_some() {
            if let Some(old) = self.registered_notify.take() {
                if let Err(e) = ops.remove(Events::empty(&old)) {
                    tracing::warn!(error = %e, "cannot unregister the block queue");
                }
            }
        }
        if self.active.is_none() {
            self.pending_notify = None;
            return;
        }
        if let Some(notify) = self.pending_notify.take() {
            match ops.add(Events::with_data(&notify, QUEUE_EVENT, EventSet::IN)) {
                Ok(()) => self.registered_notify = Some(notify),
                Err(e) => tracing::error!(error = %e, "cannot register the block queue"),
            }
        }
    }

    /// Event loop: the driver kicked the queue (or we did, below).
    fn queue_notified(&mut self) {
        let Some(notify) = &self.registered_notify else {
            return;
        };
        // Drain the counter; EAGAIN only means a spurious wake-up.
        let _ = notify.read();
        let Some(active) = &self.active else {
            return;
        };
        let dispatched = worker::dispatch(&active.queue, |job| active.worker.submit(job));
        if dispatched.more {
            // Chains may be left that the driver will not kick for again:
            // kick ourselves, so the loop comes back once it has served the
            // other devices' events.
            if let Err(e) = notify.write(1) {
                tracing::warn!(error = %e, "cannot re-arm the block queue");
            }
        }
    }
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), little-endian, for the
/// fields we offer; the rest stays zero.
fn config_space(capacity_sectors: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        c[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &capacity_sectors.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_RANGES.to_le_bytes());
    put(44, &DISCARD_ALIGNMENT.to_le_bytes());
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok::<[ActivatedQueue; 1], _>([activated]) = queues.try_into() else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let queue = Arc::new(BlockQueue::new(activated.queue, mem, interrupt));
        let worker = IoWorker::spawn(self.disk.clone(), queue.clone())
            .map_err(|e| ActivateError::Backend(format!("cannot start the i/o thread: {e}")))?;
        self.active = Some(Active { queue, worker });
        self.pending_notify = Some(activated.notify);
        self.wake_event_loop().map_err(ActivateError::Wake)
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker waits for the request it is serving and drops
        // the rest, so nothing touches guest memory once the driver sees the
        // reset complete, and the vCPU waits for one request at most.
        self.active = None;
        self.pending_notify = None;
        self.acked_features = 0;
        if let Err(e) = self.wake_event_loop() {
            tracing::warn!(error = %e, "cannot wake the event loop after a block reset");
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn quiesce_queues(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        // The event loop cannot pop more while the caller holds this
        // device; the worker finishes what it was given.
        let active = self.active.as_ref()?;
        active.worker.drain();
        Some(vec![active.queue.state()])
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_EVENT,
            EventSet::IN,
        )) {
            tracing::error!(error = %e, "cannot register the block activation event");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_EVENT => self.update_registration(ops),
            QUEUE_EVENT => self.queue_notified(),
            other => tracing::warn!(data = other, "unexpected block device event"),
        }
    }
}

#[cfg(test)]
mod tests;
