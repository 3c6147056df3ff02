//! Device tests with plain guest memory (no KVM): a test driver owns the
//! rings, real Unix sockets play the host processes, and a real
//! `EventManager` runs the device's event-loop glue.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::*;
use super::*;
use crate::devices::virtio::test_queue::{DriverQueue, F_NEXT};
use crate::devices::virtio::{GuestMemory, Interrupt, VirtioDevice};

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 64 << 20;
/// Leaves a few of the 256 descriptors free for odd chains.
const RX_BUFS: u16 = 120;
const RX_DATA_LEN: u32 = 4096;
const RX_SLOT: u64 = 0x2000;
const RX_BASE: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_2000;
const TX_SLOTS: u64 = 64;
const TX_BASE: u64 = 0x100_0000;

/// A packet as the guest sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

fn encode(h: &Header) -> [u8; 44] {
    let mut raw = [0u8; 44];
    raw[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    raw[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    raw[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    raw[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    raw[24..28].copy_from_slice(&h.len.to_le_bytes());
    raw[28..30].copy_from_slice(&h.type_.to_le_bytes());
    raw[30..32].copy_from_slice(&h.op.to_le_bytes());
    raw[32..36].copy_from_slice(&h.flags.to_le_bytes());
    raw[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    raw[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    raw
}

fn decode(raw: &[u8; 44]) -> Header {
    let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().unwrap());
    Header {
        src_cid: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
        dst_cid: u64::from_le_bytes(raw[8..16].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16::from_le_bytes([raw[28], raw[29]]),
        op: u16::from_le_bytes([raw[30], raw[31]]),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// A guest packet on stream (guest_port -> host_port).
fn gpkt(op: u16, guest_port: u32, host_port: u32) -> Pkt {
    Pkt {
        hdr: Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 256 * 1024,
            ..Header::default()
        },
        data: Vec::new(),
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemory,
    em: EventManager<Arc<Mutex<Vsock>>>,
    dev: Arc<Mutex<Vsock>>,
    rx: DriverQueue,
    tx: DriverQueue,
    ev: DriverQueue,
    rx_slots: HashMap<u16, u64>,
    tx_next: u64,
    irq: EventFd,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = DriverQueue::new(&mem, 0, 256);
        let (tx, txq) = DriverQueue::new(&mem, 0x4000, 256);
        let (ev, evq) = DriverQueue::new(&mem, 0x8000, 256);
        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = irq_evt.try_clone().unwrap();
        dev.lock()
            .unwrap()
            .activate(mem.clone(), Interrupt::new(irq_evt), vec![rxq, txq, evq])
            .unwrap();
        let mut h = Harness {
            _dir: dir,
            uds,
            mem,
            em,
            dev,
            rx,
            tx,
            ev,
            rx_slots: HashMap::new(),
            tx_next: 0,
            irq,
        };
        for i in 0..u64::from(RX_BUFS) {
            h.post_rx(RX_BASE + i * RX_SLOT);
        }
        h.rx.kick();
        h.pump();
        h
    }

    fn post_rx(&mut self, slot: u64) {
        let head = self.rx.add(
            &self.mem,
            &[(slot, 44, true), (slot + 0x100, RX_DATA_LEN, true)],
        );
        self.rx_slots.insert(head, slot);
    }

    /// Runs the event loop until it is idle.
    fn pump(&mut self) {
        let mut idle = 0;
        while idle < 3 {
            match self.em.run_with_timeout(0).unwrap() {
                0 => idle += 1,
                _ => idle = 0,
            }
        }
    }

    /// Every packet the device delivered, in order; the buffers are reposted.
    fn recv(&mut self) -> Vec<Pkt> {
        self.pump();
        let mut out = Vec::new();
        loop {
            let used = self.rx.take_used(&self.mem);
            if used.is_empty() {
                break;
            }
            for (head, len) in used {
                let slot = *self.rx_slots.get(&head).unwrap_or_else(|| {
                    panic!(
                        "head {head} len {len} keys {:?}",
                        self.rx_slots.keys().collect::<Vec<_>>()
                    )
                });
                self.rx_slots.remove(&head);
                if len > 0 {
                    let mut raw = [0u8; 44];
                    self.mem.read_slice(&mut raw, GuestAddress(slot)).unwrap();
                    let hdr = decode(&raw);
                    assert_eq!(len, 44 + hdr.len, "used len matches header");
                    let mut data = vec![0u8; hdr.len as usize];
                    self.mem
                        .read_slice(&mut data, GuestAddress(slot + 0x100))
                        .unwrap();
                    out.push(Pkt { hdr, data });
                }
                self.post_rx(slot);
            }
            self.rx.kick();
            self.pump();
        }
        out
    }

    fn next_tx_slot(&mut self) -> u64 {
        let slot = TX_BASE + (self.tx_next % TX_SLOTS) * TX_SLOT;
        self.tx_next += 1;
        slot
    }

    /// Puts one guest packet on the TX queue and lets the device run.
    fn send(&mut self, mut p: Pkt) {
        p.hdr.len = p.data.len() as u32;
        let slot = self.next_tx_slot();
        self.mem
            .write_slice(&encode(&p.hdr), GuestAddress(slot))
            .unwrap();
        if p.data.is_empty() {
            self.tx.add(&self.mem, &[(slot, 44, false)]);
        } else {
            self.mem
                .write_slice(&p.data, GuestAddress(slot + 0x100))
                .unwrap();
            self.tx.add(
                &self.mem,
                &[
                    (slot, 44, false),
                    (slot + 0x100, p.data.len() as u32, false),
                ],
            );
        }
        self.tx.kick();
        self.pump();
        self.tx.take_used(&self.mem);
    }

    fn host_connect(&mut self, port: u32) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        self.pump();
        s
    }

    /// Host connects, the guest accepts with `guest_buf` of credit.
    /// Returns the host stream and the host-side local port.
    fn establish(&mut self, port: u32, guest_buf: u32) -> (UnixStream, u32) {
        let mut s = self.host_connect(port);
        let pkts = self.recv();
        let req = pkts
            .iter()
            .find(|p| p.hdr.op == OP_REQUEST && p.hdr.dst_port == port)
            .expect("request")
            .clone();
        let local = req.hdr.src_port;
        let mut resp = gpkt(OP_RESPONSE, port, local);
        resp.hdr.buf_alloc = guest_buf;
        self.send(resp);
        assert_eq!(read_line(&mut s), format!("OK {local}"));
        (s, local)
    }

    /// Reads `n` bytes from a host stream, running the device meanwhile (it
    /// may be holding bytes the stream had no room for).
    fn read_host(&mut self, s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut idle = 0;
        while got.len() < n {
            match s.read(&mut buf[..(n - got.len()).min(64 * 1024)]) {
                Ok(0) => break,
                Ok(k) => {
                    got.extend_from_slice(&buf[..k]);
                    idle = 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    idle += 1;
                    assert!(idle < 1000, "stalled after {} of {n} bytes", got.len());
                    self.pump();
                }
                Err(e) => panic!("host read: {e}"),
            }
        }
        s.set_nonblocking(false).unwrap();
        got
    }

    fn conns(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        assert_eq!(s.read(&mut b).unwrap(), 1, "stream ended inside a line");
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

/// Reads until EOF or error; true if the stream ended (EOF or reset).
fn ends(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn rw_data(pkts: &[Pkt], local: u32) -> Vec<u8> {
    pkts.iter()
        .filter(|p| p.hdr.op == OP_RW && p.hdr.src_port == local)
        .flat_map(|p| p.data.clone())
        .collect()
}

#[test]
fn handshake_in_pieces_then_request_response_ok() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONN").unwrap();
    h.pump();
    assert!(h.recv().is_empty());
    // Payload right behind the line must wait for the guest's RESPONSE.
    s.write_all(b"ECT 1024\nearly").unwrap();
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = &pkts[0].hdr;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    assert!(h.irq.read().is_ok(), "interrupt raised");

    let mut resp = gpkt(OP_RESPONSE, 1024, req.src_port);
    resp.hdr.buf_alloc = 64 * 1024;
    h.send(resp);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    let pkts = h.recv();
    assert_eq!(rw_data(&pkts, req.src_port), b"early");
    assert_eq!(h.conns(), 1);
}

/// Issue 15: while a snapshot copies guest memory (between quiesce and
/// resume), bytes a host stream sends are not written into the guest's
/// buffers; they arrive after the snapshot.
#[test]
fn a_snapshot_holds_host_data_until_it_resumes() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 20);
    let saved = h.dev.lock().unwrap().quiesce_queues().unwrap();
    let used_before: u16 = h.mem.read_obj(GuestAddress(h.rx.used + 2)).unwrap();
    s.write_all(b"during the snapshot").unwrap();
    for _ in 0..20 {
        h.em.run_with_timeout(5).unwrap();
    }
    let used_now: u16 = h.mem.read_obj(GuestAddress(h.rx.used + 2)).unwrap();
    assert_eq!(used_now, used_before, "guest memory unchanged while paused");
    assert_eq!(saved[0].next_used, used_before);
    h.dev.lock().unwrap().resume();
    let pkts = h.recv();
    assert_eq!(rw_data(&pkts, local), b"during the snapshot");
}

/// A restored device tells the guest of a transport reset; a host stream
/// that arrives before the driver has handled it must wait: the guest
/// resets every connected socket when it does, without telling the host,
/// so a stream accepted before would hang (a warm create's second
/// request did, once in many). It goes ahead on the driver's kick.
#[test]
fn after_a_restore_host_streams_wait_for_the_reset_to_be_handled() {
    const EVENT_SLOT: u64 = 0x3_0000;
    let mut h = Harness::new();
    let head = h.ev.add(&h.mem, &[(EVENT_SLOT, 4, true)]);
    h.dev.lock().unwrap().restored(&DeviceState::Vsock {
        next_local_port: 1 << 30,
    });
    let posted = h.ev.take_used(&h.mem);
    assert_eq!(posted, vec![(head, 4)], "the reset event is posted");
    let event: u32 = h.mem.read_obj(GuestAddress(EVENT_SLOT)).unwrap();
    assert_eq!(event, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");

    // As on a restore: the event loop sees the activation, and a host
    // process connects at once.
    h.dev.lock().unwrap().activate_evt.write(1).unwrap();
    let _s = h.host_connect(1024);
    for _ in 0..5 {
        h.em.run_with_timeout(5).unwrap();
    }
    let early = h.recv();
    assert!(
        early.iter().all(|p| p.hdr.op != OP_REQUEST),
        "a connection request reached the guest before it handled the reset: {early:?}"
    );

    // The driver handles the event, refills and kicks.
    h.ev.add(&h.mem, &[(EVENT_SLOT, 4, true)]);
    h.ev.kick();
    let pkts = h.recv();
    assert!(
        pkts.iter()
            .any(|p| p.hdr.op == OP_REQUEST && p.hdr.dst_port == 1024),
        "the waiting stream goes ahead after the kick: {pkts:?}"
    );
}

#[test]
fn data_flows_both_ways() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 20);
    let out = pattern(100_000, 1);
    s.write_all(&out).unwrap();
    let pkts = h.recv();
    assert!(pkts.iter().all(|p| p.hdr.len <= RX_DATA_LEN));
    assert_eq!(rw_data(&pkts, local), out);
    for p in &pkts {
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, 1024));
    }

    let back = pattern(150_000, 7);
    for chunk in back.chunks(60_000) {
        let mut p = gpkt(OP_RW, 1024, local);
        p.data = chunk.to_vec();
        h.send(p);
    }
    let mut got = vec![0u8; back.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, back);
}

#[test]
fn host_never_sends_past_guest_credit() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 6000);
    let out = pattern(20_000, 3);
    s.write_all(&out).unwrap();
    let mut got = Vec::new();
    let mut fwd = 0u32;
    while got.len() < out.len() {
        let pkts = h.recv();
        let data = rw_data(&pkts, local);
        assert!(!data.is_empty(), "stalled at {}", got.len());
        assert!(
            got.len() + data.len() <= fwd as usize + 6000,
            "credit exceeded"
        );
        got.extend(data);
        assert!(h.recv().is_empty(), "sent more without new credit");
        // Out of credit: the device asked for an update.
        if got.len() < out.len() {
            assert!(pkts.iter().any(|p| p.hdr.op == OP_CREDIT_REQUEST));
        }
        fwd = got.len() as u32;
        let mut upd = gpkt(OP_CREDIT_UPDATE, 1024, local);
        upd.hdr.buf_alloc = 6000;
        upd.hdr.fwd_cnt = fwd;
        h.send(upd);
    }
    assert_eq!(got, out);
}

#[test]
fn credit_updates_follow_the_host_reader() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 20);
    // An explicit request is answered with our counters.
    h.send(gpkt(OP_CREDIT_REQUEST, 1024, local));
    let pkts = h.recv();
    let upd = pkts
        .iter()
        .find(|p| p.hdr.op == OP_CREDIT_UPDATE)
        .expect("credit update");
    assert_eq!((upd.hdr.buf_alloc, upd.hdr.fwd_cnt), (CONN_BUF_ALLOC, 0));

    // The guest fills its whole credit while the host reads nothing.
    let data = pattern(CONN_BUF_ALLOC as usize, 9);
    for chunk in data.chunks(64 * 1024) {
        let mut p = gpkt(OP_RW, 1024, local);
        p.data = chunk.to_vec();
        h.send(p);
    }
    assert_eq!(h.conns(), 1, "a guest within its credit is not reset");
    let mut fwd = h
        .recv()
        .iter()
        .filter(|p| p.hdr.src_port == local)
        .map(|p| p.hdr.fwd_cnt)
        .next_back()
        .unwrap_or(0);
    assert_eq!(h.read_host(&mut s, data.len()), data);

    // Then a guest that only ever sends within the credit we announce
    // streams 4 MiB to a slow host reader without a stall or a reset.
    let total = 4 << 20;
    let data = pattern(total, 11);
    let mut sent = 0usize;
    let mut got = Vec::new();
    let base = CONN_BUF_ALLOC as usize;
    let mut rounds = 0;
    s.set_nonblocking(true).unwrap();
    while got.len() < total {
        rounds += 1;
        assert!(rounds < 10_000, "stalled: sent {sent}, got {}", got.len());
        let credit = CONN_BUF_ALLOC as usize - (base + sent - fwd as usize);
        let n = credit.min(64 * 1024).min(total - sent);
        if n > 0 {
            let mut p = gpkt(OP_RW, 1024, local);
            p.data = data[sent..sent + n].to_vec();
            h.send(p);
            sent += n;
        }
        for p in h.recv() {
            assert_ne!(p.hdr.op, OP_RST);
            fwd = p.hdr.fwd_cnt;
        }
        let mut buf = [0u8; 16 * 1024];
        match s.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got == data, "stream corrupted");
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 20);
    let mut reset = false;
    for _ in 0..64 {
        let mut p = gpkt(OP_RW, 1024, local);
        p.data = vec![0xAB; 64 * 1024];
        h.send(p);
        if h.recv().iter().any(|p| p.hdr.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "4 MiB past a 256 KiB credit without a reset");
    assert_eq!(h.conns(), 0);
    assert!(ends(&mut s));
}

