//! One vsock stream between a guest port and a host Unix stream: its state,
//! the credit flow control in both directions, and what it wants to send next.
//!
//! Guest to host: bytes from TX packets go straight to the Unix stream; what
//! the stream does not take is kept in `to_host`, which the guest cannot grow
//! past the `buf_alloc` we advertise (a guest that tries is reset).
//! `fwd_cnt` counts bytes handed to the Unix stream.
//!
//! Host to guest: bytes are read from the Unix stream directly into RX
//! buffers, never more than the guest's credit
//! (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`); with no credit the stream is
//! not read, which pushes back on the host process.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::packet::{self, Header};
use super::unix::{send_bytes, send_volatile};

/// Receive buffer we advertise per connection: the most guest bytes we ever
/// hold for a Unix stream that is not reading.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Tell the guest about freed space once it believes less than this is free
/// (so a sender never waits on us while we have room).
const CREDIT_UPDATE_LOW_WATER: u32 = CONN_BUF_ALLOC / 2;

/// Most host bytes read at once for RX buffers smaller than this.
pub const READ_AHEAD: usize = 64 * 1024;

// Control packets a connection owes the guest.
const PEND_REQUEST: u8 = 1 << 0;
const PEND_RESPONSE: u8 = 1 << 1;
const PEND_SHUTDOWN: u8 = 1 << 2;
const PEND_CREDIT_UPDATE: u8 = 1 << 3;
const PEND_CREDIT_REQUEST: u8 = 1 << 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// How a connection ends, decided after each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Send RST to the guest and forget the connection.
    Reset,
    /// The guest reset it: forget it silently.
    Forget,
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    state: ConnState,
    pending: u8,
    end: Option<End>,

    // Host to guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The stream reported readable and we have not seen WouldBlock since.
    host_readable: bool,
    /// The stream returned EOF: the host sends no more.
    host_eof: bool,
    /// Host bytes read ahead for small RX buffers; `stash[stash_pos..]` is
    /// still to be delivered.
    stash: Vec<u8>,
    stash_pos: usize,
    /// The host peer is gone (HUP, or a write error): nothing can be written.
    host_gone: bool,
    credit_requested: bool,

    // Guest to host.
    fwd_cnt: Wrapping<u32>,
    last_fwd_sent: Wrapping<u32>,
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that are ours (the `OK` line), not
    /// the guest's, and so outside its credit.
    uncounted: usize,
    guest_shut_rcv: bool,
    guest_shut_send: bool,
    host_write_shut: bool,

    /// In the muxer's queue of connections with something for the guest.
    pub queued: bool,
}

