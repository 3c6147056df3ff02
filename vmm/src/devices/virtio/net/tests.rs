//! Device tests with plain guest memory (no KVM): a test driver owns the
//! rings, one end of a `UnixStream::pair()` plays passt, and a real
//! `EventManager` runs the device's event-loop glue. The last test talks
//! to a real passt when one is installed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::LEN_PREFIX;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{
    MmioTransport, REG_CONFIG, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK,
    REG_INTERRUPT_STATUS, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NUM,
    REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use crate::devices::virtio::test_queue::DriverQueue;
use crate::devices::virtio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use crate::NetConfig;

const MEM_SIZE: usize = 32 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
/// RX buffers: 4 KiB slots, one per descriptor of the queue.
const RX_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x1000;
/// TX buffers for ordinary frames: 2 KiB slots in a ring.
const TX_BASE: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x800;
const TX_SLOTS: u64 = 512;
/// Room for chains of 64 KiB and more.
const BIG_BASE: u64 = 0x100_0000;
/// What the Linux driver posts without mergeable buffers: a header and a
/// 1514-byte frame (it posts 1518, for a VLAN tag; this is the minimum).
const RX_BUF_LEN: u32 = (NET_HDR_LEN + 1514) as u32;
const GUEST_MAC: [u8; 6] = [0x02, 0x73, 0x6d, 0x6f, 0x6c, 0x01];

/// An Ethernet frame of `len` bytes from the guest, numbered `seq` (in
/// its first payload bytes) and otherwise patterned.
fn frame(len: usize, seq: u32) -> Vec<u8> {
    assert!(len >= 18);
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend((f.len()..len).map(|i| (i as u32 ^ seq) as u8));
    f
}

/// An IPv4/UDP frame to `dst`.
fn ipv4_frame(dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 2, 15]);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, 8, 0, 0]);
    f
}

fn wire(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut w = Vec::new();
    for f in frames {
        w.extend_from_slice(&(f.len() as u32).to_be_bytes());
        w.extend_from_slice(f);
    }
    w
}

struct Harness {
    mem: GuestMemory,
    em: EventManager<Arc<Mutex<Net>>>,
    dev: Arc<Mutex<Net>>,
    /// passt's end.
    peer: UnixStream,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_slots: HashMap<u16, u64>,
    free_rx_slots: Vec<u64>,
    tx_next: u64,
    interrupt: Interrupt,
    irq: EventFd,
}

impl Harness {
    fn new() -> Self {
        Self::with_allow(None)
    }

    fn with_allow(allow: Option<Vec<IpNet>>) -> Self {
        let (ours, peer) = UnixStream::pair().unwrap();
        let mut h = Self::with_backend(OwnedFd::from(ours), allow);
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        h.peer = peer;
        h
    }

    fn with_backend(backend: OwnedFd, allow: Option<Vec<IpNet>>) -> Self {
        let config = NetConfig {
            allow,
            ..NetConfig::new(backend)
        };
        let dev = Arc::new(Mutex::new(Net::new(&config).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = DriverQueue::new(&mem, RX_RING, QUEUE_SIZE);
        let (tx, txq) = DriverQueue::new(&mem, TX_RING, QUEUE_SIZE);
        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = irq_evt.try_clone().unwrap();
        let interrupt = Interrupt::new(irq_evt);
        {
            let mut d = dev.lock().unwrap();
            let features = d.avail_features();
            d.set_acked_features(features);
            d.activate(mem.clone(), interrupt.clone(), vec![rxq, txq])
                .unwrap();
        }
        let mut h = Harness {
            mem,
            em,
            dev,
            // Replaced by the callers that keep the other end.
            peer: UnixStream::pair().unwrap().0,
            rx,
            tx,
            rx_slots: HashMap::new(),
            free_rx_slots: (0..u64::from(QUEUE_SIZE))
                .rev()
                .map(|i| RX_BASE + i * RX_SLOT)
                .collect(),
            tx_next: 0,
            interrupt,
            irq,
        };
        h.pump();
        h
    }

    /// Runs the event loop until it is idle.
    fn pump(&mut self) {
        let mut idle = 0;
        let mut rounds = 0;
        while idle < 3 {
            match self.em.run_with_timeout(0).unwrap() {
                0 => idle += 1,
                _ => idle = 0,
            }
            rounds += 1;
            assert!(rounds < 100_000, "the event loop never went idle");
        }
    }

    /// Posts `n` RX buffers of `len` bytes, one descriptor each, and kicks.
    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let slot = self.free_rx_slots.pop().expect("rx slots left");
            let head = self.rx.add(&self.mem, &[(slot, len, true)]);
            self.rx_slots.insert(head, slot);
        }
        self.rx.kick();
    }

    /// Frames the device delivered since the last call (their buffers are
    /// not reposted); checks each header.
    fn delivered(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (head, len) in self.rx.take_used(&self.mem) {
            let slot = self.rx_slots.remove(&head).expect("a posted rx head");
            self.free_rx_slots.push(slot);
            assert!(len as usize > NET_HDR_LEN, "used len {len}");
            let mut hdr = [0xffu8; NET_HDR_LEN];
            self.mem.read_slice(&mut hdr, GuestAddress(slot)).unwrap();
            assert_eq!(
                hdr,
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                "virtio_net_hdr_v1"
            );
            let mut f = vec![0u8; len as usize - NET_HDR_LEN];
            self.mem
                .read_slice(&mut f, GuestAddress(slot + NET_HDR_LEN as u64))
                .unwrap();
            out.push(f);
        }
        out
    }