#[test]
fn many_connections_stay_apart() {
    let mut h = Harness::new();
    let n = 64u32;
    let mut hosts = Vec::new();
    for i in 0..n {
        hosts.push(h.host_connect(2000 + i));
    }
    let pkts = h.recv();
    let reqs: Vec<_> = pkts.iter().filter(|p| p.hdr.op == OP_REQUEST).collect();
    assert_eq!(reqs.len(), n as usize);
    let mut local_of = HashMap::new();
    for r in reqs {
        local_of.insert(r.hdr.dst_port, r.hdr.src_port);
        h.send(gpkt(OP_RESPONSE, r.hdr.dst_port, r.hdr.src_port));
    }
    let mut locals = std::collections::HashSet::new();
    for (i, s) in hosts.iter_mut().enumerate() {
        let port = 2000 + i as u32;
        let local = local_of[&port];
        assert_eq!(read_line(s), format!("OK {local}"));
        assert!(locals.insert(local), "local ports are unique");
        s.write_all(format!("from host {i}").as_bytes()).unwrap();
    }
    let pkts = h.recv();
    for i in 0..n {
        let port = 2000 + i;
        let local = local_of[&port];
        assert_eq!(rw_data(&pkts, local), format!("from host {i}").as_bytes());
        let mut p = gpkt(OP_RW, port, local);
        p.data = format!("from guest {i}").into_bytes();
        h.send(p);
    }
    for (i, s) in hosts.iter_mut().enumerate() {
        let want = format!("from guest {i}");
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, want.as_bytes());
    }
    assert_eq!(h.conns(), n as usize);
    drop(hosts);
    let pkts = h.recv();
    let rsts = pkts.iter().filter(|p| p.hdr.op == OP_RST).count();
    assert_eq!(rsts, n as usize);
    assert_eq!(h.conns(), 0);
}

