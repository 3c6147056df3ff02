//! virtio-fs (device type 26) as a vhost-user frontend: the guest's FUSE
//! requests are served by a back end process (virtiofsd) that maps guest
//! memory itself and works the rings directly.
//!
//! - `mod.rs`: the device (config space, activation, reset, snapshot) and
//!   its event-loop glue.
//! - `frontend.rs`: the vhost-user messages, on the `vhost` crate.
//!
//! What the monitor does is set-up and interrupts. The kick of each queue
//! is the transport's ioeventfd, handed to the back end, so a guest kick
//! goes from KVM to virtiofsd with no monitor thread in between. The back
//! end's "call" eventfds are the device's own: the event loop turns each
//! into the virtio-mmio interrupt (the InterruptStatus bit the driver reads
//! before it looks at a ring, then the irqfd).
//!
//! Every vhost-user message runs on the event loop or, for a snapshot,
//! with the vCPUs parked; never on a vCPU thread, since the back end is
//! another process and may be slow to answer. `activate` and `reset` only
//! record what the driver did and wake the event loop, which brings the
//! back end's rings in line. A kick that comes before the rings start waits
//! in its eventfd, which the back end reads once it has it.
//!
//! The back end's memory map is the RAM memfd: the VM must keep every guest
//! byte in it (`GuestRam::new_shared`), which `vm.rs` does for any VM with
//! a virtio-fs device.
//!
//! Snapshots save the rings, not the back end: a restored VM talks to a new
//! virtiofsd, which knows none of the FUSE node ids of a session the guest
//! had open. Whoever snapshots a VM whose guest has a share mounted must
//! unmount it first (the SDK's agent does) and mount it again afterwards.

mod frontend;

#[cfg(test)]
mod tests;

use std::io;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::frontend::Backend;
use super::{ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice, TYPE_FS};
use crate::FsConfig;

pub use self::frontend::{Error as BackendError, MESSAGE_TIMEOUT};

/// The high-priority queue (FORGET, INTERRUPT) and one request queue.
pub const NUM_QUEUES: usize = 2;
/// Size of each queue (what cloud-hypervisor offers too).
pub const QUEUE_SIZE: u16 = 1024;
/// Bytes of the mount tag in the config space.
pub const TAG_LEN: usize = 36;
/// Config space: the tag, then `num_request_queues` (le32).
const CONFIG_LEN: usize = TAG_LEN + 4;
/// How long a snapshot waits for requests the back end took before its
/// rings stopped to be answered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

// Event tokens.
const EVT_ACTIVATE: u32 = 0;
const EVT_SOCKET: u32 = 1;
/// `EVT_CALL + i` is queue `i`'s call eventfd.
const EVT_CALL: u32 = 2;

/// Why the device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount tag {0:?} must be 1 to {TAG_LEN} bytes with no NUL")]
    BadTag(String),
    #[error(transparent)]
    Backend(#[from] frontend::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// The queues the driver activated, and the device's call eventfds.
struct Active {
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<ActivatedQueue>,
}

/// The virtio-fs device.
pub struct Fs {
    tag: String,
    /// `None` once the back end went away.
    backend: Option<Backend>,
    /// Features the guest may have (the back end's, masked).
    avail_features: u64,
    acked_features: u64,
    active: Option<Active>,
    /// One per queue, the back end's to signal; never replaced, so a
    /// restarted ring signals the same fd.
    calls: Vec<EventFd>,
    /// Written by `activate`, `reset` and `resume` so that the event loop
    /// brings the back end's rings in line.
    activate_evt: EventFd,
    /// The back end's rings run.
    started: bool,
    /// The rings that run are from before a reset: stop them even if the
    /// driver activated the device again since.
    stale: bool,
    /// A snapshot holds the rings stopped until [`VirtioDevice::resume`].
    paused: bool,
    /// The socket is registered with the event loop.
    watching: bool,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag)
            .field("connected", &self.backend.is_some())
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// Checks a mount tag: what fits the config space, and no NUL (the guest
/// reads the tag up to the first one).
pub fn check_tag(tag: &str) -> Result<(), Error> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(Error::BadTag(tag.to_string()));
    }
    Ok(())
}