    fn next_tx_slot(&mut self) -> u64 {
        let slot = TX_BASE + (self.tx_next % TX_SLOTS) * TX_SLOT;
        self.tx_next += 1;
        slot
    }

    /// Makes a header + frame chain available (two descriptors, as Linux
    /// sends them), without kicking.
    fn queue_tx(&mut self, frame: &[u8]) -> u16 {
        assert!(frame.len() + NET_HDR_LEN <= TX_SLOT as usize);
        let slot = self.next_tx_slot();
        self.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(slot))
            .unwrap();
        let data = slot + NET_HDR_LEN as u64;
        self.mem.write_slice(frame, GuestAddress(data)).unwrap();
        self.tx.add(
            &self.mem,
            &[
                (slot, NET_HDR_LEN as u32, false),
                (data, frame.len() as u32, false),
            ],
        )
    }

    /// Sends one frame through the TX queue and runs the device.
    fn send(&mut self, frame: &[u8]) {
        self.queue_tx(frame);
        self.tx.kick();
        self.pump();
        assert_eq!(self.tx.take_used(&self.mem).len(), 1, "tx chain returned");
    }

    /// Reads `n` frames from passt's end.
    fn wire_frames(&mut self, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let mut len = [0u8; 4];
                self.peer.read_exact(&mut len).unwrap();
                let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                self.peer.read_exact(&mut f).unwrap();
                f
            })
            .collect()
    }

    /// Whether passt's end has nothing to read right now.
    fn wire_is_empty(&mut self) -> bool {
        self.peer.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let empty = matches!(self.peer.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
        self.peer.set_nonblocking(false).unwrap();
        empty
    }

    fn counters(&self) -> NetCounters {
        self.dev.lock().unwrap().counters()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        self.dev.lock().unwrap().read_config(0, &mut c);
        c
    }
}

#[test]
fn features_and_config_space() {
    let h = Harness::new();
    let dev = h.dev.lock().unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let f = dev.avail_features();
    assert_eq!(
        f,
        VIRTIO_F_VERSION_1 | 1 << 5 | 1 << 16 | 1 << 3,
        "version 1, mac, status, mtu; no offloads, no mergeable buffers"
    );
    drop(dev);
    let c = h.config();
    assert_eq!(&c[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500, "mtu");
    let dev = h.dev.lock().unwrap();
    let mut past = [0xaau8; 4];
    dev.read_config(10, &mut past);
    assert_eq!(past, [0xaa; 4], "out of range reads leave the buffer");
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0xaa; 4]);
    let mut mac = [0u8; 2];
    dev.read_config(4, &mut mac);
    assert_eq!(mac, [0x6c, 0x01], "partial reads");
}

