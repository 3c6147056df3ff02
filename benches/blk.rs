//! Host-side virtio-blk throughput, no guest.
//!
//! A fake driver puts 1 MiB requests on a real split virtqueue in plain
//! guest memory, each as Linux sends them with indirect descriptors: a
//! header, 256 scattered 4 KiB pages, a status byte. The device pops and
//! parses them, serves them against a sparse image on tmpfs (`/dev/shm`,
//! else the temp dir) and completes them into the used ring.
//!
//! Each round submits 32 requests (32 MiB, distinct buffers and disk areas):
//! - `inline`: popped, parsed, served and completed on the bench thread, no
//!   thread hop: the device's own cost.
//! - `worker`: the event loop's dispatch on the bench thread, the I/O on the
//!   device's worker thread, the driver sleeping on the interrupt: the path
//!   a guest uses.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smol_vmm::devices::virtio::blk::disk::DiskFile;
use smol_vmm::devices::virtio::blk::worker::{self, BlockQueue, IoWorker};
use smol_vmm::devices::virtio::{GuestMemory, Interrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_SIZE: u16 = 256;
const DEPTH: u16 = 32;
const REQUEST: u64 = 1 << 20;
const PAGE: u64 = 4096;
const PAGES: u64 = REQUEST / PAGE;

// Guest memory layout.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADERS: u64 = 0x1_0000; // 0x100 per request: header, status at +0x80
const INDIRECT: u64 = 0x2_0000; // 0x2000 per request
const DATA: u64 = 0x10_0000; // 1 MiB per request
const MEM_SIZE: u64 = DATA + DEPTH as u64 * REQUEST;
const DISK_SIZE: u64 = 2 * DEPTH as u64 * REQUEST;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn put_desc(mem: &GuestMemory, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// The driver side: `DEPTH` requests of one type laid out once, resubmitted
/// each round by bumping the avail index.
struct Driver {
    mem: GuestMemory,
    avail_idx: u16,
}

impl Driver {
    fn new(kind: u32) -> Driver {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let data_flags = if kind == T_IN { F_WRITE } else { 0 };
        for r in 0..u64::from(DEPTH) {
            let header = HEADERS + r * 0x100;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            // Every other MiB of the disk: requests never overlap.
            h[8..16].copy_from_slice(&(2 * r * REQUEST / 512).to_le_bytes());
            mem.write_slice(&h, GuestAddress(header)).unwrap();

            let table = INDIRECT + r * 0x2000;
            put_desc(&mem, table, header, 16, F_NEXT, 1);
            for p in 0..PAGES {
                // Pages of a request in reverse order: scattered, as a
                // guest's page cache hands them out.
                let page = DATA + r * REQUEST + (PAGES - 1 - p) * PAGE;
                let i = p as u16 + 1;
                put_desc(
                    &mem,
                    table + u64::from(i) * 16,
                    page,
                    PAGE as u32,
                    data_flags | F_NEXT,
                    i + 1,
                );
            }
            let last = PAGES as u16 + 1;
            put_desc(
                &mem,
                table + u64::from(last) * 16,
                header + 0x80,
                1,
                F_WRITE,
                0,
            );
            put_desc(
                &mem,
                DESC_TABLE + r * 16,
                table,
                u32::from(last + 1) * 16,
                F_INDIRECT,
                0,
            );
        }
        Driver { mem, avail_idx: 0 }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Makes requests `0..n` available again.
    fn submit(&mut self, n: u16) {
        for r in 0..n {
            let slot = u64::from(self.avail_idx.wrapping_add(r) % QUEUE_SIZE);
            self.mem
                .write_obj(r, GuestAddress(AVAIL_RING + 4 + 2 * slot))
                .unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(n);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// Sleeps on the interrupt, as a guest would, until all are used.
    fn wait_used(&self, irq: &EventFd) {
        while self.used_idx() != self.avail_idx {
            irq.read().expect("device stalled");
        }
    }

    fn check_status(&self, n: u16) {
        for r in 0..u64::from(n) {
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(HEADERS + r * 0x100 + 0x80))
                .unwrap();
            assert_eq!(status, 0, "request {r} failed");
        }
    }
}

fn image_dir() -> std::path::PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

fn interrupt() -> Interrupt {
    Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())
}

fn bench_blk(c: &mut Criterion) {
    let img = tempfile::NamedTempFile::new_in(image_dir()).unwrap();
    img.as_file().set_len(DISK_SIZE).unwrap();
    let disk = Arc::new(DiskFile::open(img.path(), false, "bench").unwrap());

    // Fill the image once so that reads come from real pages, not holes.
    {
        let mut driver = Driver::new(T_OUT);
        let bq = BlockQueue::new(driver.queue(), driver.mem.clone(), interrupt());
        driver.submit(DEPTH);
        while let Some(job) = bq.pop() {
            worker::complete(&disk, &bq, job);
        }
        driver.check_status(DEPTH);
    }

    let mut group = c.benchmark_group("blk");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));

    for (name, kind) in [("read", T_IN), ("write", T_OUT)] {
        let mut driver = Driver::new(kind);
        let bq = BlockQueue::new(driver.queue(), driver.mem.clone(), interrupt());
        group.throughput(Throughput::Bytes(REQUEST * u64::from(DEPTH)));
        group.bench_function(BenchmarkId::new("inline_32x1MiB", name), |b| {
            b.iter(|| {
                driver.submit(DEPTH);
                while let Some(job) = bq.pop() {
                    worker::complete(&disk, &bq, black_box(job));
                }
            })
        });
        driver.check_status(DEPTH);

        let mut driver = Driver::new(kind);
        // A blocking irqfd that the driver sleeps on.
        let irq = EventFd::new(0).unwrap();
        let line = Interrupt::new(irq.try_clone().unwrap());
        let bq = Arc::new(BlockQueue::new(driver.queue(), driver.mem.clone(), line));
        let io = IoWorker::spawn(disk.clone(), bq.clone()).unwrap();
        group.bench_function(BenchmarkId::new("worker_32x1MiB", name), |b| {
            b.iter(|| {
                driver.submit(DEPTH);
                worker::dispatch(&bq, |job| io.submit(job));
                driver.wait_used(&irq);
            })
        });
        driver.check_status(DEPTH);
    }
    group.finish();
}

criterion_group!(benches, bench_blk);
criterion_main!(benches);