#[test]
fn garbage_descriptors_are_dropped_and_the_queue_moves_on() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let slot = h.next_tx_slot();
    let mut good = gpkt(OP_RW, 1, 2);
    good.hdr.len = 100;
    let raw = encode(&good.hdr);
    mem.write_slice(&raw, GuestAddress(slot)).unwrap();
    let huge = {
        let mut hd = good.hdr;
        hd.len = 1 << 20;
        encode(&hd)
    };
    let hslot = h.next_tx_slot();
    mem.write_slice(&huge, GuestAddress(hslot)).unwrap();

    let bad_chains: Vec<Vec<(u64, u32, bool)>> = vec![
        vec![(slot, 10, false)],                                // header too short
        vec![(slot, 44, true)],                                 // write-only header
        vec![(0xffff_0000_0000, 44, false)],                    // outside memory
        vec![(MEM_SIZE as u64 - 20, 44, false)],                // straddles the end
        vec![(hslot, 44, false), (hslot + 0x100, 4096, false)], // len past the maximum
        vec![(slot, 44, false)],                                // len 100 but no data
        vec![(slot, 44, false), (slot + 0x100, 50, false)],     // data shorter than len
        vec![(slot, 44, false), (slot + 0x100, 100, true)],     // write-only data
    ];
    let count = bad_chains.len();
    for chain in &bad_chains {
        h.tx.add(&mem, chain);
    }
    // A descriptor whose `next` points at itself, and one pointing past the table.
    let looped = h.tx.free.pop().unwrap();
    h.tx.add_raw(&mem, &[(looped, slot, 44, F_NEXT, looped)], looped);
    let dangling = h.tx.free.pop().unwrap();
    h.tx.add_raw(&mem, &[(dangling, slot, 44, F_NEXT, 4000)], dangling);
    h.tx.kick();
    h.pump();
    let used = h.tx.take_used(&mem);
    assert_eq!(used.len(), count + 2, "every chain is returned");

    // Well-formed packets with bad contents.
    let mut wrong_cid = gpkt(OP_REQUEST, 5, 6);
    wrong_cid.hdr.src_cid = 77;
    h.send(wrong_cid);
    let mut to_other = gpkt(OP_REQUEST, 5, 6);
    to_other.hdr.dst_cid = 9;
    h.send(to_other);
    assert!(h.recv().is_empty(), "wrong cids are dropped silently");

    let mut seqpacket = gpkt(OP_REQUEST, 5, 6);
    seqpacket.hdr.type_ = 2;
    h.send(seqpacket);
    h.send(gpkt(99, 5, 7));
    h.send(gpkt(OP_RW, 5, 8));
    h.send(gpkt(OP_RST, 5, 9));
    let pkts = h.recv();
    let rsts: Vec<_> = pkts
        .iter()
        .map(|p| (p.hdr.op, p.hdr.src_port, p.hdr.dst_port))
        .collect();
    assert_eq!(
        rsts,
        vec![(OP_RST, 6, 5), (OP_RST, 7, 5), (OP_RST, 8, 5)],
        "rst for bad type, bad op, unknown stream; nothing for rst"
    );

    // A read-only RX buffer is returned empty and the next one is used.
    let bad_rx = h.rx.add(&mem, &[(RX_BASE + 200 * RX_SLOT, 44, false)]);
    let _ = bad_rx;
    h.rx.kick();
    let (mut s, local) = h.establish(1024, 1 << 16);
    s.write_all(b"still alive").unwrap();
    assert_eq!(rw_data(&h.recv(), local), b"still alive");
}

