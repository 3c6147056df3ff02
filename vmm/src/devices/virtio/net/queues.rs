//! The queue side of the device: popping chains, reading a TX frame out of
//! one and writing an RX frame into one. It knows nothing of the back end
//! or of how it is notified.
//!
//! Every descriptor is guest-controlled. A TX chain is read into a buffer
//! bounded by the largest frame, and only after its length was summed; an
//! RX chain is checked whole (device-writable, inside guest memory, large
//! enough) before a byte is written to it.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use super::backend::MAX_FRAME_LEN;
use super::filter::ETH_HEADER_LEN;
use crate::devices::virtio::{ActivatedQueue, GuestMemory, Interrupt};

/// `struct virtio_net_hdr_v1`: 12 bytes with VIRTIO_F_VERSION_1, with or
/// without VIRTIO_NET_F_MRG_RXBUF.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The longest TX chain read: a header and the largest frame.
pub const MAX_TX_CHAIN_LEN: usize = NET_HDR_LEN + MAX_FRAME_LEN;

pub const NUM_QUEUES: usize = 2;

/// A chain of a queue, borrowing guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// A driver error in the ring itself: only a reset recovers from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("avail index is more than a queue ahead of the device")]
    AvailTooFar,
    #[error("head {head} is outside the queue of {size}")]
    HeadOutside { head: u16, size: u16 },
}

/// Why a TX chain carries no frame to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    #[error("{0} bytes do not hold a header and an ethernet header")]
    TooShort(usize),
    #[error("chain is longer than a header and a {MAX_FRAME_LEN}-byte frame")]
    TooLong,
    #[error("device-writable descriptor in a tx chain")]
    Writable,
    #[error("descriptor outside guest memory")]
    Unreadable,
}

/// Why an RX chain did not take a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxRefusal {
    /// A well-formed chain too small for this frame: another frame may fit.
    #[error("buffer of {capacity} bytes is too small for {needed}")]
    TooSmall { capacity: usize, needed: usize },
    /// A chain that can never take a frame.
    #[error("device-readable descriptor in an rx chain")]
    Readable,
    #[error("descriptor outside guest memory")]
    OutsideMemory,
}

/// What the driver handed over at activation.
#[derive(Debug)]
pub struct NetQueues {
    pub mem: GuestMemory,
    pub interrupt: Interrupt,
    pub rx: ActivatedQueue,
    pub tx: ActivatedQueue,
}

impl NetQueues {
    /// Splits the queues the transport hands over, in rx, tx order.
    pub fn new(
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Self, Vec<ActivatedQueue>> {
        let [rx, tx]: [ActivatedQueue; NUM_QUEUES] = queues.try_into()?;
        Ok(NetQueues {
            mem,
            interrupt,
            rx,
            tx,
        })
    }

    /// Interrupts the driver if it wants to hear about used buffers.
    pub fn signal_used(&mut self) {
        let mut notify = false;
        for q in [&mut self.rx.queue, &mut self.tx.queue] {
            notify |= q.needs_notification(&self.mem).unwrap_or(true);
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::warn!("virtio-net: cannot signal the used queue: {e}");
            }
        }
    }

    /// Stops both queues until the device is reset and tells the driver.
    pub fn fail(&self, error: &RingError) {
        tracing::warn!("virtio-net: queues stopped until the device is reset: {error}");
        if let Err(e) = self.interrupt.signal_needs_reset() {
            tracing::warn!("virtio-net: cannot interrupt the driver: {e}");
        }
    }
}

/// The next available chain of `queue`, if any. An avail index too far
/// ahead or a head outside the queue is a driver error.
pub fn pop<'a>(queue: &mut Queue, mem: &'a GuestMemory) -> Result<Option<Chain<'a>>, RingError> {
    let size = queue.size();
    let chain = match queue.iter(mem) {
        Ok(mut available) => available.next(),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => return Err(RingError::AvailTooFar),
        Err(e) => {
            // Not ready, or the avail index unreadable: nothing to pop,
            // and the same again on the next kick.
            tracing::debug!("virtio-net: cannot read the avail ring: {e}");
            return Ok(None);
        }
    };
    match chain {
        Some(c) if c.head_index() >= size => Err(RingError::HeadOutside {
            head: c.head_index(),
            size,
        }),
        other => Ok(other),
    }
}

