//! virtio-vsock: arbitrary guest TX packets (any op, ports, len, flags,
//! buf_alloc, fwd_cnt, descriptor layout) and RX buffers through the
//! device's queue glue (`VsockQueues`) into the muxer and its connections,
//! with host processes on real Unix sockets: streams that connect with any
//! handshake line, and listeners the guest connects to, which write, read,
//! half-close and close. Refused and reset streams are expected; a panic is
//! a bug, and so is memory the guest can grow: after every action
//! `VsockMuxer::check_bounds` holds (streams, owed RSTs, the queue for the
//! guest, every connection's buffers).
//!
//! Input (little endian): a config byte, then actions, each an opcode byte
//! (modulo 11) and its fields.
//! - config: bits 0-2 log2 of the queue sizes (1 to 128); bit 3 the used
//!   rings and the device's first used indices from the input (used u16
//!   and next_used u16 per queue, rx, tx, event: a used ring over its avail
//!   ring plays a driver that posts as fast as the device returns).
//! - 0 guest packet: fix u8 (bit 0 src_cid = guest, bit 1 dst_cid = host,
//!   bit 2 type = stream, bit 3 len = data length; else the raw field
//!   follows), src_cid u64?, dst_cid u64?, src_port (port), dst_port
//!   (port), op u8 (1-7 valid), type u16?, flags u8, buf_alloc u32,
//!   fwd_cnt u32, data length u16, len u32?, fill byte, layout u8 (bit 0
//!   header and data in one descriptor, bit 1 header device-writable),
//!   slot u8. A port is a byte: 0-5 the ports below, else a u32 follows.
//! - 1 RX buffer: layout u8 (bit 0 one descriptor, bit 1 device-readable),
//!   data length u16, slot u8.
//! - 2 host connects: mode u8 (even: `CONNECT <port>\n` with a port; odd:
//!   a count u8 and that many raw bytes).
//! - 3 host writes: stream u8, length u16, fill byte.  4 host reads:
//!   stream u8.  5 host closes: stream u8, how u8 (drop, shut write, shut
//!   read, both).  6 host accepts the guest's connections.
//! - 7 the device runs every queue.  8 event buffer and a transport reset:
//!   length u8.  9 device reset.
//! - 10 raw descriptor: queue u8, index u8, address u16, length u16, flags
//!   u8, next u8, then that head is made available.
//!
//! Guest ports 1024 and 1025 have a host listener, 1026 none; host
//! connections get local ports from 2^30.

#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smol_fuzz::{scratch_dir, Input};
use smol_vmm::devices::virtio::vsock::VsockMuxer;
use smol_vmm::devices::virtio::{ActivatedQueue, GuestMemory, Interrupt};
use smol_vmm::fuzzing::{DriverQueue, VsockQueues, F_NEXT, F_WRITE};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const REGION: usize = 64 << 10;
/// The three queues' rings (up to 3.4 KiB each), below the buffers.
const RING_BASE: [u64; 3] = [0, 0x1000, 0x2000];
const EVENT_BUF: u64 = 0x3000;
const TX_SLOTS: u64 = 0x4000;
const RX_SLOTS: u64 = 0x1_0000;
const PORTS: [u32; 6] = [1024, 1025, 1026, 1 << 30, (1 << 30) + 1, (1 << 30) + 2];
const LISTEN_PORTS: [u32; 2] = [1024, 1025];
/// Host streams the harness keeps at once.
const MAX_HOST_STREAMS: usize = 16;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(scratch_dir).path()
}

fuzz_target!(|data: &[u8]| run(data));

struct Guest {
    mem: GuestMemory,
    /// rx, tx, event.
    drivers: Vec<DriverQueue>,
    queues: VsockQueues,
}

/// Sets up the three queues as the driver does after a reset; `None` when
/// the input's rings would not pass the transport's check.
fn setup(mem: &GuestMemory, size: u16, custom: Option<&mut Input>) -> Option<Guest> {
    let mut drivers = Vec::new();
    let mut activated: Vec<ActivatedQueue> = Vec::new();
    let mut custom = custom;
    for base in RING_BASE {
        let (mut d, mut a) = DriverQueue::new(mem, base, size);
        if let Some(input) = custom.as_deref_mut() {
            // As the transport sets it: a misaligned address is ignored.
            a.queue
                .set_used_ring_address(Some(u32::from(input.u16())), Some(0));
            a.queue.set_next_used(input.u16());
            d.used = a.queue.used_ring();
            if !a.queue.is_valid(mem) {
                return None;
            }
        }
        drivers.push(d);
        activated.push(a);
    }
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let queues = VsockQueues::new(mem.clone(), interrupt, activated).expect("three queues");
    Some(Guest {
        mem: mem.clone(),
        drivers,
        queues,
    })
}

