//! The connection muxer: the table of vsock streams, the Unix listener that
//! host processes connect to, and the order in which packets go to the guest.
//!
//! The muxer owns an epoll fd of its own (listener, handshakes, connection
//! streams); the device registers that single fd with the event loop and
//! calls [`VsockMuxer::process_host_events`] when it is readable. Packets are
//! exchanged through [`VsockMuxer::recv_from_guest`] (a TX packet) and
//! [`VsockMuxer::fill_to_guest`] (an RX buffer), so the muxer knows nothing
//! of queues or notifications.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnState, Connection, End};
use super::packet::{self, Header};
use super::unix::{self, PendingHandshake};
use super::Error;

/// Most host streams (connections and handshakes) at once; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RSTs for unknown connections waiting for an RX buffer; a guest that
/// floods garbage without reading loses the excess.
const MAX_PENDING_RST: usize = 1024;
/// First local port for host-initiated connections (high, like ephemeral ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll events handled per `process_host_events` call; the rest stay
/// queued in the epoll and are reported by the next wait.
const EVENT_BATCH: usize = 64;
/// How connection streams are registered (see `Connection::on_host_event`).
fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED
}

/// (local port, peer port): a stream as the guest addresses it.
pub type ConnKey = (u32, u32);

#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    handshakes: HashMap<RawFd, PendingHandshake>,
    conns: HashMap<ConnKey, Connection>,
    fd_keys: HashMap<RawFd, ConnKey>,
    /// Connections with something for the guest, served round-robin.
    to_guest: VecDeque<ConnKey>,
    /// RSTs owed for streams that are gone or never existed.
    rst_queue: VecDeque<ConnKey>,
    next_local_port: u32,
    /// (device, inode) of the socket file we bound, so that drop removes
    /// only our own file, not one a newer device bound at the same path.
    socket_id: Option<(u64, u64)>,
}

