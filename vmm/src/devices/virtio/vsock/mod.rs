//! virtio-vsock (device type 19) in userspace; its host side is a Unix socket.
//!
//! A host process connects to the device's Unix socket, writes
//! `CONNECT <port>\n` and, once the guest accepts, reads `OK <local_port>\n`;
//! from then on the stream carries bytes to and from guest port `<port>`.
//! A guest connection to host port P goes to the Unix socket `<uds_path>_P`.
//!
//! - `mod.rs`: the device (config, features, activation) and its event-loop
//!   glue (`MutEventSubscriber`).
//! - `queues.rs`: moves packets between the virtqueues and the muxer.
//! - `muxer.rs`: the connection table and the Unix listener.
//! - `connection.rs`: one stream's state and credit flow control.
//! - `unix.rs`: the handshake and host-side socket helpers.
//! - `packet.rs`: header fields and constants.

mod connection;
mod muxer;
mod packet;
mod queues;
mod unix;

#[cfg(test)]
mod tests;

/// The queue glue, for `crate::fuzzing`.
#[cfg(fuzzing)]
pub(crate) mod fuzzing {
    pub use super::queues::VsockQueues;
}

use std::io;
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::queues::{VsockQueues, NUM_QUEUES};
use super::{
    ActivateError, ActivatedQueue, DeviceState, GuestMemory, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};

pub use self::connection::CONN_BUF_ALLOC;
pub use self::muxer::{VsockMuxer, MAX_CONNECTIONS};
pub use self::unix::MAX_HANDSHAKE_LEN;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

// Event tokens (the `data` of our registered events).
const EVT_ACTIVATE: u32 = 0;
const EVT_RX: u32 = 1;
const EVT_TX: u32 = 2;
const EVT_EVENT: u32 = 3;
const EVT_MUXER: u32 = 4;