impl Fs {
    /// Connects to the back end at `config.socket` and negotiates with it.
    pub fn new(config: &FsConfig) -> Result<Fs, Error> {
        check_tag(&config.tag)?;
        let backend = Backend::connect(&config.socket, NUM_QUEUES)?;
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fs {
            tag: config.tag.clone(),
            avail_features: backend.guest_features(),
            backend: Some(backend),
            acked_features: 0,
            active: None,
            calls,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            started: false,
            stale: false,
            paused: false,
            watching: false,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether the back end is connected.
    pub fn connected(&self) -> bool {
        self.backend.is_some()
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        c[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    /// The back end is gone or broke the protocol: drop it, and tell the
    /// driver the device needs a reset (its requests get no answer).
    fn lose_backend(&mut self, why: &str) {
        if self.backend.take().is_none() {
            return;
        }
        tracing::warn!(tag = %self.tag, "virtio-fs: dropping the back end: {why}");
        self.started = false;
        if let Some(a) = &self.active {
            if let Err(e) = a.interrupt.signal_needs_reset() {
                tracing::warn!("virtio-fs: cannot interrupt the driver: {e}");
            }
        }
    }

    /// Stops the rings that run, returning where each stood.
    fn stop_rings(&mut self) -> Option<Vec<Option<u16>>> {
        if !std::mem::take(&mut self.started) {
            return None;
        }
        let ready: Vec<bool> = match &self.active {
            Some(a) => a.queues.iter().map(|q| q.queue.ready()).collect(),
            // After a reset: whatever ran, every queue.
            None => vec![true; NUM_QUEUES],
        };
        let backend = self.backend.as_mut()?;
        match backend.stop(&ready) {
            Ok(bases) => Some(bases),
            Err(e) => {
                self.lose_backend(&format!("cannot stop its rings: {e}"));
                None
            }
        }
    }

    /// Brings the back end's rings in line with the driver: stops rings
    /// from before a reset, starts those of an activation.
    fn sync_rings(&mut self) {
        if self.started && (self.active.is_none() || self.stale) {
            self.stop_rings();
        }
        self.stale = false;
        if self.started || self.paused {
            return;
        }
        let (Some(a), Some(backend)) = (&self.active, self.backend.as_mut()) else {
            return;
        };
        if a.interrupt.needs_reset() {
            return;
        }
        let queues: Vec<_> = a
            .queues
            .iter()
            .zip(&self.calls)
            .map(|(q, call)| (q.queue.state(), &q.notify, call))
            .collect();
        match backend.start(&a.mem, self.acked_features, &queues) {
            Ok(()) => {
                self.started = true;
                // Chains made available before the rings ran (or before a
                // snapshot) may have had their kick read by nobody.
                for q in &a.queues {
                    if let Err(e) = q.notify.write(1) {
                        tracing::warn!("virtio-fs: cannot kick a ring: {e}");
                    }
                }
            }
            Err(e) => self.lose_backend(&format!("cannot start its rings: {e}")),
        }
    }

    /// Registers the socket and the call fds once.
    fn watch(&mut self, ops: &mut EventOps) {
        if self.watching {
            return;
        }
        let Some(backend) = &self.backend else { return };
        let fd = backend.socket_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, EVT_SOCKET, EventSet::IN)) {
            tracing::error!("virtio-fs: cannot watch the back end socket: {e:?}");
        }
        for (i, call) in self.calls.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(call, EVT_CALL + i as u32, EventSet::IN)) {
                tracing::error!("virtio-fs: cannot watch call fd {i}: {e:?}");
            }
        }
        self.watching = true;
    }