#[test]
fn bad_handshakes_close_the_stream() {
    let mut h = Harness::new();
    let lines: [&[u8]; 5] = [
        b"HELLO\n",
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        b"CONNECT -1\n",
        &[b'A'; 100],
    ];
    for line in lines {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.write_all(line).unwrap();
        h.pump();
        assert!(ends(&mut s), "{line:?} kept open");
    }
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 5").unwrap();
    h.pump();
    drop(s);
    h.pump();
    assert!(h.recv().is_empty());
    assert_eq!(h.dev.lock().unwrap().muxer.handshake_count(), 0);
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_rst_refuses_the_host_connection() {
    let mut h = Harness::new();
    let mut s = h.host_connect(4444);
    let pkts = h.recv();
    let local = pkts[0].hdr.src_port;
    h.send(gpkt(OP_RST, 4444, local));
    assert!(ends(&mut s));
    assert_eq!(h.conns(), 0);
    assert!(h.recv().is_empty(), "no rst answers an rst");
}

#[test]
fn host_half_close_then_close() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 16);
    s.write_all(b"last words").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let pkts = h.recv();
    assert_eq!(rw_data(&pkts, local), b"last words");
    let shut = pkts.last().unwrap();
    assert_eq!((shut.hdr.op, shut.hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The guest may still answer.
    let mut p = gpkt(OP_RW, 1024, local);
    p.data = b"reply".to_vec();
    h.send(p);
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");
    drop(s);
    let pkts = h.recv();
    assert_eq!(pkts.last().unwrap().hdr.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn host_close_delivers_pending_data_then_rst() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 20);
    let out = pattern(50_000, 5);
    s.write_all(&out).unwrap();
    drop(s);
    let pkts = h.recv();
    assert_eq!(rw_data(&pkts, local), out);
    assert_eq!(pkts.last().unwrap().hdr.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_shutdown_ends_the_host_stream() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 16);
    let mut p = gpkt(OP_RW, 1024, local);
    p.data = b"bye".to_vec();
    h.send(p);
    let mut shut = gpkt(OP_SHUTDOWN, 1024, local);
    shut.hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    let pkts = h.recv();
    assert_eq!(pkts.last().unwrap().hdr.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_send_shutdown_is_a_half_close() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 16);
    let mut shut = gpkt(OP_SHUTDOWN, 1024, local);
    shut.hdr.flags = SHUTDOWN_SEND;
    h.send(shut);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
    // The host can still talk to the guest.
    s.write_all(b"answer").unwrap();
    assert_eq!(rw_data(&h.recv(), local), b"answer");
    assert_eq!(h.conns(), 1);
    s.shutdown(Shutdown::Write).unwrap();
    let pkts = h.recv();
    assert_eq!(pkts.last().unwrap().hdr.op, OP_RST, "both sides done");
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_connects_to_a_host_port() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    let mut req = gpkt(OP_REQUEST, 7000, 5000);
    req.hdr.buf_alloc = 1 << 16;
    h.send(req);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    let resp = &pkts[0].hdr;
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 7000));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut p = gpkt(OP_RW, 7000, 5000);
    p.data = b"ping".to_vec();
    h.send(p);
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(rw_data(&h.recv(), 5000), b"pong");

    // Nobody listens on 5001.
    h.send(gpkt(OP_REQUEST, 7001, 5001));
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].hdr.op, pkts[0].hdr.src_port, pkts[0].hdr.dst_port),
        (OP_RST, 5001, 7001)
    );
    // A second REQUEST on a live stream resets it.
    h.send(gpkt(OP_REQUEST, 7000, 5000));
    assert_eq!(h.recv().last().unwrap().hdr.op, OP_RST);
    assert!(ends(&mut s));
    assert_eq!(h.conns(), 0);
}

