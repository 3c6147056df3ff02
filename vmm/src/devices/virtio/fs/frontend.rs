//! The vhost-user connection to a virtio-fs back end (virtiofsd), on the
//! `vhost` crate's frontend: negotiation at connect, then starting and
//! stopping the rings.
//!
//! Every exchange has a deadline. The crate retries a socket read that
//! timed out for as long as the socket stays open, so socket timeouts do
//! not bound it; a [`Watchdog`] thread does: an exchange arms it, and one
//! still running at its deadline has the socket shut down under it, which
//! fails the call (and the connection) instead of hanging the monitor.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueState;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{GuestMemory, VIRTIO_F_VERSION_1};

/// How long one exchange with the back end (the negotiation, starting or
/// stopping the rings: a few messages and their replies) may take.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// virtio ring features the guest may have, when the back end offers them:
/// they change the ring layout both sides read, which the back end
/// implements. Nothing that needs the monitor (no IOMMU, no packed rings).
const RING_INDIRECT_DESC: u64 = 1 << 28;
const RING_EVENT_IDX: u64 = 1 << 29;
const GUEST_FEATURES: u64 = VIRTIO_F_VERSION_1 | RING_INDIRECT_DESC | RING_EVENT_IDX;

/// Why talking to the back end failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the vhost-user socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user {op}: {source}")]
    Message {
        op: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the back end did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start the vhost-user watchdog thread")]
    Watchdog(#[source] io::Error),
    #[error("the back end does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NotModern(u64),
    #[error("guest memory region at {addr:#x} has no file the back end can map")]
    Memory { addr: u64 },
    #[error("queue {index}: ring address {addr:#x} is outside guest memory")]
    Ring { index: usize, addr: u64 },
}

fn msg(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Message { op, source }
}

#[derive(Default)]
struct WatchState {
    /// The deadline of the exchange under way.
    armed: Option<Instant>,
    /// The socket was shut down at a deadline.
    fired: bool,
    quit: bool,
}

/// Shuts the socket down when an exchange outlives its deadline.
struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

/// An armed [`Watchdog`]; disarms it when dropped.
struct Armed(Arc<(Mutex<WatchState>, Condvar)>);

impl Watchdog {
    fn new(sock: UnixStream) -> io::Result<Watchdog> {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let theirs = shared.clone();
        let watch = crate::seccomp::Profile::VhostWatch;
        let thread = crate::seccomp::spawn("smol-vhost-watch", watch, move || {
            let (lock, cvar) = &*theirs;
            let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !st.quit {
                st = match st.armed {
                    Some(at) if Instant::now() >= at => {
                        // The crate's read fails at once on a socket
                        // shut down for reading.
                        let _ = sock.shutdown(Shutdown::Both);
                        st.fired = true;
                        st.armed = None;
                        st
                    }
                    Some(at) => {
                        let wait = at.saturating_duration_since(Instant::now());
                        cvar.wait_timeout(st, wait)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                    None => cvar.wait(st).unwrap_or_else(|e| e.into_inner()),
                };
            }
        })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    fn state(&self) -> MutexGuard<'_, WatchState> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arm(&self, budget: Duration) -> Armed {
        self.state().armed = Some(Instant::now() + budget);
        self.shared.1.notify_one();
        Armed(self.shared.clone())
    }

    /// Whether a deadline has passed (the connection is then shut down).
    fn fired(&self) -> bool {
        self.state().fired
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).armed = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state().quit = true;
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connected, negotiated back end.
pub struct Backend {
    frontend: Frontend,
    watchdog: Watchdog,
    /// The virtio features the guest is offered.
    guest_features: u64,
    /// VHOST_USER_F_PROTOCOL_FEATURES was negotiated: rings start disabled
    /// and are enabled with SET_VRING_ENABLE.
    protocol: bool,
    queues: usize,
}

impl Backend {
    /// Connects to the back end at `path` and negotiates: SET_OWNER, its
    /// features, and (when it speaks them) the protocol features we use,
    /// REPLY_ACK among them so that every request is answered.
    pub fn connect(path: &Path, queues: usize) -> Result<Backend, Error> {
        let connect = |source| Error::Connect {
            path: path.to_path_buf(),
            source,
        };
        let sock = UnixStream::connect(path).map_err(connect)?;
        let watchdog =
            Watchdog::new(sock.try_clone().map_err(connect)?).map_err(Error::Watchdog)?;
        let frontend = Frontend::from_stream(sock, queues as u64);
        let armed = watchdog.arm(MESSAGE_TIMEOUT);
        let negotiated = Self::negotiate(frontend, &watchdog);
        drop(armed);
        let (frontend, guest_features, protocol) = negotiated?;
        Ok(Backend {
            frontend,
            watchdog,
            guest_features,
            protocol,
            queues,
        })
    }

    /// The error of a failed exchange: the timeout if the watchdog cut it.
    fn failed(watchdog: &Watchdog, e: Error) -> Error {
        if watchdog.fired() {
            Error::Timeout(MESSAGE_TIMEOUT)
        } else {
            e
        }
    }

    fn negotiate(
        mut frontend: Frontend,
        watchdog: &Watchdog,
    ) -> Result<(Frontend, u64, bool), Error> {
        let r = Self::negotiate_inner(&mut frontend);
        r.map(|(features, protocol)| (frontend, features, protocol))
            .map_err(|e| Self::failed(watchdog, e))
    }

    fn negotiate_inner(frontend: &mut Frontend) -> Result<(u64, bool), Error> {
        frontend.set_owner().map_err(msg("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(msg("GET_FEATURES"))?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::NotModern(offered));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let protocol = offered & protocol_bit != 0;
        if protocol {
            let theirs = frontend
                .get_protocol_features()
                .map_err(msg("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(theirs & wanted)
                .map_err(msg("SET_PROTOCOL_FEATURES"))?;
        }
        Ok((offered & GUEST_FEATURES, protocol))
    }

    /// The features the guest is offered.
    pub fn guest_features(&self) -> u64 {
        self.guest_features
    }

    /// The socket, to watch for the back end going away.
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Hands the back end the guest's memory and rings and starts them:
    /// features, the memory table (each region's memfd and offset), then
    /// for each ready queue its size, addresses, first available index,
    /// call and kick eventfds.
    pub fn start(
        &mut self,
        mem: &GuestMemory,
        acked: u64,
        queues: &[(QueueState, &EventFd, &EventFd)],
    ) -> Result<(), Error> {
        let armed = self.watchdog.arm(MESSAGE_TIMEOUT);
        let r = self.start_inner(mem, acked, queues);
        drop(armed);
        r.map_err(|e| Self::failed(&self.watchdog, e))
    }

    fn start_inner(
        &mut self,
        mem: &GuestMemory,
        acked: u64,
        queues: &[(QueueState, &EventFd, &EventFd)],
    ) -> Result<(), Error> {
        let mut features = acked & self.guest_features;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(msg("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| Error::Memory {
                    addr: vm_memory::GuestMemoryRegion::start_addr(r).0,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(msg("SET_MEM_TABLE"))?;
        for (index, (state, kick, call)) in queues.iter().enumerate() {
            if !state.ready {
                continue;
            }
            self.frontend
                .set_vring_num(index, state.size)
                .map_err(msg("SET_VRING_NUM"))?;
            // The protocol speaks of the rings by their addresses in the
            // frontend's process; the back end maps them back through the
            // memory table.
            let host = |gpa: u64| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| Error::Ring { index, addr: gpa })
            };
            let config = VringConfigData {
                queue_max_size: state.max_size,
                queue_size: state.size,
                flags: 0,
                desc_table_addr: host(state.desc_table)?,
                used_ring_addr: host(state.used_ring)?,
                avail_ring_addr: host(state.avail_ring)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(msg("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, state.next_avail)
                .map_err(msg("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, call)
                .map_err(msg("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(msg("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(msg("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops every ring (GET_VRING_BASE) and returns where each stood: the
    /// index of the next available entry the back end would have taken.
    /// The back end touches no ring afterwards until [`Backend::start`].
    pub fn stop(&mut self, ready: &[bool]) -> Result<Vec<Option<u16>>, Error> {
        let armed = self.watchdog.arm(MESSAGE_TIMEOUT);
        let r = self.stop_inner(ready);
        drop(armed);
        r.map_err(|e| Self::failed(&self.watchdog, e))
    }

    fn stop_inner(&mut self, ready: &[bool]) -> Result<Vec<Option<u16>>, Error> {
        let mut bases = Vec::with_capacity(self.queues);
        for (index, &ready) in ready.iter().enumerate().take(self.queues) {
            if !ready {
                bases.push(None);
                continue;
            }
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(msg("SET_VRING_ENABLE"))?;
            }
            let base = self
                .frontend
                .get_vring_base(index)
                .map_err(msg("GET_VRING_BASE"))?;
            // The reply is the back end's word; an index is 16 bits.
            bases.push(Some(base as u16));
        }
        Ok(bases)
    }
}
