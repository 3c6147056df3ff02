//! Port forwarding, the guest's side: a `Connect` request becomes a TCP
//! connection to the guest port on loopback, and the request's vsock
//! connection then carries that connection's bytes both ways (see the
//! protocol's `Connect`). No guest network is involved: the host relays
//! its listener's connections over vsock.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::protocol::{AgentError, ErrorKind, Response};
use crate::server::{send_error, send_response, Duplex, ServeError};

/// Longest wait for the guest port to accept. Loopback answers at once
/// (a SYN to a closed port is refused at once); this bounds a listener
/// whose backlog is full.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes moved per read in each direction.
const RELAY_CHUNK: usize = 64 * 1024;

/// Serves `Connect { port }` on `s`: the guest port's connection, or an
/// `Error` frame saying why there is none.
pub fn serve_connect<S: Duplex>(s: &mut S, port: u16) -> Result<(), ServeError> {
    let tcp = match connect(port) {
        Ok(tcp) => tcp,
        Err(e) => {
            send_error(s, &e)?;
            return Ok(());
        }
    };
    send_response(s, &Response::Connected)?;
    s.flush()?;
    relay(s, tcp)?;
    Ok(())
}

/// Connects to `port` on 127.0.0.1, then on ::1 (a service bound to the
/// IPv6 loopback only).
fn connect(port: u16) -> Result<TcpStream, AgentError> {
    if port == 0 {
        return Err(AgentError::new(
            ErrorKind::InvalidArgument,
            "guest port 0 cannot be connected to",
        ));
    }
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let first = match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(tcp) => return Ok(tcp),
        Err(e) => e,
    };
    if first.kind() == io::ErrorKind::ConnectionRefused {
        if let Ok(tcp) = TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT) {
            return Ok(tcp);
        }
        return Err(AgentError::new(
            ErrorKind::ConnectionRefused,
            format!("nothing listens on guest port {port} (127.0.0.1 and ::1)"),
        ));
    }
    let kind = match first.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::Timeout,
        _ => ErrorKind::Io,
    };
    Err(AgentError::new(
        kind,
        format!("connecting to guest port {port}: {first}"),
    ))
}

/// Copies both ways until both directions have ended. An end of stream in
/// one direction is passed on as a half-close; an error in either (a
/// reset) ends both.
fn relay<S: Duplex>(s: &mut S, tcp: TcpStream) -> io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut from_host = s.try_clone()?;
    let mut to_port = tcp.try_clone()?;
    let upstream = std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || {
            let r = pump(&mut from_host, &mut to_port);
            match r {
                Ok(()) => {
                    let _ = to_port.shutdown(Shutdown::Write);
                }
                Err(_) => {
                    // The host side broke: so does the guest connection.
                    let _ = to_port.shutdown(Shutdown::Both);
                    from_host.shutdown_both();
                }
            }
        })?;
    let mut from_port = tcp;
    match pump(&mut from_port, s) {
        Ok(()) => s.shutdown_write(),
        Err(_) => {
            let _ = from_port.shutdown(Shutdown::Both);
            s.shutdown_both();
        }
    }
    // The other direction ends on its own (the peer's end of stream, or
    // the shutdowns above); a panic there is a bug, not the peer's doing.
    let _ = upstream.join();
    Ok(())
}

/// `src` to `dst` until `src` ends; `Err` if either side failed.
fn pump<R: Read, W: Write>(src: &mut R, dst: &mut W) -> io::Result<()> {
    let mut buf = vec![0u8; RELAY_CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests;
