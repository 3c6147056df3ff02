//! The host side of the device: a connected stream socket to passt that
//! speaks qemu's stream framing, each Ethernet frame preceded by its length
//! as a 4-byte big-endian integer.
//!
//! The socket is used without blocking (`MSG_DONTWAIT` on every call, so
//! the descriptor's own flags, shared with whoever else holds it, stay as
//! they are) and with bounded buffers on both sides:
//! - TX holds at most one frame the socket did not take whole; the device
//!   takes no more TX descriptors until it is gone (see [`FrameStream::flush`]);
//! - RX reassembles into one buffer of a length prefix and the largest
//!   frame, and reads nothing more while it holds a whole frame the guest
//!   has no buffer for.
//!
//! Every byte from the socket is untrusted: a length of 0 or above
//! [`MAX_FRAME_LEN`] is a protocol error, after which the stream is of no
//! further use (the framing is lost).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Largest frame either direction carries (the framing could say more;
/// passt never sends more, and an Ethernet frame without offloads is far
/// smaller).
pub const MAX_FRAME_LEN: usize = 65535;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a descriptor cannot serve as the back end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the network back end is not a socket")]
    NotASocket(#[source] io::Error),
    #[error("the network back end is not a stream socket (socket type {0})")]
    NotAStream(libc::c_int),
}

/// Why the stream is no longer usable.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the back end closed the connection")]
    Closed,
    #[error("back end socket error")]
    Io(#[source] io::Error),
    #[error("the back end sent a frame length of {0}")]
    BadLength(u32),
}

/// What [`FrameStream::send_frame`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The socket took all of it.
    Whole,
    /// The socket took part or none of it; the rest waits for
    /// [`FrameStream::flush`].
    Pending,
}

/// A stream socket carrying length-prefixed Ethernet frames.
#[derive(Debug)]
pub struct FrameStream {
    /// Shared with the `NetConfig` it came from, which never uses it.
    fd: Arc<OwnedFd>,
    /// The unsent tail of the one frame the socket did not take whole
    /// (prefix included): `tx_pending[tx_sent..]`.
    tx_pending: Vec<u8>,
    tx_sent: usize,
    /// Received bytes not yet handed on: `rx[rx_start..rx_end]`, at most a
    /// length prefix and the largest frame.
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
}