impl Connection {
    /// A host process asked, through the Unix socket, for guest port `peer_port`.
    pub fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, ConnState::Connecting);
        c.pending = PEND_REQUEST;
        // Bytes may have followed the handshake line before the stream was
        // registered edge-triggered; a read tells.
        c.host_readable = true;
        c
    }

    /// The guest asked for host port `local_port` and `stream` reached it.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Self {
        let mut c = Self::new(
            stream,
            request.dst_port,
            request.src_port,
            ConnState::Established,
        );
        c.pending = PEND_RESPONSE;
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            pending: 0,
            end: None,
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            stash: Vec::new(),
            stash_pos: 0,
            host_gone: false,
            credit_requested: false,
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            to_host: VecDeque::new(),
            uncounted: 0,
            guest_shut_rcv: false,
            guest_shut_send: false,
            host_write_shut: false,
            queued: false,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn end(&self) -> Option<End> {
        self.end
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes held for a Unix stream that has not taken them yet.
    pub fn buffered_to_host(&self) -> usize {
        self.to_host.len() - self.uncounted
    }

    fn reset(&mut self) {
        if self.end.is_none() {
            self.end = Some(End::Reset);
        }
    }

    /// Handles a packet from the guest addressed to this connection.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.op == packet::OP_RST {
            self.end = Some(End::Forget);
            return;
        }
        // Every packet carries the guest's current credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        if Wrapping(hdr.fwd_cnt) != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);

        match (hdr.op, self.state) {
            (packet::OP_RESPONSE, ConnState::Connecting) => {
                self.state = ConnState::Established;
                self.write_ok_line();
            }
            (packet::OP_RW, ConnState::Established) => self.on_guest_data(hdr, data),
            (packet::OP_CREDIT_UPDATE, ConnState::Established) => {}
            (packet::OP_CREDIT_REQUEST, ConnState::Established) => {
                self.pending |= PEND_CREDIT_UPDATE;
            }
            (packet::OP_SHUTDOWN, ConnState::Established) => {
                if hdr.flags & packet::SHUTDOWN_RCV != 0 {
                    self.guest_shut_rcv = true;
                }
                if hdr.flags & packet::SHUTDOWN_SEND != 0 {
                    self.guest_shut_send = true;
                }
            }
            (op, state) => {
                tracing::debug!(
                    "vsock: unexpected {} in state {state:?} on {}:{}, resetting",
                    packet::op_name(op),
                    self.local_port,
                    self.peer_port
                );
                self.reset();
            }
        }
        self.refresh();
    }

    fn write_ok_line(&mut self) {
        let line = format!("OK {}\n", self.local_port);
        // Nothing else has been written to the stream yet; if it does not
        // take the whole line at once, the rest waits in `to_host` like data,
        // but outside the guest's credit.
        self.to_host.extend(line.as_bytes());
        self.uncounted = self.to_host.len();
        self.flush_to_host();
    }

    fn on_guest_data<B: BitmapSlice>(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, B>>) {
        let Some(data) = data else { return };
        if self.guest_shut_send {
            tracing::debug!(
                "vsock: data after shutdown on {}, resetting",
                self.local_port
            );
            self.reset();
            return;
        }
        let len = data.len();
        if self.buffered_to_host() + len > CONN_BUF_ALLOC as usize {
            tracing::debug!(
                "vsock: guest overran its credit on {} ({} buffered + {len}), resetting",
                self.local_port,
                self.buffered_to_host()
            );
            self.reset();
            return;
        }
        debug_assert_eq!(len as u32, hdr.len);
        if self.host_gone || self.host_write_shut {
            // Nobody will read it: count it as forwarded so credit keeps flowing.
            self.fwd_cnt += Wrapping(len as u32);
            return;
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            match send_volatile(&self.stream, data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host write on {}: {e}", self.local_port);
                    self.host_gone = true;
                    self.fwd_cnt += Wrapping(len as u32);
                    return;
                }
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        if written < len {
            let rest = &data.subslice(written, len - written);
            if let Ok(rest) = rest {
                let start = self.to_host.len();
                self.to_host.resize(start + rest.len(), 0);
                let (a, b) = self.to_host.as_mut_slices();
                // The new bytes may straddle the ring's wrap point.
                let copied = copy_out(rest, a, b, start);
                debug_assert_eq!(copied, rest.len());
            }
        }
    }

    /// Writes buffered bytes to the Unix stream.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send_bytes(&self.stream, front) {
                Ok(n) => self.consume_to_host(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host write on {}: {e}", self.local_port);
                    self.host_gone = true;
                    self.consume_to_host(self.to_host.len());
                    break;
                }
            }
        }
    }

    /// Drops `n` bytes from the front of `to_host`, written or discarded,
    /// and counts the guest's among them as forwarded.
    fn consume_to_host(&mut self, n: usize) {
        self.to_host.drain(..n);
        let ours = n.min(self.uncounted);
        self.uncounted -= ours;
        self.fwd_cnt += Wrapping((n - ours) as u32);
    }

    /// Handles readiness of the Unix stream. The muxer registers streams
    /// edge-triggered, for IN and OUT, once: the connection remembers
    /// readability until a read would block, and flushes on every OUT edge,
    /// so interest never has to change with credit or buffer state.
    pub fn on_host_event(&mut self, events: EventSet) {
        if events.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush_to_host();
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // The peer closed: what is left unread is still delivered, but
            // nothing can be written any more.
            self.host_gone = true;
            self.host_readable = true;
            self.consume_to_host(self.to_host.len());
        }
        self.refresh();
    }

    /// Whether host bytes may be waiting for the guest (read ahead, or in
    /// a stream that last reported readable).
    fn has_data_for_guest(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_shut_rcv
            && self.end.is_none()
            && (self.has_stash() || (self.host_readable && !self.host_eof))
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_to_send(&self) -> bool {
        self.end.is_none()
            && (self.pending != 0 || (self.has_data_for_guest() && self.peer_credit() > 0))
    }

    /// Re-derives what the connection owes the guest and whether it is done.
    fn refresh(&mut self) {
        if self.end.is_some() {
            return;
        }
        let guest_done_sending = self.guest_shut_send && self.to_host.is_empty();
        if guest_done_sending && !self.host_write_shut && !self.host_gone {
            // Pass the guest's end of stream on to the host process.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let host_done_sending = (self.host_eof && !self.has_stash()) || self.guest_shut_rcv;
        if self.host_gone && self.state == ConnState::Connecting {
            // The guest never heard of it if the REQUEST is still queued.
            self.end = Some(if self.pending & PEND_REQUEST != 0 {
                End::Forget
            } else {
                End::Reset
            });
            return;
        }
        if self.host_gone && host_done_sending {
            self.reset();
            return;
        }
        if (guest_done_sending || self.host_gone) && host_done_sending {
            self.reset();
            return;
        }
        let unannounced = (self.fwd_cnt - self.last_fwd_sent).0;
        let in_flight = unannounced.saturating_add(self.buffered_to_host() as u32);
        let guest_view_free = CONN_BUF_ALLOC.saturating_sub(in_flight);
        if unannounced > 0 && guest_view_free < CREDIT_UPDATE_LOW_WATER {
            self.pending |= PEND_CREDIT_UPDATE;
        }
        if self.has_data_for_guest() && self.peer_credit() == 0 && !self.credit_requested {
            self.pending |= PEND_CREDIT_REQUEST;
            self.credit_requested = true;
        }
    }

    fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: packet::HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: packet::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Writes the next packet for the guest into `pkt`; returns the header,
    /// or `None` when there is nothing to send now.
    pub fn fill_packet<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        let hdr = self.next_packet(guest_cid, data);
        if let Some(h) = &hdr {
            // Every packet tells the guest our fwd_cnt.
            self.last_fwd_sent = Wrapping(h.fwd_cnt);
            self.pending &= !PEND_CREDIT_UPDATE;
        }
        self.refresh();
        hdr
    }

    fn next_packet<B: BitmapSlice>(
        &mut self,
        guest_cid: u64,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if self.end.is_some() {
            return None;
        }
        if self.take(PEND_REQUEST) {
            return Some(self.header(guest_cid, packet::OP_REQUEST));
        }
        if self.take(PEND_RESPONSE) {
            return Some(self.header(guest_cid, packet::OP_RESPONSE));
        }
        if self.has_data_for_guest() && self.peer_credit() > 0 {
            if let Some(data) = data {
                if let Some(n) = self.take_host_data(data) {
                    let mut h = self.header(guest_cid, packet::OP_RW);
                    h.len = n;
                    return Some(h);
                }
            }
        }
        if self.take(PEND_SHUTDOWN) {
            let mut h = self.header(guest_cid, packet::OP_SHUTDOWN);
            h.flags = packet::SHUTDOWN_SEND;
            return Some(h);
        }
        if self.take(PEND_CREDIT_UPDATE) {
            return Some(self.header(guest_cid, packet::OP_CREDIT_UPDATE));
        }
        if self.take(PEND_CREDIT_REQUEST) {
            return Some(self.header(guest_cid, packet::OP_CREDIT_REQUEST));
        }
        None
    }

    fn take(&mut self, bit: u8) -> bool {
        let had = self.pending & bit != 0;
        self.pending &= !bit;
        had
    }

    /// Moves host bytes into an RX data buffer, within the guest's credit.
    ///
    /// Linux posts 4 KiB RX buffers; rather than one read per buffer, a
    /// small buffer is fed from a read-ahead of up to [`READ_AHEAD`] bytes,
    /// never more than the guest's credit, so nothing is read that the guest
    /// could not take anyway.
    fn take_host_data<B: BitmapSlice>(&mut self, data: &VolatileSlice<'_, B>) -> Option<u32> {
        let credit = self.peer_credit() as usize;
        let want = data.len().min(credit);
        if want == 0 {
            return None;
        }
        if !self.has_stash() {
            if want < READ_AHEAD && credit > want {
                self.fill_stash(credit.min(READ_AHEAD))?;
            } else {
                let mut buf = data.subslice(0, want).ok()?;
                let res = retry(|| {
                    (&self.stream).read_volatile(&mut buf).map_err(|e| match e {
                        VolatileMemoryError::IOError(e) => e,
                        e => io::Error::other(e.to_string()),
                    })
                });
                let n = self.after_read(res)?;
                self.tx_cnt += Wrapping(n as u32);
                return Some(n as u32);
            }
        }
        let n = want.min(self.stash.len() - self.stash_pos);
        let dst = data.subslice(0, n).ok()?;
        dst.copy_from(&self.stash[self.stash_pos..self.stash_pos + n]);
        self.stash_pos += n;
        if self.stash_pos == self.stash.len() {
            self.stash.clear();
            self.stash_pos = 0;
        }
        self.tx_cnt += Wrapping(n as u32);
        Some(n as u32)
    }

    fn has_stash(&self) -> bool {
        self.stash_pos < self.stash.len()
    }

    fn fill_stash(&mut self, max: usize) -> Option<()> {
        self.stash.resize(max, 0);
        self.stash_pos = 0;
        let res = retry(|| (&self.stream).read(&mut self.stash));
        let n = self.after_read(res);
        self.stash.truncate(n.unwrap_or(0));
        n.map(|_| ())
    }

    /// Applies the outcome of a host read: `Some(n)` for data, else EOF,
    /// nothing for now, or a dead stream, recorded in the flags.
    fn after_read(&mut self, res: io::Result<usize>) -> Option<usize> {
        match res {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                if !self.host_gone {
                    self.pending |= PEND_SHUTDOWN;
                }
                None
            }
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(e) => {
                tracing::debug!("vsock: host read on {}: {e}", self.local_port);
                self.host_eof = true;
                self.host_gone = true;
                self.host_readable = false;
                None
            }
        }
    }
}

