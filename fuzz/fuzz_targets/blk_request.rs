//! virtio-blk: arbitrary descriptor tables, avail rings and request headers
//! in guest memory, served by the device's queue (`BlockQueue`: pop, parse,
//! its record of the chains in flight), its dispatch and its disk back end,
//! inline or on the I/O worker thread. Malformed chains and a queue stopped
//! until the device is reset are expected; a panic is a bug, and so is the
//! device taking more chains than the driver made available, more than a
//! queue's worth in one dispatch, or holding more than a queue's worth.
//!
//! Input (little endian): a config byte, then actions, each an opcode byte
//! (modulo 9) and its fields.
//! - config: bit 0 serve on the I/O worker, bit 1 EVENT_IDX, bit 2
//!   read-only disk, bits 3-5 log2 of the queue size (1 to 128), bit 6 ring
//!   addresses from the input (desc u16, avail u16, used u16) and the
//!   device's first used index (u16: a used ring over the avail ring then
//!   plays a driver that posts as fast as the device returns).
//! - 0 descriptor: index u8, flags u8 (bits 0-2 NEXT, WRITE, INDIRECT; bit
//!   3 a u64 address, bit 4 a u32 length), address u16|u64, length
//!   u16|u32, next u8.
//! - 1 make a head available: head u8.  2 set the avail index: u16.
//! - 3 bytes into memory: address u16, count u8, bytes.
//! - 4 request header: address u16, type u8 (0-5: in, out, flush, get id,
//!   discard, write zeroes; 6: a u32 follows; 7: unknown; bit 7: a u64
//!   sector follows, else a u16), sector.
//! - 5 discard range: address u16, sector u16, sectors u16, flags u8.
//! - 6 dispatch (the event loop's kick).  7 complete: count u8, then one
//!   index byte per job (inline), or wait for the worker.  8 device reset.
//!
//! Guest memory is 64 KiB in two regions (buffers can straddle them); the
//! rings sit at 0 unless the input places them; the disk is 64 KiB.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use smol_fuzz::{scratch_file, Input};
use smol_vmm::devices::virtio::blk::disk::DiskFile;
use smol_vmm::devices::virtio::blk::request::{total_len, RequestKind};
use smol_vmm::devices::virtio::blk::worker::{self, BlockQueue, IoWorker, Job};
use smol_vmm::devices::virtio::{GuestMemory, Interrupt};
use smol_vmm::fuzzing::DriverQueue;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const REGION: usize = 32 << 10;
const DISK_BYTES: u64 = 64 << 10;

/// One image for every input, emptied before each (what earlier inputs
/// wrote must not steer this one).
fn image() -> &'static Mutex<tempfile::NamedTempFile> {
    static IMAGE: OnceLock<Mutex<tempfile::NamedTempFile>> = OnceLock::new();
    IMAGE.get_or_init(|| Mutex::new(scratch_file()))
}

fuzz_target!(|data: &[u8]| run(data));

struct Device {
    queue: Arc<BlockQueue>,
    worker: Option<IoWorker>,
    /// Popped (inline) and not completed yet.
    backlog: Vec<Job>,
}

