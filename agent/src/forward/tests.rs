use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};

use crate::protocol::{ErrorKind, Request, Response};
use crate::server::testing::connect;

/// A guest port that reads everything, then answers with what it read,
/// reversed, and closes: the answer needs the host's half-close.
fn reversing_server() -> (u16, std::thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.reverse();
        s.write_all(&got).unwrap();
        got.len()
    });
    (port, h)
}

#[test]
fn bytes_go_both_ways_and_half_close_passes_through() {
    let (port, server) = reversing_server();
    let mut c = connect();
    c.send(&Request::Connect { port });
    assert_eq!(c.response().unwrap(), Response::Connected);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut w = c.conn.try_clone().unwrap();
    let sent = body.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    c.conn.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(server.join().unwrap(), body.len());
    let mut want = body;
    want.reverse();
    assert!(
        back == want,
        "{} bytes back, not the reversed body",
        back.len()
    );
}

#[test]
fn a_closed_guest_port_is_refused_by_name() {
    // A port that was just free: nothing listens there now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = connect();
    c.send(&Request::Connect { port });
    let e = c.response().unwrap_err();
    assert_eq!(e.kind, ErrorKind::ConnectionRefused, "{e:?}");
    assert!(e.message.contains(&port.to_string()), "{}", e.message);
    assert!(c.frame().is_none(), "the connection ends after the error");

    let mut c = connect();
    c.send(&Request::Connect { port: 0 });
    assert_eq!(c.response().unwrap_err().kind, ErrorKind::InvalidArgument);
}

#[test]
fn a_guest_port_that_closes_ends_the_host_stream() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"bye").unwrap();
    });
    let mut c = connect();
    c.send(&Request::Connect { port });
    assert_eq!(c.response().unwrap(), Response::Connected);
    server.join().unwrap();
    let mut got = Vec::new();
    c.conn.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    // The host may still send: the guest side is gone, and the relay
    // ends without hanging (the write fails or is dropped).
    let _ = c.conn.write_all(b"late");
    drop(c);
}
