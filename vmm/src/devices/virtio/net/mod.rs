//! virtio-net (device type 1) whose host side is passt: a connected stream
//! socket carrying Ethernet frames in qemu's stream framing.
//!
//! - `mod.rs`: the device (features, config space, activation, reset,
//!   snapshot state) and its event-loop glue (`MutEventSubscriber`), which
//!   moves frames between the queues and the back end.
//! - `queues.rs`: popping chains, reading TX frames, writing RX frames.
//! - `backend.rs`: the socket and its framing, with bounded buffers.
//! - `filter.rs`: the egress allow-list and its CIDR type, [`IpNet`].
//!
//! No offloads and no mergeable RX buffers: every RX chain holds a whole
//! frame behind a 12-byte header, and the device offers an MTU of 1500
//! (VIRTIO_NET_F_MTU) so that the Linux driver posts buffers of that size.
//!
//! Flow control, both ways bounded: a frame the socket does not take whole
//! stays pending (one at most) and the device takes no TX descriptor until
//! the socket is writable again (EPOLLOUT); a frame with no RX buffer to go
//! to stays in the back end's reassembly buffer and the socket is not read
//! until the driver kicks the RX queue. Each event does at most a queue's
//! worth of chains and kicks itself for the rest, so a busy guest or a
//! chatty passt cannot keep the VM's one event loop to itself.
//!
//! The back end belongs to the host side, not to the virtio device: a
//! driver reset leaves the stream (and a frame half sent or half received
//! on it) alone. When the stream fails (passt closed it, a socket error, a
//! frame length passt never sends) the device shuts it down and reports the
//! link down; frames the guest sends from then on are dropped.

pub mod backend;
pub mod filter;
mod queues;

#[cfg(test)]
mod tests;

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::{FrameStream, StreamError};
use self::filter::EgressFilter;
use self::queues::{NetQueues, RxRefusal, MAX_TX_CHAIN_LEN, NET_HDR_LEN, NUM_QUEUES};
use super::{
    ActivateError, ActivatedQueue, DeviceState, GuestMemory, Interrupt, VirtioDevice, TYPE_NET,
    VIRTIO_F_VERSION_1,
};
use crate::NetConfig;

pub use self::backend::MAX_FRAME_LEN;
pub use self::filter::{IpNet, IpNetError};

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// The MTU offered to the driver (VIRTIO_NET_F_MTU).
pub const MTU: u16 = 1500;
/// Bytes of config space: `mac`, `status`, `max_virtqueue_pairs`, `mtu`.
pub const CONFIG_LEN: usize = 12;
/// The largest frame passed to a driver that accepted [`MTU`]: the MTU
/// behind an Ethernet header and a VLAN tag (what Linux sizes its receive
/// buffers for).
pub const MAX_RX_FRAME_LEN: usize = MTU as usize + 14 + 4;

// Event tokens (the `data` of our registered events).
const EVT_ACTIVATE: u32 = 0;
const EVT_RX: u32 = 1;
const EVT_TX: u32 = 2;
const EVT_BACKEND: u32 = 3;

/// Why the device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mac address {} is not a unicast address", format_mac(.0))]
    BadMac([u8; 6]),
    #[error(transparent)]
    Backend(#[from] backend::Error),
    #[error("cannot create the virtio-net activation eventfd")]
    EventFd(#[source] io::Error),
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `mac` can be a station's address: not multicast, not zero.
pub fn is_unicast_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && *mac != [0; 6]
}

/// What the device moved and dropped, since it was created (a reset does
/// not clear them: they describe the host side).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames handed to the back end (whole or pending).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX chains that held no valid frame: shorter than a header and an
    /// Ethernet header, longer than a header and [`MAX_FRAME_LEN`],
    /// device-writable or outside guest memory.
    pub tx_malformed: u64,
    /// TX frames the allow-list refused.
    pub tx_filtered: u64,
    /// TX frames dropped because the back end is gone.
    pub tx_no_backend: u64,
    /// Frames written into RX buffers.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames from the back end larger than the RX buffer the driver gave,
    /// or than the MTU it accepted.
    pub rx_too_big: u64,
    /// RX chains returned empty: device-readable or outside guest memory.
    pub rx_bad_chains: u64,
    /// Times the back end failed and was dropped (0 or 1).
    pub backend_errors: u64,
}

