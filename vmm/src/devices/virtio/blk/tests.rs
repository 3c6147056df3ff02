//! Tests of the whole device path (event manager, activation, worker,
//! used ring) and a randomized descriptor-chain test, plus the helpers the
//! per-file unit tests share. Plain guest memory, no KVM.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::DiskFile;
use super::worker::{self, BlockQueue, Dispatched};
use super::*;
use crate::devices::virtio::{
    ActivatedQueue, GuestMemory, Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG,
};
use crate::DiskConfig;

/// Guest memory: two adjacent 1 MiB regions, so buffers can straddle them.
pub const MEM_SIZE: u64 = 2 << 20;
/// Where tests put request buffers (the queue lives below).
pub const BUF_BASE: u64 = 0x1_0000;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

pub fn test_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), (MEM_SIZE / 2) as usize),
        (GuestAddress(MEM_SIZE / 2), (MEM_SIZE / 2) as usize),
    ])
    .unwrap()
}

/// A sparse image file of `len` bytes.
pub fn image(len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(len).unwrap();
    f
}

pub fn disk_config(path: &Path, read_only: bool, id: &str) -> DiskConfig {
    DiskConfig {
        path: path.to_owned(),
        read_only,
        id: id.to_owned(),
    }
}

pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

pub fn write_header(mem: &GuestMemory, addr: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Stores `descs` as one chain at table index `first` and makes it
/// available (only while the avail index is below the queue size: the mock
/// does not wrap).
pub fn add_chain(mq: &MockSplitQueue<GuestMemory>, first: u16, descs: &[RawDescriptor]) {
    let linked: Vec<_> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let last = i == descs.len() - 1;
            let flags = if last {
                d.flags() & !(VRING_DESC_F_NEXT as u16)
            } else {
                d.flags() | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
        })
        .collect();
    mq.add_desc_chains(&linked, first).unwrap();
}

/// Makes `head` available once more, in the next avail slot of a queue of
/// `size` entries, whatever it is.
fn make_available(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>, size: u16, head: u16) {
    let idx: u16 = mem.read_obj(mq.avail_addr().unchecked_add(2)).unwrap();
    let slot = mq.avail_addr().unchecked_add(4 + 2 * u64::from(idx % size));
    mem.write_obj(head, slot).unwrap();
    mem.write_obj(idx.wrapping_add(1), mq.avail_addr().unchecked_add(2))
        .unwrap();
}

pub fn used_idx(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>) -> u16 {
    mem.read_obj(mq.used_addr().unchecked_add(2)).unwrap()
}

fn used_elem(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>, i: u16) -> (u32, u32) {
    let base = mq.used_addr().unchecked_add(4 + 8 * u64::from(i));
    (
        mem.read_obj(base).unwrap(),
        mem.read_obj(base.unchecked_add(4)).unwrap(),
    )
}

