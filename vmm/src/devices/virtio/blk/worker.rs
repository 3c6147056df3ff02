//! The request queue and the I/O worker, unaware of how the queue is
//! notified.
//!
//! The event loop pops and parses chains ([`BlockQueue::pop`]) and hands
//! them to an [`IoWorker`] thread, which does the disk I/O, writes the
//! status, adds the chain to the used ring and interrupts the driver. So a
//! large request never stalls the event loop. Used-ring updates happen on
//! the worker only (or inline when the worker is gone), under the queue lock.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::{Queue, QueueT};
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

/// An activated request queue with the memory and interrupt it needs.
#[derive(Debug)]
pub struct BlockQueue {
    queue: Mutex<Queue>,
    mem: GuestMemory,
    interrupt: Interrupt,
}

impl BlockQueue {
    pub fn new(queue: Queue, mem: GuestMemory, interrupt: Interrupt) -> Self {
        BlockQueue {
            queue: Mutex::new(queue),
            mem,
            interrupt,
        }
    }

    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pops and parses the next available chain, if any.
    pub fn pop(&self) -> Option<Job> {
        // The lock covers only the ring access, not the parsing.
        let chain = self.lock().pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        Some(Job {
            head,
            request: request::parse(chain),
        })
    }

    /// Returns a chain to the driver with `len` bytes written.
    pub fn add_used(&self, head: u16, len: u32) {
        if let Err(e) = self.lock().add_used(&self.mem, head, len) {
            // Only a guest that put a bad head index in the ring gets here.
            tracing::debug!(head, error = %e, "cannot return a block request");
        }
    }

    /// The queue as the device sees it (indices included).
    pub fn state(&self) -> virtio_queue::QueueState {
        self.lock().state()
    }

    /// Interrupts the driver if it wants to hear about used buffers.
    pub fn notify_driver(&self) {
        let needed = self.lock().needs_notification(&self.mem).unwrap_or(true);
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

/// Pops every available chain and hands it to `worker`. Returns how many.
pub fn dispatch(queue: &BlockQueue, worker: &IoWorker) -> usize {
    let mut count = 0;
    while let Some(job) = queue.pop() {
        worker.submit(job);
        count += 1;
    }
    count
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
    thread: Option<JoinHandle<()>>,
    disk: Arc<DiskFile>,
    queue: Arc<BlockQueue>,
}

impl IoWorker {
    pub fn spawn(disk: Arc<DiskFile>, queue: Arc<BlockQueue>) -> io::Result<IoWorker> {
        let (tx, rx) = mpsc::channel();
        let thread = {
            let disk = disk.clone();
            let queue = queue.clone();
            thread::Builder::new()
                .name("smol-blk-io".into())
                .spawn(move || run(&disk, &queue, rx))?
        };
        Ok(IoWorker {
            jobs: Some(tx),
            thread: Some(thread),
            disk,
            queue,
        })
    }

    /// Queues a job for the worker thread. The channel needs no bound: the
    /// queue size bounds the chains in flight.
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
    /// Lets the worker finish what it was given, then joins it, so no
    /// completion reaches guest memory after the device was reset.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("block i/o worker panicked");
            }
        }
    }
}

fn run(disk: &DiskFile, queue: &BlockQueue, jobs: Receiver<Work>) {
    let mut unsignalled = 0;
    while let Ok(work) = jobs.recv() {
        let mut next = Some(work);
        while let Some(work) = next.take() {
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