/// Why the vsock device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vsock guest cid {0} is reserved (use 3 to 4294967294)")]
    BadCid(u64),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot remove stale socket {}", .0.display())]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("cannot bind vsock socket {}", .0.display())]
    Bind(PathBuf, #[source] io::Error),
    #[error("cannot set up the vsock listener")]
    Listener(#[source] io::Error),
    #[error("cannot create the vsock epoll fd")]
    Epoll(#[source] io::Error),
    #[error("cannot create the vsock activation eventfd")]
    EventFd(#[source] io::Error),
}

/// The virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    muxer: VsockMuxer,
    acked_features: u64,
    /// Written by `activate` and `reset` (vCPU threads) so that the event
    /// loop (re)registers the queue fds.
    activate_evt: EventFd,
    queues: Option<VsockQueues>,
    /// Queue notification fds registered with the event loop.
    registered: Vec<EventFd>,
    muxer_registered: bool,
    /// A transport reset the guest must still be told of (restored from a
    /// snapshot before it had an event buffer posted).
    reset_pending: bool,
    /// A transport reset posted and not yet handled by the driver. Host
    /// connections wait meanwhile: the guest resets every socket connected
    /// when it handles the event, without telling the peer, so a host
    /// stream opened before that would hang. The driver refills and kicks
    /// the event queue right after handling it.
    reset_unacked: bool,
    /// A snapshot is being taken: the queues stay as saved (bytes from host
    /// streams must not land in guest memory while it is copied) until
    /// [`VirtioDevice::resume`]. The muxer is not watched meanwhile.
    paused: bool,
}

impl Vsock {
    /// A vsock device for guest `guest_cid` whose host side listens on
    /// `uds_path` (a stale socket file there is replaced; the file is removed
    /// when the device is dropped).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, Error> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(Error::BadCid(guest_cid));
        }
        let activate_evt = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let muxer = VsockMuxer::new(guest_cid, uds_path)?;
        Ok(Vsock {
            guest_cid,
            muxer,
            acked_features: 0,
            activate_evt,
            queues: None,
            registered: Vec::new(),
            muxer_registered: false,
            reset_pending: false,
            reset_unacked: false,
            paused: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Open vsock streams, for tests and diagnostics.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Brings the event-loop registrations in line with the activation state.
    fn sync_registration(&mut self, ops: &mut EventOps) {
        if self.queues.is_none() {
            for fd in self.registered.drain(..) {
                if let Err(e) = ops.remove(Events::empty(&fd)) {
                    tracing::warn!("vsock: cannot unregister queue fd: {e:?}");
                }
            }
            return;
        }
        // Host streams wait while a snapshot is taken and until the driver
        // has handled a transport reset.
        let watch = !self.paused && !self.reset_unacked;
        if watch && !self.muxer_registered {
            match ops.add(Events::with_data(&self.muxer, EVT_MUXER, EventSet::IN)) {
                Ok(()) => self.muxer_registered = true,
                Err(e) => tracing::error!("vsock: cannot register the muxer: {e:?}"),
            }
        } else if !watch && self.muxer_registered {
            match ops.remove(Events::empty(&self.muxer)) {
                Ok(()) => self.muxer_registered = false,
                Err(e) => tracing::warn!("vsock: cannot unwatch the muxer: {e:?}"),
            }
        }
        if !self.registered.is_empty() {
            return;
        }
        let Some(q) = &self.queues else { return };
        for (queue, token) in [(&q.rx, EVT_RX), (&q.tx, EVT_TX), (&q.event, EVT_EVENT)] {
            let fd = match queue.notify.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!("vsock: cannot clone queue fd: {e}");
                    continue;
                }
            };
            match ops.add(Events::with_data(&fd, token, EventSet::IN)) {
                Ok(()) => self.registered.push(fd),
                Err(e) => tracing::error!("vsock: cannot register queue fd: {e:?}"),
            }
        }
    }

    /// Runs the queue work for one event token.
    fn handle(&mut self, token: u32) {
        if self.paused {
            // Kicks are consumed, not served: `resume` serves every queue.
            if let Some(q) = &self.queues {
                for queue in [&q.rx, &q.tx, &q.event] {
                    let _ = queue.notify.read();
                }
            }
            return;
        }
        let Some(q) = self.queues.as_mut() else {
            if token == EVT_MUXER {
                // Not active: let host streams queue up in the muxer.
                self.muxer.process_host_events();
            }
            return;
        };
        let mut used = false;
        match token {
            EVT_RX => {
                let _ = q.rx.notify.read();
                used |= q.process_rx(&mut self.muxer);
            }
            EVT_TX => {
                let _ = q.tx.notify.read();
                used |= q.process_tx(&mut self.muxer);
                used |= q.process_rx(&mut self.muxer);
            }
            EVT_EVENT => {
                let _ = q.event.notify.read();
                if self.reset_pending {
                    self.reset_pending = !q.post_transport_reset();
                    if !self.reset_pending {
                        if let Err(e) = q.interrupt.raise_if_pending() {
                            tracing::warn!("vsock: cannot signal the event queue: {e}");
                        }
                    }
                } else if self.reset_unacked {
                    tracing::debug!("vsock: the driver handled the transport reset");
                    self.reset_unacked = false;
                }
            }
            // Until the driver has handled a transport reset, host streams
            // stay in the muxer's backlog (see `reset_unacked`), also when
            // activation asks for a look.
            EVT_MUXER if self.reset_unacked => {}
            EVT_MUXER => {
                self.muxer.process_host_events();
                used |= q.process_rx(&mut self.muxer);
            }
            _ => {}
        }
        if used {
            q.signal_used();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let queues =
            VsockQueues::new(mem, interrupt, queues).map_err(|_| ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            })?;
        self.queues = Some(queues);
        self.activate_evt.write(1).map_err(ActivateError::Wake)
    }

    fn quiesce_queues(&mut self) -> Option<Vec<virtio_queue::QueueState>> {
        // Packets move only on the event loop, under this device's lock;
        // from here until `resume`, none does.
        let q = self.queues.as_ref()?;
        self.paused = true;
        Some(vec![
            q.rx.queue.state(),
            q.tx.queue.state(),
            q.event.queue.state(),
        ])
    }

    fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            // The event loop watches the muxer again and serves what waited.
            if let Err(e) = self.activate_evt.write(1) {
                tracing::warn!("vsock: cannot wake the event loop after a snapshot: {e}");
            }
        }
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Vsock {
            next_local_port: self.muxer.next_local_port(),
        }
    }

    fn restored(&mut self, state: &DeviceState) {
        if let DeviceState::Vsock { next_local_port } = state {
            self.muxer.set_next_local_port(*next_local_port);
        }
        // The host ends of the guest's connections did not come along.
        if let Some(q) = self.queues.as_mut() {
            self.reset_pending = !q.post_transport_reset();
            self.reset_unacked = true;
        }
    }

    fn reset(&mut self) -> bool {
        self.reset_pending = false;
        self.reset_unacked = false;
        self.paused = false;
        self.queues = None;
        self.muxer.reset();
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("vsock: cannot wake the event loop on reset: {e}");
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.queues.is_some()
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EVT_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("vsock: cannot register the activation fd: {e:?}");
        }
        self.sync_registration(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_registration(ops);
                // Host streams that arrived before activation (or during a
                // snapshot) may be waiting, and so may guest packets.
                self.handle(EVT_TX);
                self.handle(EVT_MUXER);
            }
            EVT_EVENT => {
                self.handle(EVT_EVENT);
                // The reset handled: host connections may go ahead.
                self.sync_registration(ops);
                self.handle(EVT_MUXER);
            }
            token => {
                self.handle(token);
                // A pause or a restore may have come in meanwhile.
                self.sync_registration(ops);
            }
        }
    }
}