impl Device {
    fn new(
        state: QueueState,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        disk: &Arc<DiskFile>,
        threaded: bool,
    ) -> Device {
        let queue = Queue::try_from(state).expect("a queue that was valid");
        let queue = Arc::new(BlockQueue::new(queue, mem.clone(), interrupt.clone()));
        let worker =
            threaded.then(|| IoWorker::spawn(disk.clone(), queue.clone()).expect("i/o thread"));
        Device {
            queue,
            worker,
            backlog: Vec::new(),
        }
    }
}

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cfg = input.u8();
    let threaded = cfg & 1 != 0;
    let event_idx = cfg & 2 != 0;
    let read_only = cfg & 4 != 0;
    let size = 1u16 << ((cfg >> 3) & 7);

    let image = image().lock().unwrap_or_else(|e| e.into_inner());
    image.as_file().set_len(0).expect("truncate the image");
    image.as_file().set_len(DISK_BYTES).expect("size the image");
    let disk = Arc::new(DiskFile::open(image.path(), read_only, "fuzz").expect("open the image"));

    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(REGION as u64), REGION),
    ])
    .expect("guest memory");
    let (mut driver, mut activated) = DriverQueue::new(&mem, 0, size);
    let q = &mut activated.queue;
    if cfg & 0x40 != 0 {
        // As the transport sets them: a misaligned address is ignored.
        q.set_desc_table_address(Some(u32::from(input.u16())), Some(0));
        q.set_avail_ring_address(Some(u32::from(input.u16())), Some(0));
        q.set_used_ring_address(Some(u32::from(input.u16())), Some(0));
        q.set_next_used(input.u16());
        driver.desc = q.desc_table();
        driver.avail = q.avail_ring();
        driver.used = q.used_ring();
    }
    q.set_event_idx(event_idx);
    // What the transport checks before it activates the device.
    if !q.is_valid(&mem) {
        return;
    }
    let initial = q.state();
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let mut dev = Device::new(initial, &mem, &interrupt, &disk, threaded);

    // Chains the driver made available (the sum of the avail index's moves
    // the device could see) and chains the device took.
    let avail_idx = |mem: &GuestMemory| -> u16 {
        mem.read_obj(GuestAddress(initial.avail_ring + 2))
            .expect("the avail ring is in memory")
    };
    let mut seen = initial.next_avail;
    let mut made: u64 = 0;
    let mut popped: u64 = 0;

    while !input.is_empty() {
        match input.u8() % 9 {
            0 => {
                let idx = u16::from(input.u8()) % size;
                let flags = input.u8();
                let addr = if flags & 0x08 != 0 {
                    input.u64()
                } else {
                    u64::from(input.u16())
                };
                let len = if flags & 0x10 != 0 {
                    input.u32()
                } else {
                    u32::from(input.u16())
                };
                let next = u16::from(input.u8());
                let at = driver.desc + 16 * u64::from(idx);
                let mut raw = [0u8; 16];
                raw[0..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&u16::from(flags & 7).to_le_bytes());
                raw[14..16].copy_from_slice(&next.to_le_bytes());
                let _ = mem.write_slice(&raw, GuestAddress(at));
            }
            1 => {
                let head = u16::from(input.u8());
                driver.publish(&mem, head);
            }
            2 => {
                driver.avail_idx = input.u16();
                let _ = mem.write_obj(driver.avail_idx, GuestAddress(driver.avail + 2));
            }
            3 => {
                let addr = u64::from(input.u16());
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                let _ = mem.write_slice(bytes, GuestAddress(addr));
            }
            4 => {
                let addr = u64::from(input.u16());
                let k = input.u8();
                let kind = match k & 7 {
                    0 => VIRTIO_BLK_T_IN,
                    1 => VIRTIO_BLK_T_OUT,
                    2 => VIRTIO_BLK_T_FLUSH,
                    3 => VIRTIO_BLK_T_GET_ID,
                    4 => VIRTIO_BLK_T_DISCARD,
                    5 => VIRTIO_BLK_T_WRITE_ZEROES,
                    6 => input.u32(),
                    _ => VIRTIO_BLK_T_SCSI_CMD,
                };
                let sector = if k & 0x80 != 0 {
                    input.u64()
                } else {
                    u64::from(input.u16())
                };
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&kind.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                let _ = mem.write_slice(&h, GuestAddress(addr));
            }
            5 => {
                let addr = u64::from(input.u16());
                let mut r = [0u8; 16];
                r[0..8].copy_from_slice(&u64::from(input.u16()).to_le_bytes());
                r[8..12].copy_from_slice(&u32::from(input.u16()).to_le_bytes());
                r[12..16].copy_from_slice(&u32::from(input.u8()).to_le_bytes());
                let _ = mem.write_slice(&r, GuestAddress(addr));
            }
            6 => {
                if dev.worker.is_none() {
                    // Nothing writes guest memory while a dispatch pops, so
                    // the index now is what it can see.
                    let idx = avail_idx(&mem);
                    made += u64::from(idx.wrapping_sub(seen));
                    seen = idx;
                }
                popped += dispatch(&mut dev);
                if dev.worker.is_none() {
                    assert!(
                        popped <= made,
                        "the device took {popped} chains, {made} were made available"
                    );
                }
            }
            7 => complete(&mut dev, &disk, &mem, &mut input),
            _ => {
                // The driver's reset: the worker finishes what it serves and
                // drops the rest, the queue starts over from its registers.
                drop(dev);
                interrupt.reset();
                dev = Device::new(initial, &mem, &interrupt, &disk, threaded);
                seen = initial.next_avail;
            }
        }
    }
    // The driver waits for what it posted.
    for _ in 0..4 {
        dispatch(&mut dev);
        match &dev.worker {
            Some(w) => w.drain(),
            None => {
                while let Some(job) = dev.backlog.pop() {
                    serve_inline(&dev.queue, &disk, &mem, job);
                }
            }
        }
    }
}

/// The event loop's part: pops what is available, at most a queue's worth.
fn dispatch(dev: &mut Device) -> u64 {
    let size = dev.queue.size();
    let Device {
        queue,
        worker,
        backlog,
    } = dev;
    let done = worker::dispatch(queue, |job| match worker {
        Some(w) => w.submit(job),
        None => backlog.push(job),
    });
    assert!(
        done.jobs <= size,
        "one dispatch took {} chains from a queue of {size}",
        done.jobs
    );
    assert!(
        backlog.len() <= size,
        "{} chains held for a queue of {size}",
        backlog.len()
    );
    done.jobs as u64
}

fn complete(dev: &mut Device, disk: &DiskFile, mem: &GuestMemory, input: &mut Input) {
    if let Some(w) = &dev.worker {
        w.drain();
        return;
    }
    let n = input.u8();
    for _ in 0..n {
        if dev.backlog.is_empty() {
            break;
        }
        let i = usize::from(input.u8()) % dev.backlog.len();
        let job = dev.backlog.swap_remove(i);
        serve_inline(&dev.queue, disk, mem, job);
    }
    dev.queue.notify_driver();
}

/// Serves a job as the worker does, checking what it reports.
fn serve_inline(queue: &BlockQueue, disk: &DiskFile, mem: &GuestMemory, job: Job) {
    let len = worker::serve(disk, mem, &job.request);
    let status = match &job.request {
        Ok(req) => Some(req.status),
        Err(bad) => bad.status,
    };
    match status {
        Some(addr) => {
            assert!(len >= 1, "a status was written, used length {len}");
            let s: u8 = mem.read_obj(addr).expect("the status byte is in memory");
            assert!(s <= 2, "status {s}");
        }
        None => assert_eq!(len, 0, "no status byte, used length {len}"),
    }
    if let Ok(req) = &job.request {
        let room = match &req.kind {
            RequestKind::Read { data, .. } | RequestKind::GetId { data } => total_len(data),
            _ => 0,
        };
        assert!(
            u64::from(len) <= room + 1,
            "used length {len} for {room} bytes of room"
        );
    }
    queue.add_used(job.head, len);
}
