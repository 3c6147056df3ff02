//! Host-side virtio-vsock throughput, no guest.
//!
//! A fake driver owns real split virtqueues in plain guest memory and plays
//! the guest's part of the protocol (RESPONSE, credit updates, RW packets);
//! a thread plays the host process on the device's Unix socket. The device
//! runs through its real event-loop glue (an `EventManager` on the bench
//! thread), so each byte crosses the muxer, the credit accounting, the
//! queues and a Unix socket, as it would with a guest.
//!
//! - `host_to_guest/4k`: RX data buffers of 4 KiB, as Linux posts them.
//! - `host_to_guest/64k`: 64 KiB RX buffers (the most the device accepts).
//! - `guest_to_host/64k`: 64 KiB TX packets, as Linux sends bulk data.
//!
//! The guest advertises 256 KiB of buffer (Linux's default) and returns
//! credit after every batch of packets it takes, like Linux's reader.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use event_manager::{EventManager, SubscriberOps};
use smol_vmm::devices::virtio::vsock::Vsock;
use smol_vmm::devices::virtio::{ActivatedQueue, GuestMemory, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const GUEST_BUF: u32 = 256 * 1024;
const QUEUE_SIZE: u16 = 256;
const CHAINS: u16 = 128;
const PKT_HDR: usize = 44;
const BUFS: u64 = 0x10_0000;
const BUF_STRIDE: u64 = 0x1_1000; // header at +0, data at +0x100, up to 64 KiB
const TX_BUFS: u64 = BUFS + CHAINS as u64 * BUF_STRIDE;
const MEM_SIZE: usize = (TX_BUFS + CHAINS as u64 * BUF_STRIDE) as usize;
/// Bytes moved per criterion iteration.
const CHUNK: u64 = 16 << 20;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[derive(Clone, Copy, Default)]
struct Hdr {
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn guest_hdr(op: u16, local: u32) -> Hdr {
    Hdr {
        src_port: GUEST_PORT,
        dst_port: local,
        op,
        buf_alloc: GUEST_BUF,
        ..Hdr::default()
    }
}

fn put_hdr(mem: &GuestMemory, at: u64, h: &Hdr) {
    let mut raw = [0u8; PKT_HDR];
    raw[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    raw[8..16].copy_from_slice(&2u64.to_le_bytes());
    raw[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    raw[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    raw[24..28].copy_from_slice(&h.len.to_le_bytes());
    raw[28..30].copy_from_slice(&1u16.to_le_bytes());
    raw[30..32].copy_from_slice(&h.op.to_le_bytes());
    raw[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    raw[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

fn get_hdr(mem: &GuestMemory, at: u64) -> Hdr {
    let mut raw = [0u8; PKT_HDR];
    mem.read_slice(&mut raw, GuestAddress(at)).unwrap();
    let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().unwrap());
    Hdr {
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        op: u16::from_le_bytes([raw[30], raw[31]]),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// The driver's side of one split queue whose chains are laid out once:
/// chain `i` is descriptors `2i` (header) and `2i + 1` (data).
struct Ring {
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
    kick: EventFd,
}

impl Ring {
    fn new(
        mem: &GuestMemory,
        base: u64,
        bufs: u64,
        data_len: u32,
        write: bool,
    ) -> (Ring, ActivatedQueue) {
        let desc = base;
        let avail = desc + 16 * u64::from(QUEUE_SIZE);
        let used = (avail + 6 + 2 * u64::from(QUEUE_SIZE) + 3) & !3;
        let w = if write { F_WRITE } else { 0 };
        for i in 0..u64::from(CHAINS) {
            let slot = bufs + i * BUF_STRIDE;
            put_desc(
                mem,
                desc,
                2 * i,
                slot,
                PKT_HDR as u32,
                w | F_NEXT,
                2 * i as u16 + 1,
            );
            put_desc(mem, desc, 2 * i + 1, slot + 0x100, data_len, w, 0);
        }
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(desc as u32), Some(0));
        queue.set_avail_ring_address(Some(avail as u32), Some(0));
        queue.set_used_ring_address(Some(used as u32), Some(0));
        queue.set_ready(true);
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let ring = Ring {
            avail,
            used,
            avail_idx: 0,
            used_idx: 0,
            kick: notify.try_clone().unwrap(),
        };
        (ring, ActivatedQueue { queue, notify })
    }

    fn offer(&mut self, mem: &GuestMemory, chain: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(chain * 2, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Used chains since the last call, as (chain, len).
    fn take_used(&mut self, mem: &GuestMemory, out: &mut Vec<(u16, u32)>) {
        out.clear();
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        while self.used_idx != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_idx % QUEUE_SIZE);
            let head: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push(((head / 2) as u16, len));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
    }
}

fn put_desc(mem: &GuestMemory, table: u64, idx: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(table + 16 * idx))
        .unwrap();
}

/// A running device with one established stream to guest port 1024.
struct Setup {
    _dir: tempfile::TempDir,
    mem: GuestMemory,
    em: EventManager<Arc<Mutex<Vsock>>>,
    _dev: Arc<Mutex<Vsock>>,
    rx: Ring,
    tx: Ring,
    tx_free: Vec<u16>,
    local: u32,
    used: Vec<(u16, u32)>,
}

impl Setup {
    fn new(rx_data: u32) -> (Setup, UnixStream) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rx, rxq) = Ring::new(&mem, 0, BUFS, rx_data, true);
        let (tx, txq) = Ring::new(&mem, 0x4000, TX_BUFS, 64 * 1024, false);
        let (_ev, evq) = Ring::new(&mem, 0x8000, BUFS, 0, true);
        dev.lock()
            .unwrap()
            .activate(
                mem.clone(),
                Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                vec![rxq, txq, evq],
            )
            .unwrap();
        let mut s = Setup {
            _dir: dir,
            mem,
            em,
            _dev: dev,
            rx,
            tx,
            tx_free: (0..CHAINS).rev().collect(),
            local: 0,
            used: Vec::new(),
        };
        for c in 0..CHAINS {
            s.rx.offer(&s.mem, c);
        }
        s.rx.kick();

        let mut host = UnixStream::connect(&uds).unwrap();
        host.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        while s.local == 0 {
            s.em.run_with_timeout(100).unwrap();
            if let Some(port) = s.rx_packets(|h| (h.op == OP_REQUEST).then_some(h.src_port)) {
                s.local = port;
            }
        }
        s.send(guest_hdr(OP_RESPONSE, s.local));
        s.em.run_with_timeout(100).unwrap();
        let mut ok = [0u8; 1];
        let mut line = Vec::new();
        while ok[0] != b'\n' {
            host.read_exact(&mut ok).unwrap();
            line.push(ok[0]);
        }
        assert!(line.starts_with(b"OK "), "handshake: {line:?}");
        (s, host)
    }

    /// Takes used RX buffers, reposts them, and returns the last `Some` of
    /// `f` over their headers.
    fn rx_packets<T>(&mut self, mut f: impl FnMut(&Hdr) -> Option<T>) -> Option<T> {
        self.rx.take_used(&self.mem, &mut self.used);
        let mut last = None;
        for &(chain, _) in &self.used {
            let h = get_hdr(&self.mem, BUFS + u64::from(chain) * BUF_STRIDE);
            if let Some(v) = f(&h) {
                last = Some(v);
            }
            self.rx.offer(&self.mem, chain);
        }
        if !self.used.is_empty() {
            self.rx.kick();
        }
        last
    }

    fn reclaim_tx(&mut self) {
        self.tx.take_used(&self.mem, &mut self.used);
        self.tx_free.extend(self.used.iter().map(|&(c, _)| c));
    }

    /// Queues one guest packet (header only, or a `len`-byte RW whose data
    /// is whatever the buffer holds) without kicking.
    fn queue_tx(&mut self, h: Hdr) -> bool {
        let Some(chain) = self.tx_free.pop() else {
            return false;
        };
        let slot = TX_BUFS + u64::from(chain) * BUF_STRIDE;
        put_hdr(&self.mem, slot, &h);
        self.tx.offer(&self.mem, chain);
        true
    }

    fn send(&mut self, h: Hdr) {
        self.reclaim_tx();
        assert!(self.queue_tx(h));
        self.tx.kick();
    }
}

/// A host process that writes until the stream breaks.
fn writer(mut host: UnixStream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let buf = vec![0x5au8; 256 * 1024];
        while host.write_all(&buf).is_ok() {}
    })
}

/// A host process that reads until EOF.
fn reader(mut host: UnixStream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while matches!(host.read(&mut buf), Ok(n) if n > 0) {}
    })
}

fn host_to_guest(c: &mut Criterion) {
    let mut g = c.benchmark_group("vsock_muxer/host_to_guest");
    g.throughput(Throughput::Bytes(CHUNK));
    g.measurement_time(Duration::from_secs(5));
    for (name, rx_data) in [("4k", 4096u32), ("64k", 64 * 1024)] {
        let (mut s, host) = Setup::new(rx_data);
        let shutdown = host.try_clone().unwrap();
        let thread = writer(host);
        let mut received: u64 = 0;
        let mut announced: u64 = 0;
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let target = received + iters * CHUNK;
                let start = Instant::now();
                while received < target {
                    s.em.run_with_timeout(10).unwrap();
                    let mut got = 0u64;
                    s.rx_packets(|h| {
                        if h.op == OP_RW {
                            got += u64::from(h.len);
                        }
                        None::<()>
                    });
                    received += got;
                    // Like Linux's reader: return credit once a good part
                    // of the buffer has been consumed.
                    if received - announced >= u64::from(GUEST_BUF / 4) {
                        let mut h = guest_hdr(OP_CREDIT_UPDATE, s.local);
                        h.fwd_cnt = received as u32;
                        s.send(h);
                        announced = received;
                    }
                }
                start.elapsed()
            })
        });
        shutdown.shutdown(std::net::Shutdown::Both).unwrap();
        drop(s);
        thread.join().unwrap();
    }
    g.finish();
}