#[test]
fn new_names_bad_input() {
    let (ours, _peer) = UnixStream::pair().unwrap();
    let config = NetConfig {
        mac: [0x01, 0, 0x5e, 0, 0, 1],
        ..NetConfig::new(OwnedFd::from(ours))
    };
    let err = Net::new(&config).unwrap_err();
    assert!(matches!(err, Error::BadMac(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "mac address 01:00:5e:00:00:01 is not a unicast address"
    );
    let zero = NetConfig {
        mac: [0; 6],
        ..config
    };
    assert!(matches!(Net::new(&zero), Err(Error::BadMac(_))));

    let file = NetConfig::new(OwnedFd::from(tempfile::tempfile().unwrap()));
    let err = Net::new(&file).unwrap_err();
    assert!(
        matches!(err, Error::Backend(backend::Error::NotASocket(_))),
        "{err}"
    );
    let (dgram, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let err = Net::new(&NetConfig::new(OwnedFd::from(dgram))).unwrap_err();
    assert!(
        matches!(err, Error::Backend(backend::Error::NotAStream(_))),
        "{err}"
    );
}

#[test]
fn tx_frames_arrive_length_prefixed() {
    let mut h = Harness::new();
    let frames: Vec<Vec<u8>> = [60, 1514, 64, 1000]
        .iter()
        .map(|&l| frame(l, l as u32))
        .collect();
    for f in &frames {
        h.send(f);
    }
    assert_eq!(h.wire_frames(frames.len()), frames);

    // One descriptor for header and frame, and a header cut in two.
    let slot = h.next_tx_slot();
    let f = frame(100, 7);
    h.mem
        .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(slot))
        .unwrap();
    h.mem
        .write_slice(&f, GuestAddress(slot + NET_HDR_LEN as u64))
        .unwrap();
    h.tx.add(&h.mem, &[(slot, (NET_HDR_LEN + f.len()) as u32, false)]);
    h.tx.add(
        &h.mem,
        &[
            (slot, 5, false),
            (slot + 5, (NET_HDR_LEN - 5) as u32, false),
            (slot + NET_HDR_LEN as u64, 30, false),
            (slot + NET_HDR_LEN as u64 + 30, (f.len() - 30) as u32, false),
        ],
    );
    h.tx.kick();
    h.pump();
    let used = h.tx.take_used(&h.mem);
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|&(_, len)| len == 0), "tx writes nothing");
    assert_eq!(h.wire_frames(2), vec![f.clone(), f]);

    let c = h.counters();
    assert_eq!(c.tx_frames, 6);
    assert_eq!(c.tx_bytes, (60 + 1514 + 64 + 1000 + 200) as u64);
    assert_eq!(c.tx_malformed, 0);
    // The driver heard about the used chains.
    assert!(h.irq.read().unwrap() > 0);
    assert_ne!(h.interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn rx_frames_land_in_buffers_with_a_header() {
    let mut h = Harness::new();
    h.post_rx(4, RX_BUF_LEN);
    h.pump();
    assert!(h.delivered().is_empty());
    let _ = h.irq.read();
    let frames: Vec<Vec<u8>> = [60, 1514, 14, 333]
        .iter()
        .map(|&l| frame(l.max(18), l as u32))
        .collect();
    h.peer.write_all(&wire(&frames)).unwrap();
    h.pump();
    assert_eq!(h.delivered(), frames);
    assert!(h.irq.read().unwrap() > 0, "interrupted");

    // A chain of several descriptors, the header cut in two.
    let slot = h.free_rx_slots.pop().unwrap();
    let head = h.rx.add(
        &h.mem,
        &[
            (slot, 4, true),
            (slot + 4, 8, true),
            (slot + 12, 100, true),
            (slot + 112, 2000, true),
        ],
    );
    h.rx_slots.insert(head, slot);
    h.rx.kick();
    let f = frame(1514, 99);
    h.peer.write_all(&wire(std::slice::from_ref(&f))).unwrap();
    h.pump();
    assert_eq!(h.delivered(), vec![f]);
    let c = h.counters();
    assert_eq!(c.rx_frames, 5);
    assert_eq!(c.rx_bytes, (60 + 1514 + 18 + 333 + 1514) as u64);
}

#[test]
fn bad_tx_chains_are_dropped_and_counted() {
    let mut h = Harness::new();
    let slot = h.next_tx_slot();
    h.mem
        .write_slice(&frame(100, 1), GuestAddress(slot + 12))
        .unwrap();
    // Too short: a header and 13 bytes of Ethernet.
    h.tx.add(&h.mem, &[(slot, 12, false), (slot + 12, 13, false)]);
    // Only a header.
    h.tx.add(&h.mem, &[(slot, 12, false)]);
    // Too long: a header and 65536 bytes, in two descriptors.
    h.tx.add(
        &h.mem,
        &[(BIG_BASE, 12, false), (BIG_BASE + 12, 65536, false)],
    );
    // Way too long: 4 GiB claimed, far beyond guest memory.
    h.tx.add(
        &h.mem,
        &[(BIG_BASE, u32::MAX, false), (BIG_BASE, u32::MAX, false)],
    );
    // A device-writable descriptor.
    h.tx.add(&h.mem, &[(slot, 12, false), (slot + 12, 100, true)]);
    // Outside guest memory.
    h.tx.add(
        &h.mem,
        &[(slot, 12, false), (MEM_SIZE as u64 - 50, 100, false)],
    );
    h.tx.kick();
    h.pump();
    assert_eq!(h.tx.take_used(&h.mem).len(), 6, "every chain returned");
    assert!(h.wire_is_empty(), "nothing reached the back end");
    assert_eq!(h.counters().tx_malformed, 6);

    // The largest frame passes, the device goes on.
    let big = frame(MAX_FRAME_LEN, 5);
    h.mem
        .write_slice(&[0u8; 12], GuestAddress(BIG_BASE))
        .unwrap();
    h.mem
        .write_slice(&big, GuestAddress(BIG_BASE + 12))
        .unwrap();
    h.tx.add(&h.mem, &[(BIG_BASE, (12 + MAX_FRAME_LEN) as u32, false)]);
    h.tx.kick();
    // The peer reads while the device writes: 64 KiB may not fit at once.
    let reader = {
        let mut peer = h.peer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut len = [0u8; 4];
            peer.read_exact(&mut len).unwrap();
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            peer.read_exact(&mut f).unwrap();
            f
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "the big frame never arrived");
        h.em.run_with_timeout(10).unwrap();
    }
    assert_eq!(reader.join().unwrap(), big);
    assert_eq!(h.counters().tx_frames, 1);
}

/// The MTU the driver accepted bounds what it gets, whatever its buffers.
#[test]
fn frames_above_the_mtu_are_dropped() {
    let mut h = Harness::new();
    h.post_rx(2, 4000);
    let frames = [frame(MAX_RX_FRAME_LEN + 1, 1), frame(MAX_RX_FRAME_LEN, 2)];
    h.peer.write_all(&wire(&frames)).unwrap();
    h.pump();
    assert_eq!(h.delivered(), vec![frames[1].clone()]);
    assert_eq!(h.counters().rx_too_big, 1);
}

#[test]
fn a_frame_too_big_for_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut h = Harness::new();
    h.post_rx(1, (NET_HDR_LEN + 100) as u32);
    let big = frame(1514, 1);
    let small = frame(100, 2);
    h.peer.write_all(&wire(&[big, small.clone()])).unwrap();
    h.pump();
    assert_eq!(h.delivered(), vec![small]);
    let c = h.counters();
    assert_eq!((c.rx_too_big, c.rx_frames), (1, 1));
}