impl FrameStream {
    /// Checks that `fd` is a stream socket and wraps it.
    pub fn new(fd: Arc<OwnedFd>) -> Result<FrameStream, Error> {
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_TYPE writes one c_int into `kind`, whose size `len`
        // gives; both live for the call, and the fd is open (we hold it).
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(Error::NotASocket(io::Error::last_os_error()));
        }
        if kind != libc::SOCK_STREAM {
            return Err(Error::NotAStream(kind));
        }
        Ok(FrameStream {
            fd,
            tx_pending: Vec::with_capacity(LEN_PREFIX + MAX_FRAME_LEN),
            tx_sent: 0,
            rx: vec![0u8; LEN_PREFIX + MAX_FRAME_LEN].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
        })
    }

    /// The socket, for event-loop registration.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether part of a frame waits for the socket to take it.
    pub fn tx_busy(&self) -> bool {
        self.tx_sent < self.tx_pending.len()
    }

    /// Bytes waiting to be sent (at most a prefix and one frame).
    pub fn tx_pending_len(&self) -> usize {
        self.tx_pending.len() - self.tx_sent
    }

    /// Bytes received and not yet handed on (at most a prefix and one
    /// frame).
    pub fn rx_buffered_len(&self) -> usize {
        self.rx_end - self.rx_start
    }

    /// Sends `frame` (1 to [`MAX_FRAME_LEN`] bytes) with its length prefix.
    /// What the socket does not take is kept for [`FrameStream::flush`];
    /// the caller must not send again while [`FrameStream::tx_busy`].
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<Sent, StreamError> {
        debug_assert!(!self.tx_busy(), "a frame is still pending");
        debug_assert!((1..=MAX_FRAME_LEN).contains(&frame.len()));
        let prefix = (frame.len() as u32).to_be_bytes();
        let sent = match send_vectored(&self.fd, &[&prefix, frame]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(StreamError::Io(e)),
        };
        let total = LEN_PREFIX + frame.len();
        if sent >= total {
            return Ok(Sent::Whole);
        }
        self.tx_pending.clear();
        self.tx_pending.extend_from_slice(&prefix);
        self.tx_pending.extend_from_slice(frame);
        self.tx_sent = sent;
        Ok(Sent::Pending)
    }

    /// Sends what is pending. Returns true once nothing is.
    pub fn flush(&mut self) -> Result<bool, StreamError> {
        while self.tx_busy() {
            match send_vectored(&self.fd, &[&self.tx_pending[self.tx_sent..]]) {
                Ok(n) => self.tx_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        self.tx_pending.clear();
        self.tx_sent = 0;
        Ok(true)
    }

    /// The next whole frame received, reading the socket only if none is
    /// buffered yet; `None` when the socket has no more for now. The frame
    /// stays buffered until [`FrameStream::consume_frame`].
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, StreamError> {
        loop {
            if let Some(len) = self.buffered_frame_len()? {
                let start = self.rx_start + LEN_PREFIX;
                return Ok(Some(&self.rx[start..start + len]));
            }
            if !self.read_more()? {
                return Ok(None);
            }
        }
    }

    /// Drops the frame [`FrameStream::next_frame`] returned.
    pub fn consume_frame(&mut self) {
        if let Ok(Some(len)) = self.buffered_frame_len() {
            self.rx_start += LEN_PREFIX + len;
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            }
        }
    }

    /// The length of the whole frame at the front of the buffer, if one is
    /// there; a bad length prefix is an error as soon as it is complete.
    fn buffered_frame_len(&self) -> Result<Option<usize>, StreamError> {
        let buffered = &self.rx[self.rx_start..self.rx_end];
        let Some(prefix) = buffered.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len == 0 || len as usize > MAX_FRAME_LEN {
            return Err(StreamError::BadLength(len));
        }
        let len = len as usize;
        Ok((buffered.len() >= LEN_PREFIX + len).then_some(len))
    }

    /// One read into the free end of the buffer (moving a partial frame to
    /// the front first, so a whole one always fits). Returns false when the
    /// socket had nothing.
    fn read_more(&mut self) -> Result<bool, StreamError> {
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let free = &mut self.rx[self.rx_end..];
        // Not reached while the frame at the front is incomplete: it fits.
        if free.is_empty() {
            return Ok(false);
        }
        // SAFETY: `recv` writes at most `free.len()` bytes into `free`, a
        // live, exclusively borrowed slice; the fd is open (we hold it).
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                free.as_mut_ptr().cast(),
                free.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Err(StreamError::Closed),
            n if n > 0 => {
                self.rx_end += n as usize;
                Ok(true)
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => Ok(true),
                    _ => Err(StreamError::Io(e)),
                }
            }
        }
    }

    /// Ends the connection for every holder of the socket, so that passt
    /// sees it closed even though the `NetConfig` still holds the fd.
    pub fn shutdown(&self) {
        // SAFETY: shutdown takes no pointers; the fd is open (we hold it).
        let r = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if r < 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "virtio-net: back end shutdown");
        }
    }
}