#[cfg(any(test, fuzzing))]
impl Connection {
    /// Checks what bounds the connection's memory: guest bytes held within
    /// the credit we advertise (plus our own `OK` line), the read-ahead
    /// within [`READ_AHEAD`] (and its buffer within twice that). For the
    /// fuzz targets and the unit tests.
    pub fn check_bounds(&self) -> Result<(), String> {
        const OK_LINE_MAX: usize = "OK 4294967295\n".len();
        if self.uncounted > OK_LINE_MAX || self.uncounted > self.to_host.len() {
            return Err(format!(
                "{} uncounted bytes of {} held",
                self.uncounted,
                self.to_host.len()
            ));
        }
        if self.buffered_to_host() > CONN_BUF_ALLOC as usize {
            return Err(format!(
                "{} guest bytes held, the credit is {CONN_BUF_ALLOC}",
                self.buffered_to_host()
            ));
        }
        // Growing to at most READ_AHEAD bytes doubles a capacity below it
        // at most to twice that.
        if self.stash.len() > READ_AHEAD
            || self.stash.capacity() >= 2 * READ_AHEAD
            || self.stash_pos > self.stash.len()
        {
            return Err(format!(
                "read-ahead of {} (capacity {}) at {}",
                self.stash.len(),
                self.stash.capacity(),
                self.stash_pos
            ));
        }
        Ok(())
    }
}

/// Retries an I/O call interrupted by a signal.
fn retry(mut f: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            res => return res,
        }
    }
}

/// Copies `src` into the two halves of a ring buffer, starting at `start`.
fn copy_out<B: BitmapSlice>(
    src: &VolatileSlice<'_, B>,
    a: &mut [u8],
    b: &mut [u8],
    start: usize,
) -> usize {
    let mut done = 0;
    if start < a.len() {
        let n = (a.len() - start).min(src.len());
        done += src.copy_to(&mut a[start..start + n]);
    }
    if done < src.len() {
        let b_start = start.saturating_sub(a.len());
        let rest = match src.offset(done) {
            Ok(rest) => rest,
            Err(_) => return done,
        };
        let n = rest.len().min(b.len().saturating_sub(b_start));
        done += rest.copy_to(&mut b[b_start..b_start + n]);
    }
    done
}
