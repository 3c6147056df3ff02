//! The request queue and the I/O worker, unaware of how the queue is
//! notified.
//!
//! The event loop pops and parses chains ([`BlockQueue::pop`]) and hands
//! them to an [`IoWorker`] thread, which does the disk I/O, writes the
//! status, adds the chain to the used ring and interrupts the driver. So a
//! large request never stalls the event loop. Used-ring updates happen on
//! the worker only (or inline when the worker is gone), under the queue lock.
//!
//! The guest owns the rings and may rewrite them at any time, so the queue
//! keeps its own record of the heads it has popped and not yet returned. A
//! head made available again while still in flight, a head outside the
//! queue, or an avail index more than a queue ahead is a driver error: the
//! queue stops until the device is reset, and the driver is told with
//! DEVICE_NEEDS_RESET (virtio 1.2, 2.1) and a configuration-change
//! interrupt. The stop is the [`Interrupt`]'s needs-reset flag, which the
//! transport shows in the Status register, clears on reset and keeps in a
//! snapshot. That record is also what bounds the jobs waiting for the
//! worker to the queue size.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::disk::{DiskFile, Outcome};
use super::request::{self, Malformed, Request};
use crate::devices::virtio::{GuestMemory, Interrupt};

/// Completions between two interrupts while more requests are waiting.
const NOTIFY_BATCH: u32 = 32;

/// One popped chain: its head index and what it parsed to.
#[derive(Debug)]
pub struct Job {
    pub head: u16,
    pub request: Result<Request, Malformed>,
}

/// The virtqueue and the device's own record of it, under one lock.
#[derive(Debug)]
struct Ring {
    queue: Queue,
    /// `in_flight[head]`: the chain at `head` was popped and is not back in
    /// the used ring yet. One entry per descriptor of the queue.
    in_flight: Vec<bool>,
}

/// A driver error in the ring itself, which stops the queue.
#[derive(Debug, thiserror::Error)]
enum RingError {
    #[error("head {0} made available again while still in flight")]
    HeadInFlight(u16),
    #[error("head {head} is outside the queue of {size}")]
    HeadOutside { head: u16, size: usize },
    #[error("avail index is more than a queue ahead of the device")]
    AvailTooFar,
}

/// An activated request queue with the memory and interrupt it needs.
#[derive(Debug)]
pub struct BlockQueue {
    ring: Mutex<Ring>,
    mem: GuestMemory,
    interrupt: Interrupt,
}

impl BlockQueue {
    pub fn new(queue: Queue, mem: GuestMemory, interrupt: Interrupt) -> Self {
        let in_flight = vec![false; usize::from(queue.size())];
        BlockQueue {
            ring: Mutex::new(Ring { queue, in_flight }),
            mem,
            interrupt,
        }
    }

    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries in the queue as the driver set it up: the most chains that
    /// can be in flight at once.
    pub fn size(&self) -> usize {
        self.lock().in_flight.len()
    }

    /// Whether a driver error stopped the queue (virtio's
    /// DEVICE_NEEDS_RESET); only a device reset starts it again.
    pub fn needs_reset(&self) -> bool {
        self.interrupt.needs_reset()
    }

    /// Stops the queue until the device is reset and tells the driver.
    fn fail(&self, error: RingError) {
        // Once: a stopped queue pops no more.
        tracing::warn!("block queue stopped until the device is reset: {error}");
        if let Err(e) = self.interrupt.signal_needs_reset() {
            tracing::warn!(error = %e, "cannot interrupt the block driver");
        }
    }

