//! The host side of the vsock: the `CONNECT <port>\n` handshake read from a
//! freshly accepted Unix stream, connections to `<uds_path>_<port>` for
//! guest-initiated streams, and non-blocking sends that never raise SIGPIPE.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// Longest handshake line we accept, newline included. `CONNECT 4294967295\n`
/// is 19 bytes; anything much longer is not a handshake.
pub const MAX_HANDSHAKE_LEN: usize = 32;

/// Why a host connection's handshake failed; the stream is then closed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake line longer than {MAX_HANDSHAKE_LEN} bytes")]
    TooLong,
    #[error("handshake is not `CONNECT <port>`: {0:?}")]
    BadLine(String),
    #[error("bad port in handshake: {0:?}")]
    BadPort(String),
    #[error("peer closed before the handshake line ended")]
    Eof,
    #[error("cannot read handshake")]
    Io(#[source] io::Error),
}

/// Parses a handshake line without its trailing newline.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line)
        .map_err(|_| HandshakeError::BadLine(String::from_utf8_lossy(line).into_owned()))?;
    let port = text
        .strip_prefix("CONNECT ")
        .ok_or_else(|| HandshakeError::BadLine(text.to_owned()))?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HandshakeError::BadPort(port.to_owned()));
    }
    port.parse::<u32>()
        .map_err(|_| HandshakeError::BadPort(port.to_owned()))
}

/// A host stream that has not finished its `CONNECT <port>\n` line yet.
#[derive(Debug)]
pub struct PendingHandshake {
    stream: UnixStream,
    line: Vec<u8>,
}

impl PendingHandshake {
    pub fn new(stream: UnixStream) -> Self {
        PendingHandshake {
            stream,
            line: Vec::with_capacity(MAX_HANDSHAKE_LEN),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads what has arrived of the line: `Ok(Some(port))` once it is
    /// complete, `Ok(None)` when more bytes are needed.
    ///
    /// Reads one byte at a time so that nothing after the newline (the first
    /// bytes of the stream's payload) is consumed here.
    pub fn advance(&mut self) -> Result<Option<u32>, HandshakeError> {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Eof),
                Ok(_) if byte[0] == b'\n' => return parse_connect_line(&self.line).map(Some),
                Ok(_) => {
                    if self.line.len() + 1 >= MAX_HANDSHAKE_LEN {
                        return Err(HandshakeError::TooLong);
                    }
                    self.line.push(byte[0]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }
}

/// Where a guest-initiated connection to host port `port` goes:
/// `<uds_path>_<port>` (Firecracker's convention).
pub fn host_port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(uds_path.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects a non-blocking Unix stream to `path`, without ever blocking the
/// event loop (a listener with a full backlog gives `WouldBlock`).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or malformed",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un that lives across
    // the call, and `len` does not exceed its size.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        // A Unix stream connect completes at once or fails; EINPROGRESS is
        // not expected, EAGAIN means the listener's backlog is full.
        return Err(err);
    }
    Ok(UnixStream::from(fd))
}

/// One non-blocking `send` of `buf`; MSG_NOSIGNAL turns a closed peer into
/// EPIPE instead of a process-killing SIGPIPE.
pub fn send_bytes(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice for reads of `buf.len()` bytes and the
    // fd is owned by `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Like [`send_bytes`], from guest memory.
pub fn send_volatile<B: BitmapSlice>(
    stream: &UnixStream,
    buf: &VolatileSlice<'_, B>,
) -> io::Result<usize> {
    let guard = buf.ptr_guard();
    // SAFETY: a VolatileSlice points at `buf.len()` bytes of mapped guest
    // memory that stay mapped while `guard` lives; the kernel copies them
    // out, so concurrent guest writes only change what is sent.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            guard.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024").unwrap(), 1024);
        assert_eq!(parse_connect_line(b"CONNECT 0\r").unwrap(), 0);
        assert_eq!(parse_connect_line(b"CONNECT 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 4294967296",
            b"CONNECT 12 ",
            b"connect 12",
            b"HELLO",
            b"CONNECT \xff",
            b"",
        ] {
            assert!(parse_connect_line(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn handshake_arrives_in_pieces_and_leaves_payload() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut hs = PendingHandshake::new(server);
        assert!(hs.advance().unwrap().is_none());
        client.write_all(b"CONN").unwrap();
        assert!(hs.advance().unwrap().is_none());
        client.write_all(b"ECT 52\npayload").unwrap();
        assert_eq!(hs.advance().unwrap(), Some(52));
        let mut rest = [0u8; 7];
        hs.into_stream().read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn handshake_rejects_long_lines_and_eof() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut hs = PendingHandshake::new(server);
        client.write_all(&[b'A'; 100]).unwrap();
        assert!(matches!(hs.advance(), Err(HandshakeError::TooLong)));

        let (client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut hs = PendingHandshake::new(server);
        drop(client);
        assert!(matches!(hs.advance(), Err(HandshakeError::Eof)));
    }

    #[test]
    fn host_port_path_appends_port() {
        assert_eq!(
            host_port_path(Path::new("/run/m/v.sock"), 52),
            PathBuf::from("/run/m/v.sock_52")
        );
    }

    #[test]
    fn connects_nonblocking_and_sends_without_sigpipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        assert!(connect_nonblocking(&path).is_err());
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        let (peer, _) = listener.accept().unwrap();
        assert_eq!(send_bytes(&stream, b"hi").unwrap(), 2);
        drop(peer);
        // The peer is gone: EPIPE or ECONNRESET, and no SIGPIPE.
        let mut failed = false;
        for _ in 0..4 {
            if send_bytes(&stream, b"x").is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(connect_nonblocking(Path::new("")).is_err());
        let long = PathBuf::from("/".repeat(200));
        assert!(connect_nonblocking(&long).is_err());
    }
}