fn guest_to_host(c: &mut Criterion) {
    let mut g = c.benchmark_group("vsock_muxer/guest_to_host");
    g.throughput(Throughput::Bytes(CHUNK));
    g.measurement_time(Duration::from_secs(5));
    let pkt: u32 = 64 * 1024;
    let (mut s, host) = Setup::new(4096);
    let shutdown = host.try_clone().unwrap();
    let thread = reader(host);
    let mut sent: u64 = 0;
    let mut device_fwd: u32 = 0;
    // The device advertises 256 KiB (CONN_BUF_ALLOC).
    let device_buf = u64::from(smol_vmm::devices::virtio::vsock::CONN_BUF_ALLOC);
    g.bench_function(BenchmarkId::from_parameter("64k"), |b| {
        b.iter_custom(|iters| {
            let target = sent + iters * CHUNK;
            let start = Instant::now();
            while sent < target {
                s.reclaim_tx();
                let in_flight = (sent as u32).wrapping_sub(device_fwd) as u64;
                let mut credit = device_buf.saturating_sub(in_flight);
                let mut queued = false;
                while credit >= u64::from(pkt) {
                    let mut h = guest_hdr(OP_RW, s.local);
                    h.len = pkt;
                    h.fwd_cnt = 0;
                    if !s.queue_tx(h) {
                        break;
                    }
                    sent += u64::from(pkt);
                    credit -= u64::from(pkt);
                    queued = true;
                }
                if queued {
                    s.tx.kick();
                }
                s.em.run_with_timeout(10).unwrap();
                if let Some(f) = s.rx_packets(|h| Some(h.fwd_cnt)) {
                    device_fwd = f;
                }
            }
            start.elapsed()
        })
    });
    shutdown.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    thread.join().unwrap();
    g.finish();
}

criterion_group!(benches, host_to_guest, guest_to_host);
criterion_main!(benches);