#[test]
fn device_reset_closes_every_stream() {
    let mut h = Harness::new();
    let (mut s, _) = h.establish(1024, 1 << 16);
    assert!(h.dev.lock().unwrap().reset());
    h.pump();
    assert!(!h.dev.lock().unwrap().is_activated());
    assert!(ends(&mut s));
    assert_eq!(h.conns(), 0);
}

#[test]
fn device_identity_config_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // A stale socket file is replaced.
    let stale = UnixListener::bind(&uds).unwrap();
    drop(stale);
    let mut dev = Vsock::new(42, &uds).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(
        dev.avail_features(),
        crate::devices::virtio::VIRTIO_F_VERSION_1
    );
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features, dev.avail_features());
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 42);
    let mut hi = [0u8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut lo = [0xffu8; 4];
    dev.read_config(0, &mut lo);
    assert_eq!(lo, [42, 0, 0, 0]);
    let mut out = [0xeeu8; 4];
    dev.read_config(6, &mut out);
    dev.read_config(u64::MAX, &mut out);
    assert_eq!(out, [0xee; 4], "out of range reads leave data alone");
    dev.write_config(0, &[1, 2]);
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 42);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (_, q) = DriverQueue::new(&mem, 0, 16);
    let err = dev
        .activate(mem, Interrupt::new(EventFd::new(0).unwrap()), vec![q])
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 3,
            got: 1
        }
    ));
    assert!(!dev.is_activated());

    assert!(matches!(
        Vsock::new(2, &dir.path().join("a")),
        Err(Error::BadCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &dir.path().join("a")),
        Err(Error::BadCid(_))
    ));
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(Vsock::new(3, &file), Err(Error::NotASocket(_))));
    assert!(matches!(
        Vsock::new(3, &dir.path().join("missing/dir/v.sock")),
        Err(Error::Bind(..))
    ));
    drop(dev);
    assert!(!uds.exists(), "socket file removed on drop");

    // A device replaced by a newer one at the same path leaves its file be.
    let old = Vsock::new(5, &uds).unwrap();
    let new = Vsock::new(6, &uds).unwrap();
    drop(old);
    assert!(uds.exists(), "the newer device's socket survives");
    UnixStream::connect(&uds).unwrap();
    drop(new);
    assert!(!uds.exists());
}