/// The virtio-net device.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    acked_features: u64,
    /// `None` once the stream failed and its registration was removed.
    backend: Option<FrameStream>,
    /// False from the stream's failure on: it is shut down, and dropped
    /// once the event loop no longer watches it.
    link_up: bool,
    filter: EgressFilter,
    /// Written by `activate` and `reset` (vCPU threads) so that the event
    /// loop (re)registers the queue fds.
    activate_evt: EventFd,
    queues: Option<NetQueues>,
    /// Queue notification fds registered with the event loop.
    registered: Vec<EventFd>,
    /// What the back end's fd is registered for, if it is.
    backend_events: Option<EventSet>,
    /// A whole frame waits for an RX buffer: the socket is not read until
    /// the driver kicks the RX queue.
    rx_waiting: bool,
    /// A snapshot is being taken: the queues stay as saved (frames from
    /// passt must not land in guest memory while it is copied) until
    /// [`VirtioDevice::resume`].
    paused: bool,
    /// One TX chain: header and frame.
    tx_buf: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    /// A device with `config`'s MAC and allow-list, on its back end socket
    /// (which must be a connected stream socket).
    pub fn new(config: &NetConfig) -> Result<Net, Error> {
        if !is_unicast_mac(&config.mac) {
            return Err(Error::BadMac(config.mac));
        }
        let backend = FrameStream::new(config.backend.clone())?;
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        Ok(Net {
            mac: config.mac,
            acked_features: 0,
            backend: Some(backend),
            link_up: true,
            filter: EgressFilter::new(config.allow.clone()),
            activate_evt,
            queues: None,
            registered: Vec::new(),
            backend_events: None,
            rx_waiting: false,
            paused: false,
            tx_buf: Vec::with_capacity(MAX_TX_CHAIN_LEN),
            counters: NetCounters::default(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the back end is still connected (the link status the driver
    /// reads).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    pub fn counters(&self) -> NetCounters {
        NetCounters {
            tx_filtered: self.filter.dropped(),
            ..self.counters
        }
    }

    /// Bytes the device holds for the back end and from it: at most a
    /// frame each way.
    pub fn buffered(&self) -> (usize, usize) {
        self.backend
            .as_ref()
            .map_or((0, 0), |b| (b.tx_pending_len(), b.rx_buffered_len()))
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&MTU.to_le_bytes());
        c
    }

    /// The stream failed: shut it down (passt then sees it closed and
    /// quits), report the link down, drop what it held.
    fn link_down(&mut self, error: &StreamError) {
        if !self.link_up {
            return;
        }
        tracing::warn!("virtio-net: dropping the network back end: {error}");
        self.link_up = false;
        self.counters.backend_errors += 1;
        self.rx_waiting = false;
        if let Some(b) = &self.backend {
            b.shutdown();
        }
        if let Some(q) = &self.queues {
            if self.acked_features & (1 << VIRTIO_NET_F_STATUS) != 0 {
                if let Err(e) = q.interrupt.signal_config_change() {
                    tracing::warn!("virtio-net: cannot signal the link change: {e}");
                }
            }
        }
    }

    /// Brings the queue registrations in line with the activation state.
    fn sync_queues(&mut self, ops: &mut EventOps) {
        if self.queues.is_none() {
            for fd in self.registered.drain(..) {
                if let Err(e) = ops.remove(Events::empty(&fd)) {
                    tracing::warn!("virtio-net: cannot unregister a queue fd: {e:?}");
                }
            }
            return;
        }
        if !self.registered.is_empty() {
            return;
        }
        let Some(q) = &self.queues else { return };
        for (queue, token) in [(&q.rx, EVT_RX), (&q.tx, EVT_TX)] {
            let fd = match queue.notify.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!("virtio-net: cannot clone a queue fd: {e}");
                    continue;
                }
            };
            match ops.add(Events::with_data(&fd, token, EventSet::IN)) {
                Ok(()) => self.registered.push(fd),
                Err(e) => tracing::error!("virtio-net: cannot register a queue fd: {e:?}"),
            }
        }
    }

    /// What the back end's fd should be watched for now: readable while
    /// the guest can take frames, writable while a frame is pending.
    fn wanted_backend_events(&self) -> Option<EventSet> {
        let backend = self.backend.as_ref().filter(|_| self.link_up)?;
        let mut events = EventSet::empty();
        let running = self
            .queues
            .as_ref()
            .is_some_and(|q| !q.interrupt.needs_reset());
        if running && !self.rx_waiting && !self.paused {
            events |= EventSet::IN;
        }
        if backend.tx_busy() {
            events |= EventSet::OUT;
        }
        // Nothing to watch: unregistered, so a hang-up (always reported)
        // does not wake the loop over and over.
        (!events.is_empty()).then_some(events)
    }

    /// Brings the back end's registration in line with what it should be
    /// watched for; drops a failed back end once it is unregistered.
    fn sync_backend(&mut self, ops: &mut EventOps) {
        let wanted = self.wanted_backend_events();
        if wanted != self.backend_events {
            if let Some(backend) = &self.backend {
                let fd = backend.fd();
                let result = match (self.backend_events, wanted) {
                    (None, Some(set)) => ops.add(Events::with_data(fd, EVT_BACKEND, set)),
                    (Some(_), Some(set)) => ops.modify(Events::with_data(fd, EVT_BACKEND, set)),
                    (Some(_), None) => ops.remove(Events::empty(fd)),
                    (None, None) => Ok(()),
                };
                match result {
                    Ok(()) => self.backend_events = wanted,
                    Err(e) => {
                        tracing::error!("virtio-net: cannot watch the back end: {e:?}");
                        // A failed add or modify leaves the registration
                        // as it was; a failed remove is taken as done.
                        if wanted.is_none() {
                            self.backend_events = None;
                        }
                    }
                }
            }
        }
        if !self.link_up && self.backend_events.is_none() {
            self.backend = None;
        }
    }

    /// Moves TX chains to the back end, at most a queue's worth per call.
    /// Returns whether the used ring changed.
    fn process_tx(&mut self) -> bool {
        let Some(q) = self.queues.as_mut() else {
            return false;
        };
        if q.interrupt.needs_reset() || self.paused {
            return false;
        }
        let budget = q.tx.queue.size();
        let mut used = false;
        let mut failed = None;
        let mut served = 0;
        while served < budget {
            if self.link_up && self.backend.as_ref().is_some_and(FrameStream::tx_busy) {
                // EPOLLOUT brings us back once the socket drained.
                break;
            }
            let chain = match queues::pop(&mut q.tx.queue, &q.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    q.fail(&e);
                    break;
                }
            };
            let head = chain.head_index();
            let read = queues::read_tx(&q.mem, chain, &mut self.tx_buf);
            if let Err(e) = q.tx.queue.add_used(&q.mem, head, 0) {
                tracing::debug!("virtio-net: tx add_used: {e}");
            }
            used = true;
            served += 1;
            if let Err(e) = read {
                tracing::debug!("virtio-net: dropping tx chain {head}: {e}");
                self.counters.tx_malformed += 1;
                continue;
            }
            let frame = &self.tx_buf[NET_HDR_LEN..];
            if !self.filter.allows(frame) {
                continue;
            }
            let backend = self.backend.as_mut().filter(|_| self.link_up);
            let Some(backend) = backend else {
                self.counters.tx_no_backend += 1;
                continue;
            };
            match backend.send_frame(frame) {
                Ok(_) => {
                    self.counters.tx_frames += 1;
                    self.counters.tx_bytes += frame.len() as u64;
                }
                Err(e) => {
                    self.counters.tx_no_backend += 1;
                    failed = Some(e);
                    break;
                }
            }
        }
        if served == budget {
            // Chains may be left that the driver will not kick for again:
            // kick ourselves, so the event loop comes back once it has
            // served the other queues and devices.
            if let Err(e) = q.tx.notify.write(1) {
                tracing::warn!("virtio-net: cannot re-arm the tx queue: {e}");
            }
        }
        if let Some(e) = failed {
            self.link_down(&e);
        }
        used
    }

    /// Moves frames from the back end into RX buffers, at most a queue's
    /// worth per call. Returns whether the used ring changed.
    fn process_rx(&mut self) -> bool {
        let Some(q) = self.queues.as_mut() else {
            return false;
        };
        if q.interrupt.needs_reset() || !self.link_up || self.paused {
            return false;
        }
        let Some(backend) = self.backend.as_mut() else {
            return false;
        };
        let budget = q.rx.queue.size();
        let mtu_acked = self.acked_features & (1 << VIRTIO_NET_F_MTU) != 0;
        let mut used = false;
        let mut failed = None;
        let mut served = 0;
        while served < budget {
            let frame = match backend.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if mtu_acked && frame.len() > MAX_RX_FRAME_LEN {
                // The driver was promised no more (virtio 1.2, 5.1.6.3.1).
                tracing::debug!(
                    len = frame.len(),
                    "virtio-net: frame above the mtu, dropped"
                );
                self.counters.rx_too_big += 1;
                backend.consume_frame();
                served += 1;
                continue;
            }
            let chain = match queues::pop(&mut q.rx.queue, &q.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    // The frame waits, and the socket with it.
                    self.rx_waiting = true;
                    break;
                }
                Err(e) => {
                    q.fail(&e);
                    break;
                }
            };
            served += 1;
            let head = chain.head_index();
            let len = match queues::write_rx(&q.mem, chain, frame) {
                Ok(len) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += frame.len() as u64;
                    backend.consume_frame();
                    len
                }
                Err(RxRefusal::TooSmall { capacity, needed }) => {
                    // This frame cannot go anywhere; the buffer may suit
                    // the next one.
                    tracing::debug!(
                        capacity,
                        needed,
                        "virtio-net: frame larger than the rx buffer, dropped"
                    );
                    self.counters.rx_too_big += 1;
                    backend.consume_frame();
                    q.rx.queue.go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    tracing::debug!("virtio-net: returning rx chain {head} unused: {e}");
                    self.counters.rx_bad_chains += 1;
                    0
                }
            };
            if let Err(e) = q.rx.queue.add_used(&q.mem, head, len) {
                tracing::debug!("virtio-net: rx add_used: {e}");
            }
            used = true;
        }
        if served == budget {
            if let Err(e) = q.rx.notify.write(1) {
                tracing::warn!("virtio-net: cannot re-arm the rx queue: {e}");
            }
        }
        if let Some(e) = failed {
            self.link_down(&e);
        }
        used
    }

    /// The back end's fd is ready for `events`.
    fn backend_ready(&mut self, events: EventSet) -> bool {
        let trouble = EventSet::HANG_UP | EventSet::ERROR;
        let mut used = false;
        if events.intersects(EventSet::OUT | trouble) {
            let flushed = match self.backend.as_mut().filter(|_| self.link_up) {
                Some(b) if b.tx_busy() => b.flush(),
                _ => Ok(false),
            };
            match flushed {
                // TX chains waited for the socket.
                Ok(true) => used |= self.process_tx(),
                Ok(false) => {}
                Err(e) => self.link_down(&e),
            }
        }
        if events.intersects(EventSet::IN | trouble) {
            used |= self.process_rx();
        }
        used
    }

    fn signal_used(&mut self) {
        if let Some(q) = self.queues.as_mut() {
            q.signal_used();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let queues =
            NetQueues::new(mem, interrupt, queues).map_err(|_| ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            })?;
        self.queues = Some(queues);
        self.rx_waiting = false;
        self.activate_evt.write(1).map_err(ActivateError::Wake)
    }

    fn reset(&mut self) -> bool {
        // The stream stays: it is the host side, and a frame half sent on
        // it must still be finished for the framing to hold.
        self.queues = None;
        self.acked_features = 0;
        self.rx_waiting = false;
        self.paused = false;
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("virtio-net: cannot wake the event loop on reset: {e}");
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.queues.is_some()
    }

    fn quiesce_queues(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        // Chains are served whole on the event loop, under this device's
        // lock: none is in flight. What the back end holds is not saved
        // (the guest's TCP retransmits it).
        let q = self.queues.as_ref()?;
        self.paused = true;
        Some(vec![q.rx.queue.state(), q.tx.queue.state()])
    }

    fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            // The event loop serves what waited: kicks it drained while
            // paused, frames passt sent meanwhile.
            if let Err(e) = self.activate_evt.write(1) {
                tracing::warn!("virtio-net: cannot wake the event loop after a snapshot: {e}");
            }
        }
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Net {
            mac: self.mac,
            link_up: self.link_up,
        }
    }

    fn restored(&mut self, state: &DeviceState) {
        // A new back end came with the restore: if the driver last heard
        // the link was down, tell it it is up again.
        if let DeviceState::Net { link_up: false, .. } = state {
            if let Some(q) = &self.queues {
                if self.link_up && self.acked_features & (1 << VIRTIO_NET_F_STATUS) != 0 {
                    q.interrupt.mark_config_change();
                }
            }
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EVT_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("virtio-net: cannot register the activation fd: {e:?}");
        }
        self.sync_queues(ops);
        self.sync_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut used = false;
        match events.data() {
            EVT_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_queues(ops);
                // Chains made available before the queues were watched
                // (or before a snapshot was taken) get no new kick.
                used |= self.process_tx();
                used |= self.process_rx();
            }
            EVT_RX => {
                if let Some(q) = &self.queues {
                    let _ = q.rx.notify.read();
                }
                self.rx_waiting = false;
                used |= self.process_rx();
            }
            EVT_TX => {
                if let Some(q) = &self.queues {
                    let _ = q.tx.notify.read();
                }
                used |= self.process_tx();
            }
            EVT_BACKEND => used |= self.backend_ready(events.event_set()),
            other => tracing::warn!(data = other, "unexpected virtio-net event"),
        }
        if used {
            self.signal_used();
        }
        self.sync_backend(ops);
    }
}