#[test]
fn bad_rx_chains_are_returned_empty() {
    let mut h = Harness::new();
    let slot = h.free_rx_slots.pop().unwrap();
    // Device-readable, then outside memory.
    let a = h.rx.add(&h.mem, &[(slot, RX_BUF_LEN, false)]);
    let b =
        h.rx.add(&h.mem, &[(MEM_SIZE as u64 - 40, RX_BUF_LEN, true)]);
    h.post_rx(1, RX_BUF_LEN);
    let f = frame(60, 3);
    h.peer.write_all(&wire(std::slice::from_ref(&f))).unwrap();
    h.pump();
    let used = h.rx.take_used(&h.mem);
    assert_eq!(used[..2], [(a, 0), (b, 0)]);
    assert_eq!(used.len(), 3);
    assert_eq!(used[2].1 as usize, NET_HDR_LEN + 60);
    assert_eq!(h.counters().rx_bad_chains, 2);
}

/// A length passt never sends, a connection passt closed: the link goes
/// down (the driver is told), the socket is shut, the device survives.
#[test]
fn a_bad_backend_drops_the_link_without_panicking() {
    for bad in [
        wire(&[frame(60, 1)])
            .into_iter()
            .chain([0, 0, 0, 0])
            .collect::<Vec<u8>>(),
        (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec(),
        u32::MAX.to_be_bytes().to_vec(),
        Vec::new(),
    ] {
        let mut h = Harness::new();
        h.post_rx(2, RX_BUF_LEN);
        h.pump();
        let _ = h.irq.read();
        if bad.is_empty() {
            h.peer.shutdown(std::net::Shutdown::Write).unwrap();
        } else {
            h.peer.write_all(&bad).unwrap();
        }
        h.pump();
        let good = h.delivered();
        assert!(good.len() <= 1, "only the frame before the bad length");
        let dev = h.dev.lock().unwrap();
        assert!(!dev.link_up());
        assert_eq!(dev.counters().backend_errors, 1);
        drop(dev);
        assert_eq!(&h.config()[6..8], &[0, 0], "link status down");
        assert_ne!(h.interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert!(h.irq.read().unwrap() > 0);
        // passt sees the connection end.
        let mut rest = Vec::new();
        h.peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // Frames from the guest now go nowhere, and nothing spins.
        h.send(&frame(60, 2));
        assert_eq!(h.counters().tx_no_backend, 1);
        h.pump();
        assert_eq!(h.em.run_with_timeout(0).unwrap(), 0, "the loop is idle");
        assert!(h.dev.lock().unwrap().backend.is_none(), "back end released");
    }
}

/// A passt that does not read: the device keeps one frame at most and
/// leaves the rest of the guest's chains in the ring until the socket
/// drains; then everything arrives, in order.
#[test]
fn tx_backpressure_stays_bounded() {
    let mut h = Harness::new();
    let len = 1514;
    let mut sent = 0u32;
    let mut returned = 0usize;
    // Rounds of 64 chains until the device stops returning them.
    loop {
        for _ in 0..64 {
            h.queue_tx(&frame(len, sent));
            sent += 1;
        }
        h.tx.kick();
        h.pump();
        let used = h.tx.take_used(&h.mem).len();
        returned += used;
        let (pending, _) = h.dev.lock().unwrap().buffered();
        assert!(pending <= LEN_PREFIX + len, "{pending} bytes pending");
        if used < 64 {
            break;
        }
        assert!(sent < 100_000, "the socket never filled");
    }
    assert!(h.tx.in_flight() > 0, "chains wait in the ring");
    assert!(h.dev.lock().unwrap().buffered().0 > 0, "one frame pending");
    // The device is idle meanwhile, not polling.
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 0);

    // passt reads: the rest follows, whole and in order.
    let mut got = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    h.peer.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < sent as usize {
        assert!(Instant::now() < deadline, "{} of {sent} frames", got.len());
        match h.peer.read(&mut chunk) {
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                h.em.run_with_timeout(1).unwrap();
                returned += h.tx.take_used(&h.mem).len();
            }
            Err(e) => panic!("{e}"),
        }
        while buf.len() >= 4 {
            let l = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() < 4 + l {
                break;
            }
            got.push(buf[4..4 + l].to_vec());
            buf.drain(..4 + l);
        }
    }
    h.pump();
    returned += h.tx.take_used(&h.mem).len();
    assert_eq!(returned, sent as usize);
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f, &frame(len, i as u32), "frame {i}");
    }
    assert_eq!(h.dev.lock().unwrap().buffered().0, 0);
}

/// No RX buffers: the device reads one frame's worth at most and then
/// leaves the socket alone (passt's writes block), and delivers every
/// frame once buffers come.
#[test]
fn rx_without_buffers_stops_reading() {
    let mut h = Harness::new();
    let frames: Vec<Vec<u8>> = (0..2000).map(|i| frame(1514, i)).collect();
    let all = wire(&frames);
    h.peer.set_nonblocking(true).unwrap();
    let mut written = 0;
    loop {
        match h.peer.write(&all[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                h.pump();
                // Once the device stopped reading, a pump frees no room.
                match h.peer.write(&all[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert!(written < all.len(), "the device read everything");
    }
    let (_, buffered) = h.dev.lock().unwrap().buffered();
    assert!(buffered <= LEN_PREFIX + MAX_FRAME_LEN, "{buffered} bytes");
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 0, "not polling");
    assert_eq!(h.counters().rx_too_big, 0, "nothing dropped");

    // Buffers come in batches; every frame arrives, in order.
    let mut got: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < frames.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} frames",
            got.len(),
            frames.len()
        );
        if written < all.len() {
            if let Ok(n) = h.peer.write(&all[written..]) {
                written += n;
            }
        }
        let free = h.free_rx_slots.len().min(64);
        if free > 0 {
            h.post_rx(free, RX_BUF_LEN);
        }
        h.pump();
        got.extend(h.delivered());
    }
    assert_eq!(got, frames);
}

