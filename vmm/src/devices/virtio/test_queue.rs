//! The driver's side of a split virtqueue, for the device tests and the
//! fuzz targets: rings laid out in a test guest memory, chains added and
//! used entries taken back as a guest driver would.

use std::collections::HashMap;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivatedQueue, GuestMemory};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub struct DriverQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub avail_idx: u16,
    pub used_idx: u16,
    pub free: Vec<u16>,
    pub chains: HashMap<u16, Vec<u16>>,
    pub kick: EventFd,
}

impl DriverQueue {
    /// Lays the rings out from `base` (virtio-queue's MockSplitQueue puts
    /// the used ring inside the avail ring for queues over 64 entries).
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> (Self, ActivatedQueue) {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        let notify = EventFd::new(EFD_NONBLOCK).unwrap();
        let dq = DriverQueue {
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            used_idx: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            kick: notify.try_clone().unwrap(),
        };
        (dq, ActivatedQueue { queue, notify })
    }

    /// Writes raw descriptors (flags and next as given) and makes `head` available.
    pub fn add_raw(&mut self, mem: &GuestMemory, descs: &[(u16, u64, u32, u16, u16)], head: u16) {
        for &(idx, addr, len, flags, next) in descs {
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.publish(mem, head);
    }

    /// Makes `head` available in the next avail slot.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a well-formed chain of (addr, len, device-writable) buffers.
    pub fn add(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let idxs: Vec<u16> = bufs.iter().map(|_| self.free.pop().unwrap()).collect();
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == bufs.len();
                let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { idxs[i + 1] };
                (idxs[i], addr, len, flags, next)
            })
            .collect();
        self.add_raw(mem, &descs, idxs[0]);
        self.chains.insert(idxs[0], idxs.clone());
        idxs[0]
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Chains made available and not used yet.
    pub fn in_flight(&self) -> usize {
        self.chains.len()
    }

    /// Used entries since the last call, as (head, len); frees their descriptors.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_idx != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            let head = id as u16;
            if let Some(chain) = self.chains.remove(&head) {
                self.free.extend(chain);
            }
            out.push((head, len));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        out
    }
}