impl Guest {
    /// Adds a chain when the driver has the descriptors for it.
    fn add(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> bool {
        let d = &mut self.drivers[q];
        if d.free.len() < bufs.len() {
            return false;
        }
        d.add(&self.mem, bufs);
        true
    }

    /// Takes the used entries back, as the driver's interrupt handler does.
    fn reap(&mut self) {
        for d in &mut self.drivers {
            // A used ring over another ring reads as anything: more than a
            // queue's worth is skipped, not walked entry by entry.
            let idx: u16 = self
                .mem
                .read_obj(GuestAddress(d.used + 2))
                .unwrap_or(d.used_idx);
            if idx.wrapping_sub(d.used_idx) > d.size {
                d.used_idx = idx;
                continue;
            }
            d.take_used(&self.mem);
        }
    }
}

fn port(input: &mut Input) -> u32 {
    let b = usize::from(input.u8());
    PORTS.get(b).copied().unwrap_or_else(|| input.u32())
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let size = 1u16 << (cfg & 7);
    let custom = cfg & 8 != 0;

    let uds = dir().join("v.sock");
    let mut muxer = VsockMuxer::new(GUEST_CID, &uds).expect("vsock socket");
    let listeners: Vec<UnixListener> = LISTEN_PORTS.iter().map(|p| listen(&uds, *p)).collect();
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ])
    .expect("guest memory");
    let Some(mut guest) = setup(&mem, size, custom.then_some(&mut input)) else {
        return;
    };
    let mut hosts: Vec<UnixStream> = Vec::new();

    while !input.is_empty() {
        match input.u8() % 11 {
            0 => {
                let fix = input.u8();
                let src_cid = if fix & 1 != 0 { GUEST_CID } else { input.u64() };
                let dst_cid = if fix & 2 != 0 { HOST_CID } else { input.u64() };
                let src_port = port(&mut input);
                let dst_port = port(&mut input);
                let op = u16::from(input.u8());
                let type_ = if fix & 4 != 0 { 1 } else { input.u16() };
                let flags = u32::from(input.u8());
                let buf_alloc = input.u32();
                let fwd_cnt = input.u32();
                let data_len = u32::from(input.u16());
                let len = if fix & 8 != 0 { data_len } else { input.u32() };
                let fill = input.u8();
                let layout = input.u8();
                let slot = TX_SLOTS + u64::from(input.u8()) * 0x100;

                let mut hdr = [0u8; 44];
                hdr[0..8].copy_from_slice(&src_cid.to_le_bytes());
                hdr[8..16].copy_from_slice(&dst_cid.to_le_bytes());
                hdr[16..20].copy_from_slice(&src_port.to_le_bytes());
                hdr[20..24].copy_from_slice(&dst_port.to_le_bytes());
                hdr[24..28].copy_from_slice(&len.to_le_bytes());
                hdr[28..30].copy_from_slice(&type_.to_le_bytes());
                hdr[30..32].copy_from_slice(&op.to_le_bytes());
                hdr[32..36].copy_from_slice(&flags.to_le_bytes());
                hdr[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
                hdr[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
                let _ = mem.write_slice(&hdr, GuestAddress(slot));
                let data_at = slot + 44;
                let body = vec![fill; data_len as usize];
                let _ = mem.write_slice(&body, GuestAddress(data_at));
                let w = layout & 2 != 0;
                let chain: &[(u64, u32, bool)] = if layout & 1 != 0 {
                    &[(slot, 44 + data_len, w)]
                } else if data_len == 0 {
                    &[(slot, 44, w)]
                } else {
                    &[(slot, 44, w), (data_at, data_len, false)]
                };
                if guest.add(1, chain) {
                    guest.queues.process_tx(&mut muxer);
                    guest.queues.process_rx(&mut muxer);
                }
            }
            1 => {
                let layout = input.u8();
                let data_len = u32::from(input.u16());
                let slot = RX_SLOTS + u64::from(input.u8()) * 0x100;
                let w = layout & 2 == 0;
                let chain: &[(u64, u32, bool)] = if layout & 1 != 0 {
                    &[(slot, 44 + data_len, w)]
                } else {
                    &[(slot, 44, w), (slot + 44, data_len, w)]
                };
                if guest.add(0, chain) {
                    guest.queues.process_rx(&mut muxer);
                }
            }
            2 => {
                let mode = input.u8();
                let line = if mode & 1 == 0 {
                    format!("CONNECT {}\n", port(&mut input)).into_bytes()
                } else {
                    let n = usize::from(input.u8());
                    input.bytes(n).to_vec()
                };
                if hosts.len() < MAX_HOST_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(&line);
                        hosts.push(s);
                    }
                }
                host_events(&mut guest, &mut muxer);
            }
            3 => {
                let i = usize::from(input.u8());
                let n = usize::from(input.u16());
                let fill = input.u8();
                if let Some(s) = stream(&mut hosts, i) {
                    let _ = s.write(&vec![fill; n]);
                }
                host_events(&mut guest, &mut muxer);
            }
            4 => {
                let i = usize::from(input.u8());
                if let Some(s) = stream(&mut hosts, i) {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                }
                host_events(&mut guest, &mut muxer);
            }
            5 => {
                let i = usize::from(input.u8());
                let how = input.u8() % 4;
                if !hosts.is_empty() {
                    let i = i % hosts.len();
                    match how {
                        0 => drop(hosts.swap_remove(i)),
                        1 => drop(hosts[i].shutdown(Shutdown::Write)),
                        2 => drop(hosts[i].shutdown(Shutdown::Read)),
                        _ => drop(hosts[i].shutdown(Shutdown::Both)),
                    }
                }
                host_events(&mut guest, &mut muxer);
            }
            6 => {
                for l in &listeners {
                    while let Ok((s, _)) = l.accept() {
                        let _ = s.set_nonblocking(true);
                        if hosts.len() < MAX_HOST_STREAMS {
                            hosts.push(s);
                        }
                    }
                }
                host_events(&mut guest, &mut muxer);
            }
            7 => {
                guest.queues.process_tx(&mut muxer);
                host_events(&mut guest, &mut muxer);
                guest.queues.signal_used();
            }
            8 => {
                let len = u32::from(input.u8());
                if guest.add(2, &[(EVENT_BUF, len, true)]) {
                    guest.queues.post_transport_reset();
                }
            }
            9 => {
                muxer.reset();
                let Some(g) = setup(&mem, size, custom.then_some(&mut input)) else {
                    return;
                };
                guest = g;
            }
            _ => {
                let q = usize::from(input.u8()) % 3;
                let d = &mut guest.drivers[q];
                let idx = u16::from(input.u8()) % size;
                let addr = u64::from(input.u16());
                let len = u32::from(input.u16());
                let flags = u16::from(input.u8()) & (F_NEXT | F_WRITE | 4);
                let next = u16::from(input.u8());
                d.add_raw(&mem, &[(idx, addr, len, flags, next)], idx);
                match q {
                    0 => guest.queues.process_rx(&mut muxer),
                    1 => guest.queues.process_tx(&mut muxer),
                    _ => guest.queues.post_transport_reset(),
                };
            }
        }
        guest.reap();
        if let Err(e) = muxer.check_bounds() {
            panic!("vsock muxer out of bounds: {e}");
        }
    }
}

/// The muxer's side of a host event, then what it has for the guest.
fn host_events(guest: &mut Guest, muxer: &mut VsockMuxer) {
    muxer.process_host_events();
    guest.queues.process_rx(muxer);
}

fn stream(hosts: &mut [UnixStream], i: usize) -> Option<&mut UnixStream> {
    if hosts.is_empty() {
        return None;
    }
    let n = hosts.len();
    hosts.get_mut(i % n)
}

fn listen(uds: &Path, port: u32) -> UnixListener {
    let path = PathBuf::from(format!("{}_{port}", uds.display()));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).expect("host listener");
    l.set_nonblocking(true).expect("non-blocking listener");
    l
}