#[test]
fn the_allow_list_filters_tx() {
    let mut h = Harness::with_allow(Some(vec!["10.0.0.0/8".parse().unwrap()]));
    h.send(&ipv4_frame([8, 8, 8, 8]));
    h.send(&ipv4_frame([10, 1, 2, 3]));
    h.send(&frame(60, 1)); // not IP, not ARP
    assert_eq!(h.wire_frames(1), vec![ipv4_frame([10, 1, 2, 3])]);
    assert!(h.wire_is_empty());
    let c = h.counters();
    assert_eq!((c.tx_filtered, c.tx_frames), (2, 1));
}

/// Reset drops the queues and the features; the stream stays, unread,
/// until the driver sets the device up again.
#[test]
fn reset_returns_to_the_initial_state() {
    let mut h = Harness::new();
    h.post_rx(4, RX_BUF_LEN);
    h.pump();
    let mut dev = h.dev.lock().unwrap();
    assert!(dev.reset());
    assert!(!dev.is_activated());
    assert_eq!(dev.acked_features, 0);
    assert!(dev.quiesce_queues().is_none());
    drop(dev);
    h.pump();
    // Kicks and frames go unserved while reset.
    let f = frame(60, 1);
    h.peer.write_all(&wire(std::slice::from_ref(&f))).unwrap();
    h.queue_tx(&frame(60, 2));
    h.tx.kick();
    h.rx.kick();
    h.pump();
    assert_eq!(h.dev.lock().unwrap().buffered(), (0, 0), "socket not read");
    assert!(h.rx.take_used(&h.mem).is_empty());
    assert!(h.tx.take_used(&h.mem).is_empty());
    assert!(h.dev.lock().unwrap().registered.is_empty());

    // Set up again on fresh rings: it runs, the waiting frame arrives.
    let (rx, rxq) = DriverQueue::new(&h.mem, RX_RING, QUEUE_SIZE);
    let (tx, txq) = DriverQueue::new(&h.mem, TX_RING, QUEUE_SIZE);
    h.rx = rx;
    h.tx = tx;
    h.rx_slots.clear();
    h.free_rx_slots = (0..u64::from(QUEUE_SIZE))
        .rev()
        .map(|i| RX_BASE + i * RX_SLOT)
        .collect();
    {
        let mut d = h.dev.lock().unwrap();
        let features = d.avail_features();
        d.set_acked_features(features);
        d.activate(h.mem.clone(), h.interrupt.clone(), vec![rxq, txq])
            .unwrap();
    }
    h.post_rx(1, RX_BUF_LEN);
    h.pump();
    assert_eq!(h.delivered(), vec![f]);
    h.send(&frame(60, 3));
    assert_eq!(h.wire_frames(1), vec![frame(60, 3)]);
}

/// An avail index more than a queue ahead, or a head outside the queue:
/// DEVICE_NEEDS_RESET, and the queues are left alone until a reset.
#[test]
fn a_broken_ring_needs_a_reset() {
    for rx_queue in [false, true] {
        for head_outside in [false, true] {
            let mut h = Harness::new();
            let _ = h.irq.read();
            let q = if rx_queue { &mut h.rx } else { &mut h.tx };
            if head_outside {
                q.publish(&h.mem, QUEUE_SIZE + 5);
            } else {
                h.mem
                    .write_obj(QUEUE_SIZE + 1, GuestAddress(q.avail + 2))
                    .unwrap();
            }
            q.kick();
            if rx_queue {
                h.peer.write_all(&wire(&[frame(60, 1)])).unwrap();
            }
            h.pump();
            assert!(
                h.interrupt.needs_reset(),
                "rx {rx_queue} outside {head_outside}"
            );
            assert_ne!(h.interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
            assert_eq!(h.irq.read().unwrap(), 1, "told once");
            // Nothing more happens, and nothing spins.
            h.send_unchecked(&frame(60, 2));
            assert!(h.wire_is_empty());
            assert_eq!(h.em.run_with_timeout(0).unwrap(), 0);
        }
    }
}

impl Harness {
    /// Makes a frame available and kicks, expecting nothing back.
    fn send_unchecked(&mut self, frame: &[u8]) {
        self.queue_tx(frame);
        self.tx.kick();
        self.pump();
    }
}

/// A queue's worth per event: after a full budget the device kicks itself
/// rather than going on.
#[test]
fn each_event_serves_a_queue_at_most_and_rearms() {
    let mut h = Harness::new();
    let reader = {
        let mut peer = h.peer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut sink = vec![0u8; 1 << 16];
            let mut total = 0;
            while total < usize::from(QUEUE_SIZE) * (4 + 60) {
                total += peer.read(&mut sink).unwrap();
            }
        })
    };
    // One descriptor per chain, so that a queue's worth fits the table.
    for i in 0..QUEUE_SIZE {
        let slot = h.next_tx_slot();
        let mut chain = vec![0u8; NET_HDR_LEN];
        chain.extend_from_slice(&frame(60, u32::from(i)));
        h.mem.write_slice(&chain, GuestAddress(slot)).unwrap();
        h.tx.add(&h.mem, &[(slot, chain.len() as u32, false)]);
    }
    h.tx.kick();
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(h.tx.take_used(&h.mem).len(), usize::from(QUEUE_SIZE));
    assert_eq!(h.tx.kick.read().unwrap(), 1, "the device kicked itself");
    reader.join().unwrap();
}