/// Reads a TX chain (header and frame, however cut into descriptors) into
/// `buf`, which ends up holding the header followed by the frame. Nothing
/// is read from a chain longer than [`MAX_TX_CHAIN_LEN`].
pub fn read_tx(mem: &GuestMemory, chain: Chain<'_>, buf: &mut Vec<u8>) -> Result<(), TxDrop> {
    buf.clear();
    let mut descs = chain.clone();
    // Length and flags first: a chain too long is refused before any copy.
    let mut total = 0usize;
    for d in descs.by_ref() {
        if d.is_write_only() {
            return Err(TxDrop::Writable);
        }
        total = total.saturating_add(d.len() as usize);
        if total > MAX_TX_CHAIN_LEN {
            return Err(TxDrop::TooLong);
        }
    }
    if total < NET_HDR_LEN + ETH_HEADER_LEN {
        return Err(TxDrop::TooShort(total));
    }
    // The driver may rewrite the descriptors meanwhile: every length is
    // bounded again as it is copied.
    for d in chain {
        let start = buf.len();
        let end = start.saturating_add(d.len() as usize);
        if d.is_write_only() {
            return Err(TxDrop::Writable);
        }
        if end > MAX_TX_CHAIN_LEN {
            return Err(TxDrop::TooLong);
        }
        buf.resize(end, 0);
        mem.read_slice(&mut buf[start..end], d.addr())
            .map_err(|_| TxDrop::Unreadable)?;
    }
    if buf.len() < NET_HDR_LEN + ETH_HEADER_LEN {
        return Err(TxDrop::TooShort(buf.len()));
    }
    Ok(())
}

/// Writes a zeroed header (`num_buffers` = 1) and `frame` into an RX chain.
/// Returns the bytes written, for the used ring. The chain is checked
/// whole first: when it is refused, nothing was written.
pub fn write_rx(mem: &GuestMemory, chain: Chain<'_>, frame: &[u8]) -> Result<u32, RxRefusal> {
    let needed = NET_HDR_LEN + frame.len();
    let mut capacity = 0usize;
    for d in chain.clone() {
        if !d.is_write_only() {
            return Err(RxRefusal::Readable);
        }
        if d.len() == 0 {
            continue;
        }
        let usable = (d.len() as usize).min(needed - capacity);
        if !mem.check_range(d.addr(), usable) {
            return Err(RxRefusal::OutsideMemory);
        }
        capacity += usable;
        if capacity == needed {
            break;
        }
    }
    if capacity < needed {
        return Err(RxRefusal::TooSmall { capacity, needed });
    }
    let mut header = [0u8; NET_HDR_LEN];
    header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
    let mut parts = [&header[..], frame];
    let mut written = 0usize;
    for d in chain {
        let mut offset = 0usize;
        while offset < d.len() as usize {
            let Some(part) = parts.iter_mut().find(|p| !p.is_empty()) else {
                break;
            };
            let n = (d.len() as usize - offset).min(part.len());
            // Checked above; only a driver rewriting the chain meanwhile
            // gets here with a bad address.
            let at = d
                .addr()
                .checked_add(offset as u64)
                .ok_or(RxRefusal::OutsideMemory)?;
            mem.write_slice(&part[..n], at)
                .map_err(|_| RxRefusal::OutsideMemory)?;
            *part = &part[n..];
            offset += n;
            written += n;
        }
        if written == needed {
            break;
        }
    }
    if written < needed {
        return Err(RxRefusal::TooSmall {
            capacity: written,
            needed,
        });
    }
    Ok(needed as u32)
}