    /// The socket is readable or hung up outside a request of ours: the
    /// back end closed it, or sent what we never asked for.
    fn socket_event(&mut self, events: EventSet, ops: &mut EventOps) {
        let Some(backend) = &self.backend else { return };
        let fd = backend.socket_fd();
        if !events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !has_input(fd) {
            // A reply that a request on another thread (a snapshot) read
            // before this event was handled.
            return;
        }
        if let Err(e) = ops.remove(Events::with_data_raw(fd, EVT_SOCKET, EventSet::IN)) {
            tracing::debug!("virtio-fs: unregistering the socket: {e:?}");
        }
        self.lose_backend("it closed its socket or sent an unrequested message");
    }
}

/// Whether `fd` has bytes (or an end of stream) to read now.
fn has_input(fd: std::os::fd::RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local buffer; MSG_PEEK leaves the
    // data in the socket and MSG_DONTWAIT keeps it from blocking.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
}

/// The used index the driver sees in the used ring of `state`.
fn used_index(mem: &GuestMemory, state: &QueueState) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(state.used_ring.checked_add(2)?))
        .ok()
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
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
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        if self.backend.is_none() {
            return Err(ActivateError::Backend(
                "the vhost-user back end is gone".into(),
            ));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.activate_evt.write(1).map_err(ActivateError::Wake)
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        self.stale = self.started;
        if let Err(e) = self.activate_evt.write(1) {
            tracing::warn!("virtio-fs: cannot wake the event loop on reset: {e}");
        }
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn quiesce_queues(&mut self) -> Option<Vec<QueueState>> {
        self.active.as_ref()?;
        // Whatever the event loop has not done yet waits for `resume`.
        self.paused = true;
        let bases = if self.started && !self.stale {
            self.stop_rings()
        } else {
            None
        };
        let a = self.active.as_ref()?;
        let mut states: Vec<QueueState> = a.queues.iter().map(|q| q.queue.state()).collect();
        if let Some(bases) = bases {
            for (state, base) in states.iter_mut().zip(bases) {
                let Some(base) = base else { continue };
                // Requests the back end took before its ring stopped are
                // answered by its worker: wait for the used index to catch
                // up, so that none is lost to the snapshot.
                let deadline = Instant::now() + DRAIN_TIMEOUT;
                let mut used = used_index(&a.mem, state);
                while used != Some(base) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                    used = used_index(&a.mem, state);
                }
                if used != Some(base) {
                    tracing::warn!(
                        tag = %self.tag,
                        next_avail = base,
                        ?used,
                        "virtio-fs: requests still in flight at the snapshot"
                    );
                }
                state.next_avail = base;
                state.next_used = used.unwrap_or(base);
            }
        }
        // The device's own copies follow, so that the rings start again
        // from here after the snapshot.
        let a = self.active.as_mut()?;
        for (q, state) in a.queues.iter_mut().zip(&states) {
            if let Ok(queue) = Queue::try_from(*state) {
                q.queue = queue;
            }
        }
        Some(states)
    }

    fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            if let Err(e) = self.activate_evt.write(1) {
                tracing::warn!("virtio-fs: cannot wake the event loop after a snapshot: {e}");
            }
        }
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            EVT_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("virtio-fs: cannot register the activation fd: {e:?}");
        }
        self.watch(ops);
        self.sync_rings();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EVT_ACTIVATE => {
                let _ = self.activate_evt.read();
                self.sync_rings();
            }
            EVT_SOCKET => self.socket_event(events.event_set(), ops),
            data if (EVT_CALL..EVT_CALL + NUM_QUEUES as u32).contains(&data) => {
                let i = (data - EVT_CALL) as usize;
                let _ = self.calls[i].read();
                if let Some(a) = &self.active {
                    if let Err(e) = a.interrupt.signal_used_queue() {
                        tracing::warn!("virtio-fs: cannot interrupt the driver: {e}");
                    }
                }
            }
            other => tracing::warn!(data = other, "unexpected virtio-fs event"),
        }
    }
}