/// Through the transport: a running device is saved (registers, queues,
/// its MAC and link status), restored on a new back end, and goes on
/// from the saved rings: buffers posted before the snapshot take the new
/// passt's frames, and the driver hears that the link came back up.
#[test]
fn snapshot_and_restore_on_a_new_backend() {
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let transport = |dev: Arc<Mutex<Net>>| {
        let notify = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        MmioTransport::new(dev, mem.clone(), irq, notify).unwrap()
    };
    let (ours, old_passt) = UnixStream::pair().unwrap();
    let dev = Arc::new(Mutex::new(
        Net::new(&NetConfig::new(OwnedFd::from(ours))).unwrap(),
    ));
    let mut t = transport(dev.clone());
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    let features = VIRTIO_F_VERSION_1 | 1 << 5 | 1 << 16;
    for sel in 0..2u32 {
        w(&mut t, REG_DRIVER_FEATURES_SEL, sel);
        w(&mut t, REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    w(&mut t, REG_STATUS, ok);
    assert_eq!(r(&mut t, REG_STATUS), ok);
    let mut rings = Vec::new();
    for (i, base) in [RX_RING, TX_RING].into_iter().enumerate() {
        let (dq, aq) = DriverQueue::new(&mem, base, QUEUE_SIZE);
        w(&mut t, REG_QUEUE_SEL, i as u32);
        w(&mut t, REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (lo, hi, addr) in [
            (
                REG_QUEUE_DESC_LOW,
                REG_QUEUE_DESC_HIGH,
                aq.queue.desc_table(),
            ),
            (
                REG_QUEUE_DRIVER_LOW,
                REG_QUEUE_DRIVER_HIGH,
                aq.queue.avail_ring(),
            ),
            (
                REG_QUEUE_DEVICE_LOW,
                REG_QUEUE_DEVICE_HIGH,
                aq.queue.used_ring(),
            ),
        ] {
            w(&mut t, lo, addr as u32);
            w(&mut t, hi, (addr >> 32) as u32);
        }
        w(&mut t, REG_QUEUE_READY, 1);
        rings.push(dq);
    }
    w(&mut t, REG_STATUS, ok | STATUS_DRIVER_OK);
    assert!(dev.lock().unwrap().is_activated());
    let mut mac = [0u8; 6];
    t.read(REG_CONFIG, &mut mac);
    assert_eq!(mac, NetConfig::DEFAULT_MAC);

    // Two RX buffers posted; the old passt dies before sending anything.
    let mut rx = rings.remove(0);
    for i in 0..2 {
        rx.add(&mem, &[(RX_BASE + i * RX_SLOT, RX_BUF_LEN, true)]);
    }
    old_passt.shutdown(std::net::Shutdown::Both).unwrap();
    {
        let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        for _ in 0..10 {
            em.run_with_timeout(0).unwrap();
        }
    }
    assert!(!dev.lock().unwrap().link_up());

    // The driver handled every interrupt so far.
    w(
        &mut t,
        REG_INTERRUPT_ACK,
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG,
    );
    let state = t.save_state();
    assert_eq!(state.interrupt_status, 0);
    assert_eq!(
        state.device,
        DeviceState::Net {
            mac: NetConfig::DEFAULT_MAC,
            link_up: false
        }
    );
    let state: crate::devices::virtio::mmio::TransportState =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(state.device_queues.as_ref().map(Vec::len), Some(2));

    // The restore: a new device on a new passt, the same guest memory.
    let (ours, mut new_passt) = UnixStream::pair().unwrap();
    let restored = Arc::new(Mutex::new(
        Net::new(&NetConfig::new(OwnedFd::from(ours))).unwrap(),
    ));
    let mut t2 = transport(restored.clone());
    t2.restore_state(&state).unwrap();
    assert_eq!(r(&mut t2, REG_STATUS), ok | STATUS_DRIVER_OK);
    assert_eq!(r(&mut t2, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(restored.lock().unwrap().is_activated());
    assert_ne!(
        r(&mut t2, REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0,
        "the driver is told the link is up again"
    );
    let mut status = [0u8; 2];
    t2.read(REG_CONFIG + 6, &mut status);
    assert_eq!(status, [1, 0]);

    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(restored.clone());
    let f = frame(60, 42);
    new_passt
        .write_all(&wire(std::slice::from_ref(&f)))
        .unwrap();
    for _ in 0..10 {
        em.run_with_timeout(0).unwrap();
    }
    let used = rx.take_used(&mem);
    assert_eq!(used.len(), 1, "a buffer posted before the snapshot");
    assert_eq!(used[0].1 as usize, NET_HDR_LEN + 60);
    let mut got = vec![0u8; 60];
    mem.read_slice(&mut got, GuestAddress(RX_BASE + NET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, f);
}

mod passt {
    //! Against a real passt (Debian's `passt` package), when installed.

    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};

    use super::*;

    /// Kills and reaps passt however the test ends.
    struct PasstChild(Child);

    impl Drop for PasstChild {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn passt_binary() -> Option<std::path::PathBuf> {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|dir| std::path::Path::new(dir).join("passt"))
            .find(|p| p.is_file())
    }

    /// `passt -f -q -1 --fd N --no-map-gw -m 1500`: foreground, quiet,
    /// one guest only (implied by --fd), no PID file (none unless asked
    /// for), on the inherited socket, with no gateway-to-host mapping and
    /// the device's MTU advertised by DHCP.
    /// passt's stderr goes to `log`.
    fn spawn_passt(
        binary: &std::path::Path,
        theirs: UnixStream,
        log: &std::fs::File,
    ) -> PasstChild {
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.args([
            "-f",
            "-q",
            "-1",
            "--fd",
            &fd.to_string(),
            "--no-map-gw",
            "-m",
            "1500",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.try_clone().unwrap());
        // SAFETY: runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: fcntl is one. It clears
        // close-on-exec on the socket passt is told to use, which stays
        // open in the parent until `theirs` drops after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = PasstChild(cmd.spawn().expect("spawn passt"));
        drop(theirs);
        child
    }

    /// A DHCPDISCOVER from `mac`: broadcast, from 0.0.0.0:68 to
    /// 255.255.255.255:67, asking for mask, router, DNS and MTU.
    fn dhcp_discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
        let mut bootp = vec![1u8, 1, 6, 0];
        bootp.extend_from_slice(&xid.to_be_bytes());
        bootp.extend_from_slice(&[0, 0, 0x80, 0]); // secs, flags: broadcast
        bootp.extend_from_slice(&[0; 16]); // ciaddr yiaddr siaddr giaddr
        bootp.extend_from_slice(&mac);
        bootp.extend_from_slice(&[0; 10 + 64 + 128]); // chaddr pad, sname, file
        bootp.extend_from_slice(&[0x63, 0x82, 0x53, 0x63]);
        bootp.extend_from_slice(&[53, 1, 1, 55, 4, 1, 3, 6, 26, 255]);
        bootp.resize(300, 0);
        let mut udp = Vec::new();
        udp.extend_from_slice(&68u16.to_be_bytes());
        udp.extend_from_slice(&67u16.to_be_bytes());
        udp.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]); // no checksum (IPv4 allows it)
        udp.extend_from_slice(&bootp);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
        let sum = ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
        ip.extend_from_slice(&udp);
        let mut eth = vec![0xff; 6];
        eth.extend_from_slice(&mac);
        eth.extend_from_slice(&0x0800u16.to_be_bytes());
        eth.extend_from_slice(&ip);
        eth
    }

    /// A DHCP reply: the address offered and the options by code.
    type Offer = ([u8; 4], HashMap<u8, Vec<u8>>);

    /// What a DHCP OFFER frame says.
    fn parse_offer(f: &[u8], xid: u32) -> Option<Offer> {
        if f.get(12..14)? != [0x08, 0x00] {
            return None;
        }
        let ip = f.get(14..)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        if *ip.get(9)? != 17 {
            return None;
        }
        let udp = ip.get(ihl..)?;
        if udp.get(0..4)? != [0, 67, 0, 68] {
            return None;
        }
        let bootp = udp.get(8..)?;
        if *bootp.first()? != 2 || bootp.get(4..8)? != xid.to_be_bytes() {
            return None;
        }
        let yiaddr: [u8; 4] = bootp.get(16..20)?.try_into().ok()?;
        if bootp.get(236..240)? != [0x63, 0x82, 0x53, 0x63] {
            return None;
        }
        let mut opts = HashMap::new();
        let mut o = bootp.get(240..)?;
        while let [code, rest @ ..] = o {
            match code {
                0 => o = rest,
                255 => break,
                _ => {
                    let (&len, rest) = rest.split_first()?;
                    let value = rest.get(..usize::from(len))?;
                    opts.insert(*code, value.to_vec());
                    o = &rest[usize::from(len)..];
                }
            }
        }
        Some((yiaddr, opts))
    }

    fn ipv4s(v: Option<&Vec<u8>>) -> String {
        v.map_or_else(
            || "-".into(),
            |v| {
                v.chunks(4)
                    .map(|a| a.iter().map(u8::to_string).collect::<Vec<_>>().join("."))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        )
    }

    #[test]
    fn real_passt_offers_an_address_by_dhcp() {
        let Some(binary) = passt_binary() else {
            println!("SKIPPED: passt not installed");
            return;
        };
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut log = tempfile::tempfile().unwrap();
        let _passt = spawn_passt(&binary, theirs, &log);
        let mut passt_said = move || {
            use std::io::Seek;
            let mut text = String::new();
            log.seek(std::io::SeekFrom::Start(0)).unwrap();
            log.read_to_string(&mut text).unwrap();
            text
        };
        // Everything but ARP, DHCP and NDP is refused: DHCP still works.
        let mut h = Harness::with_backend(OwnedFd::from(ours), Some(Vec::new()));
        h.post_rx(32, RX_BUF_LEN);
        h.pump();
        let xid = 0x736d_6f6c;
        h.send(&dhcp_discover(GUEST_MAC, xid));
        assert_eq!(h.counters().tx_frames, 1, "{:?}", h.counters());

        let deadline = Instant::now() + Duration::from_secs(10);
        let offer = loop {
            assert!(
                Instant::now() < deadline,
                "no DHCP offer from passt: {:?}; passt said: {}",
                h.counters(),
                passt_said()
            );
            h.em.run_with_timeout(50).unwrap();
            let offer = h.delivered().into_iter().find_map(|f| parse_offer(&f, xid));
            if let Some(offer) = offer {
                break offer;
            }
            assert!(
                h.dev.lock().unwrap().link_up(),
                "passt closed the stream: {}",
                passt_said()
            );
            let free = h.free_rx_slots.len().min(32);
            h.post_rx(free, RX_BUF_LEN);
        };
        let (yiaddr, opts) = offer;
        assert_eq!(opts.get(&53), Some(&vec![2]), "a DHCPOFFER");
        assert_ne!(yiaddr, [0; 4]);
        let mtu = opts
            .get(&26)
            .map(|v| u16::from_be_bytes([v[0], v[1]]).to_string());
        println!(
            "passt offered {} mask {} router {} dns {} mtu {} server {}",
            ipv4s(Some(&yiaddr.to_vec())),
            ipv4s(opts.get(&1)),
            ipv4s(opts.get(&3)),
            ipv4s(opts.get(&6)),
            mtu.as_deref().unwrap_or("-"),
            ipv4s(opts.get(&54)),
        );
        assert_eq!(mtu.as_deref(), Some("1500"), "-m 1500 is what passt offers");
    }
}

/// Between `quiesce_queues` and `resume` (a snapshot copying guest
/// memory), frames from passt and guest kicks wait: the rings stay as
/// saved. Afterwards everything goes on.
#[test]
fn a_snapshot_holds_the_queues_until_resume() {
    let mut h = Harness::new();
    h.post_rx(2, RX_BUF_LEN);
    h.pump();
    let saved = h.dev.lock().unwrap().quiesce_queues().unwrap();
    let f = frame(60, 1);
    h.peer.write_all(&wire(std::slice::from_ref(&f))).unwrap();
    h.queue_tx(&frame(60, 2));
    h.tx.kick();
    h.rx.kick();
    h.pump();
    assert!(h.rx.take_used(&h.mem).is_empty());
    assert!(h.tx.take_used(&h.mem).is_empty());
    assert!(h.wire_is_empty());
    let now = h.dev.lock().unwrap().quiesce_queues().unwrap();
    assert_eq!(
        now.iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect::<Vec<_>>(),
        saved
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect::<Vec<_>>()
    );
    assert_eq!(h.em.run_with_timeout(0).unwrap(), 0, "not polling");

    h.dev.lock().unwrap().resume();
    h.pump();
    assert_eq!(h.delivered(), vec![f]);
    assert_eq!(h.tx.take_used(&h.mem).len(), 1);
    assert_eq!(h.wire_frames(1), vec![frame(60, 2)]);
}

/// Random descriptor chains on both queues and random bytes from passt:
/// no panic, every TX chain comes back, and the buffers stay bounded.
#[test]
fn hostile_guests_and_backends_never_panic() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(0x736d_6f6c);
    for round in 0..40 {
        let mut h = Harness::new();
        let mut tx_chains = 0;
        for _ in 0..20 {
            // A TX chain of 1 to 4 descriptors anywhere, of any length.
            let n = rng.random_range(1..=4);
            let descs: Vec<(u64, u32, bool)> = (0..n)
                .map(|_| {
                    let addr = match rng.random_range(0..4) {
                        0 => rng.random::<u64>(),
                        _ => TX_BASE + rng.random_range(0..0x10_0000),
                    };
                    let len = match rng.random_range(0..4) {
                        0 => rng.random::<u32>(),
                        1 => 0,
                        _ => rng.random_range(0..2000),
                    };
                    (addr, len, rng.random_range(0..8) == 0)
                })
                .collect();
            if h.tx.free.len() >= descs.len() {
                h.tx.add(&h.mem, &descs);
                tx_chains += 1;
            }
            // An RX chain, likewise.
            let n = rng.random_range(1..=3);
            let descs: Vec<(u64, u32, bool)> = (0..n)
                .map(|_| {
                    let addr = match rng.random_range(0..4) {
                        0 => rng.random::<u64>(),
                        _ => RX_BASE + rng.random_range(0..0x10_0000),
                    };
                    (addr, rng.random_range(0..3000), rng.random_range(0..8) != 0)
                })
                .collect();
            if h.rx.free.len() >= descs.len() {
                h.rx.add(&h.mem, &descs);
            }
            // Bytes from passt: mostly frames, sometimes garbage.
            let mut bytes = Vec::new();
            if rng.random_range(0..10) == 0 {
                bytes.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>()));
            } else {
                let len = rng.random_range(1..3000);
                bytes.extend_from_slice(&(len as u32).to_be_bytes());
                bytes.extend((0..len).map(|_| rng.random::<u8>()));
            }
            if h.dev.lock().unwrap().link_up() {
                let _ = h.peer.write_all(&bytes);
            }
            h.tx.kick();
            h.rx.kick();
            h.pump();
            let (tx, rx) = h.dev.lock().unwrap().buffered();
            assert!(tx <= LEN_PREFIX + MAX_TX_CHAIN_LEN, "round {round}");
            assert!(rx <= LEN_PREFIX + MAX_FRAME_LEN, "round {round}");
            // Drain passt's end so TX never stalls.
            h.peer.set_nonblocking(true).unwrap();
            let mut sink = vec![0u8; 1 << 16];
            while h.peer.read(&mut sink).is_ok_and(|n| n > 0) {}
            h.peer.set_nonblocking(false).unwrap();
            h.pump();
            h.rx.take_used(&h.mem);
        }
        let returned = h.tx.take_used(&h.mem).len();
        assert_eq!(returned + h.tx.in_flight(), tx_chains);
        if !h.interrupt.needs_reset() {
            assert_eq!(h.tx.in_flight(), 0, "round {round}: tx chains left");
        }
    }
}
