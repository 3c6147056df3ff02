//! The relay against the real agent handlers running on the host
//! (`agent::loopback`): a "guest port" here is a host TCP listener, which
//! the agent's `Connect` reaches on 127.0.0.1 as it would in a guest.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::agent::loopback::agent_socket;

/// A "guest" service: each connection gets back what it sent, once the
/// client has half-closed (so the answer needs the half-close to pass).
fn echo_after_eof() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut got = Vec::new();
                if s.read_to_end(&mut got).is_ok() {
                    let _ = s.write_all(&got);
                }
            });
        }
    });
    port
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    _dir: tempfile::TempDir,
    activity: Arc<Activity>,
    relay: PortRelay,
}

fn relay_to(guests: &[u16]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let uds = agent_socket(dir.path());
    let specs: Vec<PortSpec> = guests.iter().map(|g| PortSpec::new(0, *g)).collect();
    let mut relay = PortRelay::bind(&specs).unwrap();
    let activity = Activity::new();
    relay
        .serve(Target {
            uds,
            machine: "m".into(),
            activity: activity.clone(),
        })
        .unwrap();
    Setup {
        _dir: dir,
        activity,
        relay,
    }
}

async fn round_trip(addr: SocketAddr, body: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = c.split();
    let send = async {
        w.write_all(body).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let ((), got) = tokio::join!(send, recv);
    got.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_and_concurrent_connections_arrive_intact() {
    let s = relay_to(&[echo_after_eof()]);
    let m = s.relay.mappings()[0];
    assert_eq!(m.address, std::net::IpAddr::from([127, 0, 0, 1]));
    assert_ne!(m.host, 0, "port 0 became a real port");

    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i ^ (i >> 9)) as u8).collect();
    assert!(
        round_trip(m.host_addr(), &big).await == big,
        "1 MiB changed on the way"
    );

    let mut all = JoinSet::new();
    for i in 0..16u32 {
        let addr = m.host_addr();
        all.spawn(async move {
            let body: Vec<u8> = (0..(20_000 + i * 777))
                .map(|j| (j * (i + 3)) as u8)
                .collect();
            (round_trip(addr, &body).await == body, i)
        });
    }
    while let Some(r) = all.join_next().await {
        let (same, i) = r.unwrap();
        assert!(same, "connection {i} got other bytes back");
    }
}

#[tokio::test]
async fn a_refused_guest_port_ends_the_connection_cleanly() {
    let s = relay_to(&[free_port()]);
    let mut c = TcpStream::connect(s.relay.mappings()[0].host_addr())
        .await
        .unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
        .await
        .expect("the relay closed the connection")
        .expect("an end of stream, not a reset");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_port_in_use_is_named_and_binds_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let free = free_port();
    let e = PortRelay::bind(&[PortSpec::new(free, 80), PortSpec::new(port, 81)])
        .err()
        .unwrap();
    assert!(
        matches!(&e, Error::PortInUse { address } if *address == format!("127.0.0.1:{port}")),
        "{e}"
    );
    // The first listener went with the failed bind.
    std::net::TcpListener::bind(("127.0.0.1", free)).expect("the first port was let go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_relay_closes_listeners_and_connections() {
    // A guest service that never answers nor closes.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let guest = l.local_addr().unwrap().port();
    let held = std::thread::spawn(move || l.accept().map(|(s, _)| s));
    let s = relay_to(&[guest]);
    let addr = s.relay.mappings()[0].host_addr();
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"x").await.unwrap();
    let _guest_side = held.join().unwrap().unwrap();
    let open = || s.activity.open.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        if open() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open(), 1, "a relayed connection counts as open");
    let Setup {
        relay,
        activity,
        _dir,
    } = s;
    drop(relay);
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .expect("the relayed connection ended with the relay");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is gone"
    );
    for _ in 0..100 {
        if activity.open.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(activity.open.load(std::sync::atomic::Ordering::SeqCst), 0);
}