impl VsockMuxer {
    /// Binds `uds_path` (replacing a stale socket file) for guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        match std::fs::symlink_metadata(uds_path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(uds_path)
                .map_err(|e| Error::RemoveStale(uds_path.to_owned(), e))?,
            Ok(_) => return Err(Error::NotASocket(uds_path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::RemoveStale(uds_path.to_owned(), e)),
        }
        let listener =
            UnixListener::bind(uds_path).map_err(|e| Error::Bind(uds_path.to_owned(), e))?;
        let muxer = Self::with_listener(guest_cid, uds_path, listener);
        if muxer.is_err() {
            let _ = std::fs::remove_file(uds_path);
        }
        muxer
    }

    fn with_listener(
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
    ) -> Result<Self, Error> {
        listener.set_nonblocking(true).map_err(Error::Listener)?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(Error::Epoll)?;
        Ok(VsockMuxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            fd_keys: HashMap::new(),
            to_guest: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            socket_id: file_id(uds_path),
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The local port the next host connection gets.
    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Continues a snapshot's port numbering: the restored guest may still
    /// hold closing sockets of the ports handed out before, and a new
    /// connection from one of them would be taken for the old one.
    pub fn set_next_local_port(&mut self, port: u32) {
        self.next_local_port = port.max(FIRST_LOCAL_PORT);
    }

    /// Open vsock streams (handshakes not included).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host streams still sending their `CONNECT` line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Whether a packet is waiting for an RX buffer.
    pub fn has_pending_to_guest(&self) -> bool {
        !self.rst_queue.is_empty() || !self.to_guest.is_empty()
    }

    /// The driver reset the device: every stream is closed, nothing is owed.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.to_guest.clear();
        self.rst_queue.clear();
    }

    /// Handles whatever the listener and the host streams report.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("vsock: epoll wait: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept();
            } else if self.handshakes.contains_key(&fd) {
                self.advance_handshake(fd);
            } else if let Some(&key) = self.fd_keys.get(&fd) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.on_host_event(set);
                }
                self.after_change(key);
            } else {
                // A stale event for a stream closed earlier in this batch.
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave it in the backlog for later.
                    tracing::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.handshakes.len() + self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: {MAX_CONNECTIONS} streams open, refusing another");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::debug!("vsock: set_nonblocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            ) {
                tracing::warn!("vsock: epoll add: {e}");
                continue;
            }
            self.handshakes.insert(fd, PendingHandshake::new(stream));
            // The line may already be there.
            self.advance_handshake(fd);
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match hs.advance() {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(e) => {
                tracing::debug!("vsock: host stream closed: {e}");
                if let Some(hs) = self.handshakes.remove(&fd) {
                    self.deregister(hs.stream());
                }
                return;
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let stream = hs.into_stream();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(stream_events(), fd as u64),
        ) {
            tracing::warn!("vsock: epoll modify: {e}");
            self.deregister(&stream);
            return;
        }
        let local_port = self.alloc_local_port(port);
        let key = (local_port, port);
        let conn = Connection::host_initiated(stream, local_port, port);
        tracing::debug!("vsock: host connects to guest port {port} from {local_port}");
        self.fd_keys.insert(fd, key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// Handles a packet the guest put on the TX queue.
    pub fn recv_from_guest<B: BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let hdr = Header::of(pkt);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != packet::HOST_CID {
            tracing::debug!(
                "vsock: dropping {} from cid {} to cid {} (guest is {})",
                packet::op_name(hdr.op),
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != packet::TYPE_STREAM {
            tracing::debug!("vsock: unsupported socket type {}", hdr.type_);
            if hdr.op != packet::OP_RST {
                self.push_rst(key);
            }
            return;
        }
        if !(packet::OP_REQUEST..=packet::OP_CREDIT_REQUEST).contains(&hdr.op) {
            tracing::debug!("vsock: unknown op {} on {}:{}", hdr.op, key.0, key.1);
            if self.conns.contains_key(&key) {
                self.remove(key);
            }
            self.push_rst(key);
            return;
        }
        if self.conns.contains_key(&key) {
            if hdr.op == packet::OP_REQUEST {
                tracing::debug!("vsock: duplicate request on {}:{}", key.0, key.1);
                self.remove(key);
                self.push_rst(key);
                return;
            }
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_guest_packet(&hdr, pkt.data_slice());
            }
            self.after_change(key);
            return;
        }
        match hdr.op {
            packet::OP_REQUEST => self.guest_connect(&hdr),
            packet::OP_RST => {}
            _ => {
                tracing::debug!(
                    "vsock: {} for unknown stream {}:{}",
                    packet::op_name(hdr.op),
                    key.0,
                    key.1
                );
                self.push_rst(key);
            }
        }
    }

    /// The guest connects to host port `hdr.dst_port`: reach
    /// `<uds_path>_<port>` or refuse with RST.
    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.handshakes.len() + self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} streams open, refusing guest connection");
            self.push_rst(key);
            return;
        }
        let path = unix::host_port_path(&self.uds_path, hdr.dst_port);
        let stream = match unix::connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("vsock: guest connect to {}: {e}", path.display());
                self.push_rst(key);
                return;
            }
        };
        if let Err(e) = self.register(&stream, stream_events()) {
            tracing::warn!("vsock: epoll add: {e}");
            self.push_rst(key);
            return;
        }
        let conn = Connection::guest_initiated(stream, hdr);
        self.fd_keys.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    fn push_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            tracing::debug!(
                "vsock: rst queue full, dropping rst for {}:{}",
                key.0,
                key.1
            );
            return;
        }
        self.rst_queue.push_back(key);
    }

    /// Writes the next packet for the guest into `pkt` (an RX buffer);
    /// returns the number of bytes written (header and data), or `None` when
    /// nothing is ready.
    pub fn fill_to_guest<B: BitmapSlice>(&mut self, pkt: &mut VsockPacket<'_, B>) -> Option<u32> {
        if let Some((local, peer)) = self.rst_queue.pop_front() {
            let hdr = Header {
                src_cid: packet::HOST_CID,
                dst_cid: self.guest_cid,
                src_port: local,
                dst_port: peer,
                type_: packet::TYPE_STREAM,
                op: packet::OP_RST,
                ..Header::default()
            };
            hdr.write_to(pkt);
            return Some(PKT_HEADER_SIZE as u32);
        }
        // Each queued connection gets at most one try per call, so one whose
        // stream has nothing after all cannot spin us.
        for _ in 0..self.to_guest.len() {
            let key = self.to_guest.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let hdr = conn.fill_packet(self.guest_cid, pkt.data_slice());
            self.after_change(key);
            if let Some(hdr) = hdr {
                hdr.write_to(pkt);
                return Some(PKT_HEADER_SIZE as u32 + hdr.len);
            }
            // after_change put it back if it still wants to send; it then
            // waits for the next call rather than being retried now.
        }
        // A connection that reset itself during this call owes an RST.
        if !self.rst_queue.is_empty() {
            return self.fill_to_guest(pkt);
        }
        None
    }

    /// Applies what a change to a connection implies: its end, its place in
    /// the queue for the guest.
    fn after_change(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match conn.end() {
            Some(End::Reset) => {
                tracing::debug!("vsock: resetting {}:{}", key.0, key.1);
                self.remove(key);
                self.push_rst(key);
                return;
            }
            Some(End::Forget) => {
                tracing::debug!("vsock: closing {}:{}", key.0, key.1);
                self.remove(key);
                return;
            }
            None => {}
        }
        if conn.wants_to_send() && !conn.queued {
            conn.queued = true;
            self.to_guest.push_back(key);
        }
    }

    fn register(&self, stream: &UnixStream, set: EventSet) -> io::Result<()> {
        let fd = stream.as_raw_fd();
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))
    }

    fn deregister(&self, stream: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Forgets a connection and closes its Unix stream.
    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            // Its place in the queue for the guest goes with it: a stream
            // reset before the guest read its packet would stay there
            // otherwise, and a guest that never posts RX buffers could add
            // one entry per stream for ever.
            if conn.queued {
                self.to_guest.retain(|k| *k != key);
            }
            self.deregister(conn.stream());
            self.fd_keys.remove(&conn.stream().as_raw_fd());
            if conn.state() == ConnState::Connecting {
                tracing::debug!("vsock: guest port {} refused or reset", key.1);
            }
        }
    }
}