    /// Pops and parses the next available chain, if any. Returns `None`
    /// when the ring is empty or stopped over a driver error.
    pub fn pop(&self) -> Option<Job> {
        // The lock covers only the ring access, not the parsing.
        let chain = {
            let mut ring = self.lock();
            // Under the lock: `fail` is only called under it, so no pop
            // starts on a ring another pop just stopped.
            if self.needs_reset() {
                return None;
            }
            let chain = match ring.queue.iter(&self.mem) {
                Ok(mut available) => available.next()?,
                Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                    self.fail(RingError::AvailTooFar);
                    return None;
                }
                Err(e) => {
                    // Not ready, or the avail index unreadable: nothing to
                    // pop, and the same again on the next kick.
                    tracing::debug!(error = %e, "cannot read the block avail ring");
                    return None;
                }
            };
            let head = chain.head_index();
            let size = ring.in_flight.len();
            match ring.in_flight.get_mut(usize::from(head)) {
                Some(busy) if !*busy => *busy = true,
                Some(_) => {
                    self.fail(RingError::HeadInFlight(head));
                    return None;
                }
                None => {
                    // It could never go back to the used ring either.
                    self.fail(RingError::HeadOutside { head, size });
                    return None;
                }
            }
            chain
        };
        let head = chain.head_index();
        Some(Job {
            head,
            request: request::parse(chain),
        })
    }

    /// Returns a chain to the driver with `len` bytes written.
    pub fn add_used(&self, head: u16, len: u32) {
        let mut ring = self.lock();
        // Done with it whether or not the used ring takes it: the driver
        // may post it again.
        if let Some(busy) = ring.in_flight.get_mut(usize::from(head)) {
            *busy = false;
        }
        if let Err(e) = ring.queue.add_used(&self.mem, head, len) {
            // `pop` only hands out heads inside the queue, so only a used
            // ring the guest moved out of memory gets here.
            tracing::debug!(head, error = %e, "cannot return a block request");
        }
    }

    /// The queue as the device sees it (indices included).
    pub fn state(&self) -> virtio_queue::QueueState {
        self.lock().queue.state()
    }

    /// Interrupts the driver if it wants to hear about used buffers.
    pub fn notify_driver(&self) {
        let needed = self
            .lock()
            .queue
            .needs_notification(&self.mem)
            .unwrap_or(true);
        if needed {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "cannot interrupt the block driver");
            }
        }
    }
}

/// Serves one job against the disk and writes its status byte. Returns the
/// used length: bytes written for the driver plus the status byte, or 0 when
/// the chain had no status byte to write.
pub fn serve(disk: &DiskFile, mem: &GuestMemory, request: &Result<Request, Malformed>) -> u32 {
    let (status_addr, outcome) = match request {
        Ok(req) => (Some(req.status), disk.execute(mem, &req.kind)),
        Err(bad) => {
            tracing::debug!(disk = %disk.path().display(), error = %bad.error, "malformed block request");
            (bad.status, FAILED)
        }
    };
    match status_addr {
        Some(addr) if mem.write_obj(outcome.status, addr).is_ok() => {
            outcome.written.saturating_add(1)
        }
        _ => 0,
    }
}

/// What a malformed chain reports.
const FAILED: Outcome = Outcome {
    status: VIRTIO_BLK_S_IOERR as u8,
    written: 0,
};

/// Serves one job and completes it into the used ring.
pub fn complete(disk: &DiskFile, queue: &BlockQueue, job: Job) {
    let len = serve(disk, queue.mem(), &job.request);
    queue.add_used(job.head, len);
}

/// What one [`dispatch`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatched {
    /// Chains popped and handed on.
    pub jobs: usize,
    /// The call stopped at its budget with chains maybe still available:
    /// the caller must come back for them, the driver already kicked.
    pub more: bool,
}

/// Pops available chains and hands each to `submit`, at most a queue's
/// worth per call: a driver that makes chains available as fast as they
/// complete would otherwise keep the caller (the VM's one event loop) here
/// for as long as it likes.
pub fn dispatch(queue: &BlockQueue, mut submit: impl FnMut(Job)) -> Dispatched {
    let budget = queue.size();
    let mut jobs = 0;
    while jobs < budget {
        let Some(job) = queue.pop() else {
            return Dispatched { jobs, more: false };
        };
        submit(job);
        jobs += 1;
    }
    Dispatched { jobs, more: true }
}

/// What the worker thread is sent, served in order.
#[derive(Debug)]
enum Work {
    Job(Job),
    /// Answered once every job sent before it is complete.
    Barrier(Sender<()>),
}

/// A thread that serves the jobs of one queue in order.
#[derive(Debug)]
pub struct IoWorker {
    jobs: Option<Sender<Work>>,
    /// Set when the worker is dropped: the thread finishes the job it is
    /// serving and skips the rest.
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    disk: Arc<DiskFile>,
    queue: Arc<BlockQueue>,
}

impl IoWorker {
    pub fn spawn(disk: Arc<DiskFile>, queue: Arc<BlockQueue>) -> io::Result<IoWorker> {
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let disk = disk.clone();
            let queue = queue.clone();
            let stopping = stopping.clone();
            crate::seccomp::spawn("smol-blk-io", crate::seccomp::Profile::BlockIo, move || {
                run(&disk, &queue, rx, &stopping)
            })?
        };
        Ok(IoWorker {
            jobs: Some(tx),
            stopping,
            thread: Some(thread),
            disk,
            queue,
        })
    }

    /// Queues a job for the worker thread. The channel needs no bound of
    /// its own: [`BlockQueue::pop`] never has more chains out than the queue
    /// has entries.
    pub fn submit(&self, job: Job) {
        let sent = match &self.jobs {
            Some(tx) => tx.send(Work::Job(job)),
            None => Err(mpsc::SendError(Work::Job(job))),
        };
        if let Err(mpsc::SendError(Work::Job(job))) = sent {
            // The worker died (a bug): keep the queue moving inline.
            tracing::error!("block i/o worker is gone, serving inline");
            complete(&self.disk, &self.queue, job);
            self.queue.notify_driver();
        }
    }
}