pub fn status_at(mem: &GuestMemory, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Waits up to 10 s for `done`, which another thread makes true.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_used(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>, want: u16) {
    wait_until(&format!("the used index is {want}"), || {
        used_idx(mem, mq) == want
    });
}

/// A queue on `mq`, and its interrupt line: what the driver is told.
fn test_queue(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>) -> (BlockQueue, Interrupt) {
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let queue = BlockQueue::new(mq.create_queue().unwrap(), mem.clone(), interrupt.clone());
    (queue, interrupt)
}

#[test]
fn features_and_config_space() {
    let img = image(8 << 20);
    let rw = Block::new(&disk_config(img.path(), false, "x")).unwrap();
    assert_eq!(rw.device_type(), 2);
    assert_eq!(rw.queue_max_sizes(), &[256]);
    let f = rw.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);

    let mut cap = [0u8; 8];
    rw.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (8 << 20) / 512);
    let mut blk_size = [0u8; 4];
    rw.read_config(20, &mut blk_size);
    assert_eq!(u32::from_le_bytes(blk_size), 512);
    let mut seg_max = [0u8; 4];
    rw.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    // Out of range reads leave the buffer alone.
    let mut past = [0xaau8; 8];
    rw.read_config(CONFIG_LEN as u64 - 4, &mut past);
    assert_eq!(past, [0xaa; 8]);
    rw.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0xaa; 8]);
    drop(rw);

    let ro = Block::new(&disk_config(img.path(), true, "x")).unwrap();
    let f = ro.avail_features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn new_names_bad_input() {
    let missing = Path::new("/nonexistent/smol/disk.img");
    let err = Block::new(&disk_config(missing, false, "x")).unwrap_err();
    assert!(matches!(err, Error::Open { .. }));
    assert!(err.to_string().contains("/nonexistent/smol/disk.img"));

    let img = image(1 << 20);
    let err = Block::new(&disk_config(img.path(), false, "a-very-long-disk-id-0123")).unwrap_err();
    assert!(matches!(err, Error::IdTooLong { .. }), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err = Block::new(&disk_config(dir.path(), true, "x")).unwrap_err();
    assert!(matches!(err, Error::NotADisk { .. }), "{err}");

    let first = Block::new(&disk_config(img.path(), false, "x")).unwrap();
    let err = Block::new(&disk_config(img.path(), false, "x")).unwrap_err();
    assert!(matches!(err, Error::InUse { .. }), "{err}");
    drop(first);
    let _a = Block::new(&disk_config(img.path(), true, "x")).unwrap();
    let _b = Block::new(&disk_config(img.path(), true, "x")).unwrap();
}

#[test]
fn activate_rejects_wrong_queue_count() {
    let img = image(1 << 20);
    let mut block = Block::new(&disk_config(img.path(), false, "x")).unwrap();
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let err = block
        .activate(test_mem(), interrupt, Vec::new())
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    assert!(!block.is_activated());
}

/// The whole path: event manager, activation, kick, worker thread, used
/// ring, interrupt; then reset and reactivation.
#[test]
fn device_serves_requests_through_the_event_loop() {
    let mem = test_mem();
    let img = image(4 << 20);
    let block = Arc::new(Mutex::new(
        Block::new(&disk_config(img.path(), false, "smol-disk-0")).unwrap(),
    ));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());

    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let activate = |block: &Mutex<Block>| {
        let queue: Queue = mq.create_queue().unwrap();
        block
            .lock()
            .unwrap()
            .activate(
                mem.clone(),
                Interrupt::new(irq.try_clone().unwrap()),
                vec![ActivatedQueue {
                    queue,
                    notify: notify.try_clone().unwrap(),
                }],
            )
            .unwrap();
    };
    activate(&block);
    assert!(block.lock().unwrap().is_activated());
    em.run_with_timeout(100).unwrap();

    // A write of 12 KiB in two segments, the second straddling the memory
    // regions; a read back into one buffer; get-id; flush.
    let pattern: Vec<u8> = (0..12288u32).map(|i| (i * 7 + 3) as u8).collect();
    let seg2 = MEM_SIZE / 2 - 4096;
    mem.write_slice(&pattern[..4096], GuestAddress(BUF_BASE + 0x1000))
        .unwrap();
    mem.write_slice(&pattern[4096..], GuestAddress(seg2))
        .unwrap();
    write_header(&mem, BUF_BASE, VIRTIO_BLK_T_OUT, 100);
    add_chain(
        &mq,
        0,
        &[
            desc(BUF_BASE, 16, 0),
            desc(BUF_BASE + 0x1000, 4096, 0),
            desc(seg2, 8192, 0),
            desc(BUF_BASE + 0x100, 1, WRITE),
        ],
    );
    write_header(&mem, BUF_BASE + 0x200, VIRTIO_BLK_T_IN, 100);
    add_chain(
        &mq,
        4,
        &[
            desc(BUF_BASE + 0x200, 16, 0),
            desc(BUF_BASE + 0x8000, 12288, WRITE),
            desc(BUF_BASE + 0x300, 1, WRITE),
        ],
    );
    write_header(&mem, BUF_BASE + 0x400, VIRTIO_BLK_T_GET_ID, 0);
    add_chain(
        &mq,
        7,
        &[
            desc(BUF_BASE + 0x400, 16, 0),
            desc(BUF_BASE + 0x500, 20, WRITE),
            desc(BUF_BASE + 0x600, 1, WRITE),
        ],
    );
    write_header(&mem, BUF_BASE + 0x700, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(
        &mq,
        10,
        &[
            desc(BUF_BASE + 0x700, 16, 0),
            desc(BUF_BASE + 0x800, 1, WRITE),
        ],
    );

    notify.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    wait_used(&mem, &mq, 4);
    assert!(irq.read().unwrap() >= 1, "driver was not interrupted");

    for addr in [0x100, 0x300, 0x600, 0x800] {
        assert_eq!(status_at(&mem, BUF_BASE + addr), VIRTIO_BLK_S_OK as u8);
    }
    let mut back = vec![0u8; 12288];
    mem.read_slice(&mut back, GuestAddress(BUF_BASE + 0x8000))
        .unwrap();
    assert_eq!(back, pattern);
    let mut id = [0xffu8; 20];
    mem.read_slice(&mut id, GuestAddress(BUF_BASE + 0x500))
        .unwrap();
    assert_eq!(&id[..11], b"smol-disk-0");
    assert_eq!(id[11..], [0; 9]);
    let used: Vec<_> = (0..4).map(|i| used_elem(&mem, &mq, i)).collect();
    assert_eq!(used, [(0, 1), (4, 12289), (7, 21), (10, 1)]);
    let mut on_disk = vec![0u8; 12288];
    std::os::unix::fs::FileExt::read_exact_at(img.as_file(), &mut on_disk, 100 * 512).unwrap();
    assert_eq!(on_disk, pattern);

    // Reset: the notify fd is dropped from the loop, kicks do nothing.
    assert!(block.lock().unwrap().reset());
    assert!(!block.lock().unwrap().is_activated());
    em.run_with_timeout(100).unwrap();
    notify.write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    let _ = notify.read();

    // Activated again on a fresh ring, it serves again.
    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let queue: Queue = mq.create_queue().unwrap();
    block
        .lock()
        .unwrap()
        .activate(
            mem.clone(),
            Interrupt::new(irq.try_clone().unwrap()),
            vec![ActivatedQueue {
                queue,
                notify: notify.try_clone().unwrap(),
            }],
        )
        .unwrap();
    em.run_with_timeout(100).unwrap();
    add_chain(
        &mq,
        0,
        &[
            desc(BUF_BASE + 0x700, 16, 0),
            desc(BUF_BASE + 0x800, 1, WRITE),
        ],
    );
    mem.write_obj(0xffu8, GuestAddress(BUF_BASE + 0x800))
        .unwrap();
    notify.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    wait_used(&mem, &mq, 1);
    assert_eq!(status_at(&mem, BUF_BASE + 0x800), VIRTIO_BLK_S_OK as u8);
}

/// A guest error in one chain neither stops the queue nor reaches the host
/// as a panic: the chains after it are served. (Errors in the ring itself
/// do stop it: see `ring_errors_stop_the_queue`.)
#[test]
fn bad_chains_do_not_stall_the_queue() {
    let mem = test_mem();
    let img = image(1 << 20);
    let disk = Arc::new(DiskFile::open(img.path(), false, "x").unwrap());
    let mq = MockSplitQueue::new(&mem, 16);
    let (bq, interrupt) = test_queue(&mem, &mq);
    let bq = Arc::new(bq);
    let worker = worker::IoWorker::spawn(disk, bq.clone()).unwrap();

    // 0: no status byte (returned with len 0); 1: read past the end (IOERR);
    // 4: a good flush.
    write_header(&mem, BUF_BASE, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&mq, 0, &[desc(BUF_BASE, 16, 0)]);
    write_header(&mem, BUF_BASE + 0x100, VIRTIO_BLK_T_IN, 2048);
    add_chain(
        &mq,
        1,
        &[
            desc(BUF_BASE + 0x100, 16, 0),
            desc(BUF_BASE + 0x1000, 512, WRITE),
            desc(BUF_BASE + 0x200, 1, WRITE),
        ],
    );
    add_chain(
        &mq,
        4,
        &[desc(BUF_BASE, 16, 0), desc(BUF_BASE + 0x300, 1, WRITE)],
    );

    let dispatched = worker::dispatch(&bq, |job| worker.submit(job));
    assert_eq!(
        dispatched,
        Dispatched {
            jobs: 3,
            more: false
        }
    );
    worker.drain();
    drop(worker);
    assert!(!bq.needs_reset());
    assert_eq!(interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
    assert_eq!(used_idx(&mem, &mq), 3);
    assert_eq!(used_elem(&mem, &mq, 0), (0, 0));
    assert_eq!(used_elem(&mem, &mq, 1), (1, 1));
    assert_eq!(status_at(&mem, BUF_BASE + 0x200), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used_elem(&mem, &mq, 2), (4, 1));
    assert_eq!(status_at(&mem, BUF_BASE + 0x300), VIRTIO_BLK_S_OK as u8);
}

/// A driver that makes a head available again while it is still in flight
/// gets it served once, and the queue stops until the device is reset; the
/// driver is told so (DEVICE_NEEDS_RESET, with one configuration-change
/// interrupt). The review's case: one chain in every avail slot, the avail
/// index moved a ring at a time, made 16,001 jobs on a 16-entry queue with
/// none returned.
#[test]
fn head_reposted_while_in_flight_stops_the_queue() {
    const QSIZE: u16 = 16;
    let mem = test_mem();
    let img = image(1 << 20);
    let disk = DiskFile::open(img.path(), false, "x").unwrap();
    let mq = MockSplitQueue::new(&mem, QSIZE);
    let (bq, interrupt) = test_queue(&mem, &mq);
    write_header(&mem, BUF_BASE, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(
        &mq,
        0,
        &[desc(BUF_BASE, 16, 0), desc(BUF_BASE + 0x100, 1, WRITE)],
    );

    let mut jobs = Vec::new();
    for _ in 0..1000 {
        worker::dispatch(&bq, |job| jobs.push(job));
        for _ in 0..QSIZE {
            make_available(&mem, &mq, QSIZE, 0);
        }
    }
    assert_eq!(jobs.len(), 1, "the in-flight head was handed out again");
    assert!(bq.needs_reset());
    assert!(interrupt.needs_reset(), "the transport would not show it");
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(
        interrupt.irq_evt().read().unwrap(),
        1,
        "one interrupt for the 999 dispatches after the error"
    );
    assert_eq!(used_idx(&mem, &mq), 0);

    // The one real request still completes; the queue stays stopped, even
    // for a head that is no longer in flight.
    worker::complete(&disk, &bq, jobs.remove(0));
    assert_eq!(used_idx(&mem, &mq), 1);
    assert_eq!(status_at(&mem, BUF_BASE + 0x100), VIRTIO_BLK_S_OK as u8);
    let dispatched = worker::dispatch(&bq, |_| panic!("a stopped queue popped a chain"));
    assert_eq!(
        dispatched,
        Dispatched {
            jobs: 0,
            more: false
        }
    );
}

/// A head outside the queue (it could never be returned) and an avail index
/// more than a queue ahead are driver errors too: the queue stops, the
/// chains after them wait for a reset.
#[test]
fn ring_errors_stop_the_queue() {
    const QSIZE: u16 = 16;
    let mem = test_mem();
    let flush = [desc(BUF_BASE, 16, 0), desc(BUF_BASE + 0x100, 1, WRITE)];
    write_header(&mem, BUF_BASE, VIRTIO_BLK_T_FLUSH, 0);

    let mq = MockSplitQueue::new(&mem, QSIZE);
    let (bq, interrupt) = test_queue(&mem, &mq);
    make_available(&mem, &mq, QSIZE, 200);
    add_chain(&mq, 0, &flush);
    assert!(bq.pop().is_none());
    assert!(bq.needs_reset());
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert!(bq.pop().is_none());

    let mq = MockSplitQueue::new(&mem, QSIZE);
    let (bq, interrupt) = test_queue(&mem, &mq);
    add_chain(&mq, 0, &flush);
    mem.write_obj(QSIZE + 1, mq.avail_addr().unchecked_add(2))
        .unwrap();
    assert!(bq.pop().is_none());
    assert!(bq.needs_reset());
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
}

/// The needs-reset flag is the stop itself: a queue whose line comes back
/// from a snapshot with it set pops nothing, valid chains included.
#[test]
fn queue_restored_needing_reset_stays_stopped() {
    let mem = test_mem();
    write_header(&mem, BUF_BASE, VIRTIO_BLK_T_FLUSH, 0);
    let mq = MockSplitQueue::new(&mem, 16);
    let (bq, interrupt) = test_queue(&mem, &mq);
    interrupt.restore(0, true);
    add_chain(
        &mq,
        0,
        &[desc(BUF_BASE, 16, 0), desc(BUF_BASE + 0x100, 1, WRITE)],
    );
    assert!(bq.pop().is_none());
    interrupt.reset();
    assert!(bq.pop().is_some(), "the flag is all that stops it");
}

/// A driver can also keep the queue busy for ever without re-posting a
/// head in flight, by posting each chain again as soon as it is returned
/// (a vCPU bumping the avail index as fast as the device pops). Here every
/// completion does it by itself: the used ring lies over the avail ring and
/// the device's used index is one ahead, so each used element it writes
/// (head 0, length 0) reads as head 0 available once more. One dispatch
/// still returns after a queue's worth and asks to be called again.
#[test]
fn dispatch_returns_after_a_queue_worth_of_chains() {
    const QSIZE: u16 = 16;
    let mem = test_mem();
    let img = image(1 << 20);
    let disk = DiskFile::open(img.path(), false, "x").unwrap();
    let mq = MockSplitQueue::new(&mem, QSIZE);
    let mut queue: Queue = mq.create_queue().unwrap();
    let avail = mq.avail_addr().0;
    queue.set_used_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_next_used(1);
    let bq = BlockQueue::new(
        queue,
        mem.clone(),
        Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    );
    // No status byte: the chain goes back with length 0.
    write_header(&mem, BUF_BASE, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&mq, 0, &[desc(BUF_BASE, 16, 0)]);

    // On a thread, so that a call that never returns fails the test.
    let (done, returned) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let dispatched = worker::dispatch(&bq, |job| worker::complete(&disk, &bq, job));
            let _ = done.send((dispatched, bq.needs_reset()));
        }
    });
    let full = Dispatched {
        jobs: usize::from(QSIZE),
        more: true,
    };
    for call in 0..2 {
        let got = returned
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("dispatch call {call} never returned"));
        assert_eq!(got, (full, false), "call {call}");
    }
}