#[test]
fn host_gives_up_before_the_guest_answers() {
    let mut h = Harness::new();
    let s = h.host_connect(1024);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    let local = pkts[0].hdr.src_port;
    drop(s);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].hdr.op, pkts[0].hdr.src_port, pkts[0].hdr.dst_port),
        (OP_RST, local, 1024)
    );
    assert_eq!(h.conns(), 0);
    // A late RESPONSE finds nothing and is answered with RST.
    h.send(gpkt(OP_RESPONSE, 1024, local));
    assert_eq!(h.recv()[0].hdr.op, OP_RST);
}

#[test]
fn read_ahead_stops_when_the_guest_stops_reading() {
    let mut h = Harness::new();
    let (mut s, local) = h.establish(1024, 1 << 20);
    s.write_all(&pattern(30_000, 2)).unwrap();
    let first = h.recv();
    assert_eq!(rw_data(&first, local).len(), 30_000);
    // The guest will read no more: host bytes are dropped, not delivered.
    let mut shut = gpkt(OP_SHUTDOWN, 1024, local);
    shut.hdr.flags = SHUTDOWN_RCV;
    h.send(shut);
    s.write_all(&pattern(30_000, 4)).unwrap();
    assert!(rw_data(&h.recv(), local).is_empty());
    // It can still send, and its SEND shutdown then ends the stream.
    let mut p = gpkt(OP_RW, 1024, local);
    p.data = b"tail".to_vec();
    h.send(p);
    let mut shut = gpkt(OP_SHUTDOWN, 1024, local);
    shut.hdr.flags = SHUTDOWN_SEND;
    h.send(shut);
    // Closing a Unix stream with unread bytes resets it (like TCP): the
    // host may see ECONNRESET after the data.
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"tail");
    assert!(ends(&mut s));
    assert_eq!(h.recv().last().unwrap().hdr.op, OP_RST);
    assert_eq!(h.conns(), 0);
}