impl IoWorker {
    /// Returns once every job submitted so far is complete and in the used
    /// ring (for a snapshot: nothing may be in flight).
    pub fn drain(&self) {
        let (tx, rx) = mpsc::channel();
        if let Some(jobs) = &self.jobs {
            if jobs.send(Work::Barrier(tx)).is_ok() {
                // An error means the worker died: nothing is in flight then.
                let _ = rx.recv();
            }
        }
    }
}

impl Drop for IoWorker {
    /// Lets the worker finish the job it is serving, drops the others and
    /// joins the thread: no completion reaches guest memory after the device
    /// was reset, and a reset or VM stop waits for one request at most, not
    /// for whatever backlog the guest queued. The dropped chains need no
    /// answer: a reset forgets the queue.
    fn drop(&mut self) {
        // Relaxed: the flag guards no data, and the join below orders the
        // thread's last guest-memory writes before our return.
        self.stopping.store(true, Ordering::Relaxed);
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("block i/o worker panicked");
            }
        }
    }
}

fn run(disk: &DiskFile, queue: &BlockQueue, jobs: Receiver<Work>, stopping: &AtomicBool) {
    let mut unsignalled = 0;
    while let Ok(work) = jobs.recv() {
        let mut next = Some(work);
        while let Some(work) = next.take() {
            if stopping.load(Ordering::Relaxed) {
                // The rest of the backlog goes with the receiver.
                return;
            }
            match work {
                Work::Job(job) => {
                    complete(disk, queue, job);
                    unsignalled += 1;
                }
                Work::Barrier(done) => {
                    if unsignalled > 0 {
                        queue.notify_driver();
                        unsignalled = 0;
                    }
                    let _ = done.send(());
                }
            }
            next = jobs.try_recv().ok();
            if next.is_some() && unsignalled >= NOTIFY_BATCH {
                queue.notify_driver();
                unsignalled = 0;
            }
        }
        if unsignalled > 0 {
            queue.notify_driver();
            unsignalled = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::virtio::blk::tests::{
        add_chain, desc, image, status_at, test_mem, used_idx, wait_until, write_header, BUF_BASE,
        WRITE,
    };

    /// Dropping the worker (device reset, VM stop) with a backlog waits for
    /// the job being served, not for the backlog: the queued jobs are
    /// dropped unserved.
    #[test]
    fn dropping_the_worker_skips_the_backlog() {
        const QSIZE: u16 = 64;
        const CHAINS: u16 = QSIZE / 2;
        let mem = test_mem();
        let img = image(1 << 20);
        let disk = Arc::new(DiskFile::open(img.path(), false, "x").unwrap());
        let mq = MockSplitQueue::new(&mem, QSIZE);
        let queue = Arc::new(BlockQueue::new(
            mq.create_queue().unwrap(),
            mem.clone(),
            Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        ));
        let status = |chain: u16| BUF_BASE + 0x100 + u64::from(chain);
        write_header(&mem, BUF_BASE, VIRTIO_BLK_T_FLUSH, 0);
        for chain in 0..CHAINS {
            mem.write_obj(0xffu8, GuestAddress(status(chain))).unwrap();
            add_chain(
                &mq,
                2 * chain,
                &[desc(BUF_BASE, 16, 0), desc(status(chain), 1, WRITE)],
            );
        }
        let jobs: Vec<Job> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(jobs.len(), usize::from(CHAINS));

        let worker = IoWorker::spawn(disk, queue.clone()).unwrap();
        // Holding the ring parks the worker in its first job, right before
        // that job goes into the used ring; the rest wait in the channel.
        let ring = queue.lock();
        for job in jobs {
            worker.submit(job);
        }
        wait_until("the first job is served", || {
            status_at(&mem, status(0)) == VIRTIO_BLK_S_OK as u8
        });
        let stopping = worker.stopping.clone();
        let dropper = std::thread::spawn(move || drop(worker));
        wait_until("the drop has begun", || stopping.load(Ordering::Relaxed));
        drop(ring);
        dropper.join().unwrap();

        assert_eq!(
            used_idx(&mem, &mq),
            1,
            "only the job being served completes"
        );
        for chain in 1..CHAINS {
            assert_eq!(
                status_at(&mem, status(chain)),
                0xff,
                "chain {chain} was served"
            );
        }
    }
}