#[cfg(any(test, fuzzing))]
impl VsockMuxer {
    /// Checks the bounds that keep a guest from growing the muxer: the
    /// streams, the owed RSTs, the queue for the guest (each connection
    /// in it at most once, and only while it exists) and every
    /// connection's buffers. For the fuzz targets and the unit tests.
    pub fn check_bounds(&self) -> Result<(), String> {
        let streams = self.conns.len() + self.handshakes.len();
        if streams > MAX_CONNECTIONS {
            return Err(format!("{streams} streams, at most {MAX_CONNECTIONS}"));
        }
        if self.rst_queue.len() > MAX_PENDING_RST {
            return Err(format!(
                "{} RSTs owed, at most {MAX_PENDING_RST}",
                self.rst_queue.len()
            ));
        }
        if self.fd_keys.len() != self.conns.len() {
            return Err(format!(
                "{} stream fds for {} connections",
                self.fd_keys.len(),
                self.conns.len()
            ));
        }
        let queued = self.conns.values().filter(|c| c.queued).count();
        if self.to_guest.len() != queued {
            return Err(format!(
                "{} entries in the queue for the guest, {queued} connections queued \
                 ({} open)",
                self.to_guest.len(),
                self.conns.len()
            ));
        }
        for (key, conn) in &self.conns {
            conn.check_bounds()
                .map_err(|e| format!("connection {}:{}: {e}", key.0, key.1))?;
        }
        Ok(())
    }
}

impl AsRawFd for VsockMuxer {
    /// The muxer's epoll fd: readable when a host stream needs attention.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        if self.socket_id.is_some() && file_id(&self.uds_path) == self.socket_id {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}