/// A guest that makes a TX chain available again as soon as it comes back,
/// for ever, gets a queue's worth of chains served per `process_tx` call;
/// the call re-arms the TX notify fd, so the event loop serves the other
/// queues first and then comes back for the rest.
#[test]
fn tx_from_a_guest_that_never_stops_returns_after_a_queue_worth() {
    const QSIZE: u16 = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut muxer = VsockMuxer::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (_rx, rxq) = DriverQueue::new(&mem, 0, QSIZE);
    let (mut tx, mut txq) = DriverQueue::new(&mem, 0x4000, QSIZE);
    let (_event, eventq) = DriverQueue::new(&mem, 0x8000, QSIZE);
    // An RST for no stream: the muxer drops it without an answer.
    let slot = 0x1_0000;
    mem.write_slice(&encode(&gpkt(OP_RST, 1, 2).hdr), GuestAddress(slot))
        .unwrap();
    assert_eq!(tx.add(&mem, &[(slot, 44, false)]), 0);
    // "For ever" without a second thread: the used ring lies over the avail
    // ring and the device's used index is one ahead, so each used element
    // the device writes (head 0, length 0) reads as head 0 available once
    // more, like a vCPU bumping the avail index as fast as the device pops.
    txq.queue
        .set_used_ring_address(Some(tx.avail as u32), Some((tx.avail >> 32) as u32));
    txq.queue.set_next_used(1);
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut queues = VsockQueues::new(mem.clone(), interrupt, vec![rxq, txq, eventq]).unwrap();

    // On a thread, so that a call that never returns fails the test.
    let (done, returned) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let used = queues.process_tx(&mut muxer);
        let _ = done.send(used);
    });
    let used = returned
        .recv_timeout(Duration::from_secs(10))
        .expect("process_tx never returned");
    assert!(used);
    let used_idx: u16 = mem.read_obj(GuestAddress(tx.avail + 2)).unwrap();
    assert_eq!(used_idx, 1 + QSIZE, "one queue's worth of chains");
    assert_eq!(tx.kick.read().unwrap(), 1, "the tx queue is re-armed");
}