/// Random descriptor tables and avail rings, thousands of them: every chain
/// is served without a panic, gets a status in {OK, IOERR, UNSUPP} when it
/// has a status byte, never reports more bytes than it could hold, and the
/// used ring advances once per chain.
#[test]
fn random_descriptor_chains() {
    const CASES: u64 = 3000;
    const QSIZE: u16 = 16;
    let mem = test_mem();
    let img = image(1 << 20);
    let disk = DiskFile::open(img.path(), false, "fuzz").unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed_b10c);
    let types = [0u32, 1, 4, 8, 11, 13, 2, 0xffff_ffff];
    // How the chains fared, to show the test reaches past the parser.
    let (mut parsed, mut ok, mut rejected, mut silent) = (0, 0, 0, 0);

    for case in 0..CASES {
        let mq = MockSplitQueue::new(&mem, QSIZE);
        let (bq, _) = test_queue(&mem, &mq);
        // Plausible headers sprinkled over the buffer area.
        for slot in 0..8u64 {
            let sector = match rng.random_range(0..4) {
                0 => rng.random_range(0..2048),
                1 => 2047,
                2 => u64::MAX / 512 - rng.random_range(0..4),
                _ => rng.random(),
            };
            let kind = types[rng.random_range(0..types.len())];
            write_header(&mem, BUF_BASE + slot * 0x1000, kind, sector);
        }
        let heads = if case % 2 == 0 {
            for i in 0..QSIZE {
                let d = random_desc(&mut rng, QSIZE);
                mq.desc_table().store(i, RawDescriptor::from(d)).unwrap();
            }
            let n = rng.random_range(1..=8usize);
            (0..n).map(|_| rng.random_range(0..QSIZE)).collect()
        } else {
            plausible_chains(&mem, &mq, &mut rng, QSIZE)
        };
        let chains = heads.len() as u16;
        for (i, head) in heads.iter().enumerate() {
            mem.write_obj(*head, mq.avail_addr().unchecked_add(4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(chains, mq.avail_addr().unchecked_add(2))
            .unwrap();

        let mut served = 0;
        while let Some(job) = bq.pop() {
            let len = worker::serve(&disk, &mem, &job.request);
            let status = match &job.request {
                Ok(req) => Some(req.status),
                Err(bad) => bad.status,
            };
            match (&job.request, status) {
                (Ok(_), _) => parsed += 1,
                (Err(_), Some(_)) => rejected += 1,
                (Err(_), None) => silent += 1,
            }
            match status {
                Some(addr) => {
                    let s: u8 = mem.read_obj(addr).unwrap();
                    ok += usize::from(s == 0);
                    assert!(s <= 2, "case {case}: status {s}");
                    assert!(len >= 1, "case {case}: status written, len {len}");
                }
                None => assert_eq!(len, 0, "case {case}"),
            }
            if let Ok(req) = &job.request {
                let room = match &req.kind {
                    request::RequestKind::Read { data, .. }
                    | request::RequestKind::GetId { data } => request::total_len(data),
                    _ => 0,
                };
                assert!(
                    u64::from(len) <= room + 1,
                    "case {case}: len {len} > {room}+1"
                );
            }
            bq.add_used(job.head, len);
            served += 1;
        }
        assert_eq!(served, chains, "case {case}: chains left in the ring");
        assert_eq!(
            used_idx(&mem, &mq),
            chains,
            "case {case}: used ring stalled"
        );
    }
    assert!(
        parsed > 2000 && ok > 1000 && rejected > 1000 && silent > 1000,
        "parsed {parsed}, ok {ok}, rejected {rejected}, silent {silent}"
    );
    // The image is still a sane file of the same size.
    let mut f = img.reopen().unwrap();
    f.flush().unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
}

/// A descriptor with every field random, biased towards the buffer area
/// and towards lengths the parser cares about.
fn random_desc(rng: &mut StdRng, qsize: u16) -> SplitDescriptor {
    let addr = match rng.random_range(0..6) {
        0..=2 => BUF_BASE + rng.random_range(0..8u64) * 0x1000,
        // Not into the rings below BUF_BASE: the test reads them back.
        3 => rng.random_range(BUF_BASE..MEM_SIZE),
        4 => MEM_SIZE - rng.random_range(0..64u64),
        _ => rng.random(),
    };
    let len = match rng.random_range(0..6) {
        0 => 16,
        1 => 1,
        2 => 512 * rng.random_range(0..9u32),
        3 => rng.random_range(0..0x2000),
        4 => 0,
        _ => rng.random(),
    };
    let mut flags = 0u16;
    if rng.random_bool(0.6) {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    if rng.random_bool(0.5) {
        flags |= WRITE;
    }
    if rng.random_bool(0.05) {
        flags |= VRING_DESC_F_INDIRECT as u16;
    }
    let next = if rng.random_bool(0.9) {
        rng.random_range(0..qsize)
    } else {
        rng.random()
    };
    SplitDescriptor::new(addr, len, flags, next)
}

/// Fills the table with well-formed requests of random types, sectors and
/// sizes, half of them then damaged in one random field. Returns the heads.
fn plausible_chains(
    mem: &GuestMemory,
    mq: &MockSplitQueue<GuestMemory>,
    rng: &mut StdRng,
    qsize: u16,
) -> Vec<u16> {
    let kinds = [0u32, 1, 4, 8, 11, 13, 2];
    let mut heads = Vec::new();
    let mut i = 0u16;
    while i + 4 <= qsize {
        let slot = BUF_BASE + rng.random_range(0..8u64) * 0x1000;
        let kind = kinds[rng.random_range(0..kinds.len())];
        let sector = if rng.random_bool(0.9) {
            rng.random_range(0..2048)
        } else {
            rng.random_range(2040..2100)
        };
        write_header(mem, slot, kind, sector);
        let mut chain = vec![SplitDescriptor::new(slot, 16, 0, 0)];
        let data_flags = if kind == 0 || kind == 8 { WRITE } else { 0 };
        for _ in 0..rng.random_range(0..=2) {
            let addr = BUF_BASE + 0x8000 + rng.random_range(0..0x70u64) * 0x1000;
            let len = if kind == 11 || kind == 13 {
                let n = rng.random_range(1..4u32);
                for r in 0..u64::from(n) {
                    let mut raw = [0u8; 16];
                    raw[..8].copy_from_slice(&rng.random_range(0..2060u64).to_le_bytes());
                    raw[8..12].copy_from_slice(&rng.random_range(0..16u32).to_le_bytes());
                    raw[12..].copy_from_slice(&rng.random_range(0..2u32).to_le_bytes());
                    mem.write_slice(&raw, GuestAddress(addr + 16 * r)).unwrap();
                }
                16 * n
            } else {
                512 * rng.random_range(1..9u32)
            };
            chain.push(SplitDescriptor::new(addr, len, data_flags, 0));
        }
        chain.push(SplitDescriptor::new(slot + 0x800, 1, WRITE, 0));
        if rng.random_bool(0.5) {
            let victim = rng.random_range(0..chain.len());
            let noise = random_desc(rng, qsize);
            let d = &mut chain[victim];
            match rng.random_range(0..4) {
                0 => d.set_addr(noise.addr().0),
                1 => d.set_len(noise.len()),
                2 => d.set_flags(noise.flags()),
                _ => d.set_next(noise.next()),
            }
        }
        let len = chain.len() as u16;
        for (j, d) in chain.iter().enumerate() {
            let mut d = *d;
            let j = j as u16;
            if j + 1 < len && d.next() == 0 {
                d.set_flags(d.flags() | VRING_DESC_F_NEXT as u16);
                d.set_next(i + j + 1);
            }
            mq.desc_table()
                .store(i + j, RawDescriptor::from(d))
                .unwrap();
        }
        heads.push(i);
        i += len;
    }
    heads
}