/// `sendmsg` of `bufs` without blocking and without SIGPIPE (a closed peer
/// is an EPIPE error, not a signal). Retries on EINTR.
fn send_vectored(fd: &OwnedFd, bufs: &[&[u8]]) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 2];
    let count = bufs.len().min(iov.len());
    for (slot, buf) in iov.iter_mut().zip(bufs) {
        slot.iov_base = buf.as_ptr() as *mut libc::c_void;
        slot.iov_len = buf.len();
    }
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = count as _;
    loop {
        // SAFETY: `msg` points at `count` iovecs, each describing a live
        // slice of `bufs` that the kernel only reads; everything outlives
        // the call, and the fd is open (the caller holds it).
        let n = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    fn pair() -> (FrameStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let stream = FrameStream::new(Arc::new(OwnedFd::from(ours))).unwrap();
        (stream, theirs)
    }

    #[test]
    fn refuses_what_is_not_a_stream_socket() {
        let file = tempfile::tempfile().unwrap();
        let err = FrameStream::new(Arc::new(OwnedFd::from(file))).unwrap_err();
        assert!(matches!(err, Error::NotASocket(_)), "{err}");
        let (dgram, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let err = FrameStream::new(Arc::new(OwnedFd::from(dgram))).unwrap_err();
        assert!(matches!(err, Error::NotAStream(libc::SOCK_DGRAM)), "{err}");
    }

    #[test]
    fn frames_go_out_length_prefixed() {
        let (mut s, mut peer) = pair();
        assert_eq!(s.send_frame(b"hello, world!!").unwrap(), Sent::Whole);
        let mut got = [0u8; 18];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &[0, 0, 0, 14]);
        assert_eq!(&got[4..], b"hello, world!!");
    }

    #[test]
    fn frames_come_in_whatever_the_cut() {
        let (mut s, mut peer) = pair();
        let mut wire = Vec::new();
        for len in [60usize, 1514, MAX_FRAME_LEN, 1] {
            wire.extend_from_slice(&(len as u32).to_be_bytes());
            wire.extend((0..len).map(|i| (i + len) as u8));
        }
        // Byte by byte at first, then in big pieces.
        let mut frames = Vec::new();
        let mut at = 0;
        while frames.len() < 4 {
            let step = if at < 100 { 1 } else { 40_000 };
            let end = (at + step).min(wire.len());
            if at < end {
                peer.write_all(&wire[at..end]).unwrap();
                at = end;
            }
            while let Some(f) = s.next_frame().unwrap() {
                frames.push(f.to_vec());
                s.consume_frame();
            }
            assert!(s.rx_buffered_len() <= LEN_PREFIX + MAX_FRAME_LEN);
        }
        let lens: Vec<usize> = frames.iter().map(Vec::len).collect();
        assert_eq!(lens, [60, 1514, MAX_FRAME_LEN, 1]);
        assert!(frames[2]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i + MAX_FRAME_LEN) as u8));
        assert!(s.next_frame().unwrap().is_none());
    }

    #[test]
    fn a_frame_is_kept_until_consumed() {
        let (mut s, mut peer) = pair();
        peer.write_all(&[0, 0, 0, 2, 7, 7, 0, 0, 0, 1, 9]).unwrap();
        assert_eq!(s.next_frame().unwrap(), Some(&[7u8, 7][..]));
        assert_eq!(s.next_frame().unwrap(), Some(&[7u8, 7][..]));
        s.consume_frame();
        assert_eq!(s.next_frame().unwrap(), Some(&[9u8][..]));
        s.consume_frame();
        assert_eq!(s.rx_buffered_len(), 0);
    }

    #[test]
    fn bad_lengths_and_eof_are_errors() {
        for bad in [0u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            let (mut s, mut peer) = pair();
            peer.write_all(&bad.to_be_bytes()).unwrap();
            assert!(
                matches!(s.next_frame(), Err(StreamError::BadLength(l)) if l == bad),
                "length {bad}"
            );
        }
        let (mut s, peer) = pair();
        drop(peer);
        assert!(matches!(s.next_frame(), Err(StreamError::Closed)));
        let (mut s, peer) = pair();
        drop(peer);
        assert!(matches!(s.send_frame(&[1; 60]), Err(StreamError::Io(_))));
    }

    #[test]
    fn a_full_socket_keeps_one_frame_pending() {
        let (mut s, mut peer) = pair();
        let frame = vec![0xab; 1514];
        let mut whole = 0;
        while s.send_frame(&frame).unwrap() == Sent::Whole {
            whole += 1;
            assert!(whole < 100_000, "the socket never filled");
        }
        assert!(s.tx_busy());
        assert!(s.tx_pending_len() <= LEN_PREFIX + frame.len());
        assert!(!s.flush().unwrap(), "still full");
        // The peer drains; the pending frame completes, whole and in order.
        let mut wire = Vec::new();
        peer.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match peer.read(&mut buf) {
                Ok(n) => wire.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let flushed = s.flush().unwrap();
                    if flushed && wire.len() == (whole + 1) * (LEN_PREFIX + frame.len()) {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        for chunk in wire.chunks(LEN_PREFIX + frame.len()) {
            assert_eq!(&chunk[..4], &(frame.len() as u32).to_be_bytes());
            assert!(chunk[4..].iter().all(|&b| b == 0xab));
        }
        assert!(!s.tx_busy());
    }
}