/// A guest that opens streams and resets them before it reads their
/// answer, with no RX buffer posted, leaves nothing behind: a stream gone
/// leaves the queue for the guest with it. (Each one used to stay there
/// for ever, one entry per stream: memory a guest could grow at will.)
#[test]
fn streams_reset_before_the_guest_reads_leave_nothing_queued() {
    const QSIZE: u16 = 16;
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut muxer = VsockMuxer::new(GUEST_CID, &uds).unwrap();
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (_rx, rxq) = DriverQueue::new(&mem, 0, QSIZE);
    let (mut tx, txq) = DriverQueue::new(&mem, 0x4000, QSIZE);
    let (_event, eventq) = DriverQueue::new(&mem, 0x8000, QSIZE);
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut queues = VsockQueues::new(mem.clone(), interrupt, vec![rxq, txq, eventq]).unwrap();
    for round in 0..100 {
        for op in [OP_REQUEST, OP_RST] {
            let slot = 0x1_0000;
            mem.write_slice(&encode(&gpkt(op, 1234, 5000).hdr), GuestAddress(slot))
                .unwrap();
            tx.add(&mem, &[(slot, 44, false)]);
            queues.process_tx(&mut muxer);
            tx.take_used(&mem);
        }
        while listener.accept().is_ok() {}
        assert_eq!(muxer.connection_count(), 0, "round {round}");
        assert!(
            !muxer.has_pending_to_guest(),
            "round {round}: a packet owed for a stream that is gone"
        );
        muxer.check_bounds().unwrap();
    }
}

/// The RX side of the above: a guest that makes an RX chain the device
/// cannot use (device-readable) available again as soon as it comes back,
/// for ever, while the muxer owes it a packet, gets a queue's worth served
/// per `process_rx` call, and the RX queue re-armed for the rest.
#[test]
fn rx_from_a_guest_that_never_stops_returns_after_a_queue_worth() {
    const QSIZE: u16 = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut muxer = VsockMuxer::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (mut rx, mut rxq) = DriverQueue::new(&mem, 0, QSIZE);
    let (mut tx, txq) = DriverQueue::new(&mem, 0x4000, QSIZE);
    let (_event, eventq) = DriverQueue::new(&mem, 0x8000, QSIZE);
    // A packet for no stream: the muxer owes the guest an RST for it.
    let slot = 0x1_0000;
    mem.write_slice(&encode(&gpkt(OP_RW, 1, 2).hdr), GuestAddress(slot))
        .unwrap();
    tx.add(&mem, &[(slot, 44, false)]);
    // The RX chain is device-readable: no packet fits, it goes back empty.
    assert_eq!(rx.add(&mem, &[(0x2_0000, 4096, false)]), 0);
    // As in the TX test: each used element reads as the chain made
    // available once more.
    rxq.queue
        .set_used_ring_address(Some(rx.avail as u32), Some((rx.avail >> 32) as u32));
    rxq.queue.set_next_used(1);
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut queues = VsockQueues::new(mem.clone(), interrupt, vec![rxq, txq, eventq]).unwrap();
    queues.process_tx(&mut muxer);
    assert!(muxer.has_pending_to_guest());

    let (done, returned) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let used = queues.process_rx(&mut muxer);
        let _ = done.send((used, queues));
    });
    let (used, queues) = returned
        .recv_timeout(Duration::from_secs(10))
        .expect("process_rx never returned");
    assert!(used);
    let used_idx: u16 = mem.read_obj(GuestAddress(rx.avail + 2)).unwrap();
    assert_eq!(used_idx, 1 + QSIZE, "one queue's worth of chains");
    assert_eq!(
        queues.rx.notify.read().unwrap(),
        1,
        "the rx queue is re-armed"
    );
}
