//! The queue side of the device: moves packets between the virtqueues and
//! the muxer. It does not know how it is notified; the event-loop glue in
//! `mod.rs` calls it, and tests call it with plain guest memory.

use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;

use super::muxer::VsockMuxer;
use super::packet::MAX_PKT_DATA;
use crate::devices::virtio::{ActivatedQueue, GuestMemory, Interrupt};

pub const NUM_QUEUES: usize = 3;
/// `struct virtio_vsock_event { le32 id }` with id TRANSPORT_RESET.
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// What the driver handed over at activation.
#[derive(Debug)]
pub struct VsockQueues {
    pub mem: GuestMemory,
    pub interrupt: Interrupt,
    pub rx: ActivatedQueue,
    pub tx: ActivatedQueue,
    /// Transport events: the reset posted after a snapshot restore.
    pub event: ActivatedQueue,
}

impl VsockQueues {
    /// Splits the queues the transport hands over, in rx, tx, event order.
    pub fn new(
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Self, Vec<ActivatedQueue>> {
        let [rx, tx, event]: [ActivatedQueue; NUM_QUEUES] = queues.try_into()?;
        Ok(VsockQueues {
            mem,
            interrupt,
            rx,
            tx,
            event,
        })
    }

    /// Hands the packets on the TX queue to the muxer, at most a queue's
    /// worth per call. Malformed chains are returned to the driver unread.
    /// Returns whether the used ring changed.
    ///
    /// The budget is there because a driver can make chains available as
    /// fast as they are returned (the same head over and over): without it
    /// this loop, and with it the VM's one event loop, would never end.
    pub fn process_tx(&mut self, muxer: &mut VsockMuxer) -> bool {
        let mem = &self.mem;
        let queue = &mut self.tx.queue;
        let budget = queue.size();
        let mut served = 0;
        while served < budget {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                return served > 0;
            };
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => muxer.recv_from_guest(&pkt),
                Err(e) => tracing::debug!("vsock: dropping tx chain {head}: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::debug!("vsock: tx add_used: {e}");
            }
            served += 1;
        }
        // Chains may be left that the driver will not kick for again: kick
        // ourselves, so the event loop comes back here once it has served
        // the other queues and devices (at worst one empty pass).
        if let Err(e) = self.tx.notify.write(1) {
            tracing::warn!("vsock: cannot re-arm the tx queue: {e}");
        }
        true
    }

    /// Fills RX buffers while the muxer has packets for the guest, at most
    /// a queue's worth per call (for the reason `process_tx` has its
    /// budget: a chain that takes no packet goes back at once, and may be
    /// made available again as fast). Returns whether the used ring changed.
    pub fn process_rx(&mut self, muxer: &mut VsockMuxer) -> bool {
        let mem = &self.mem;
        let queue = &mut self.rx.queue;
        let budget = queue.size();
        let mut served = 0;
        let mut used = false;
        while muxer.has_pending_to_guest() {
            if served == budget {
                // Packets are still owed and chains may be left: kick
                // ourselves, as `process_tx` does.
                if let Err(e) = self.rx.notify.write(1) {
                    tracing::warn!("vsock: cannot re-arm the rx queue: {e}");
                }
                break;
            }
            served += 1;
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match muxer.fill_to_guest(&mut pkt) {
                    Some(len) => len,
                    None => {
                        // Nothing was ready after all: keep the buffer.
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    tracing::debug!("vsock: dropping rx chain {head}: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::debug!("vsock: rx add_used: {e}");
            }
            used = true;
        }
        used
    }

    /// Posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue: the
    /// driver then resets every connected socket (their host ends are gone
    /// after a restore), keeps its listeners and re-reads the guest CID.
    /// Returns false when the driver has no event buffer posted yet. The
    /// interrupt is marked, not raised (see `VirtioDevice::restored`).
    pub fn post_transport_reset(&mut self) -> bool {
        let mem = &self.mem;
        let queue = &mut self.event.queue;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let mut len = 0;
        for desc in chain {
            if desc.is_write_only() && desc.len() >= 4 {
                if mem
                    .write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, desc.addr())
                    .is_ok()
                {
                    len = 4;
                }
                break;
            }
        }
        if len == 0 {
            tracing::debug!("vsock: event buffer {head} cannot hold an event");
        }
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::debug!("vsock: event add_used: {e}");
        }
        self.interrupt.mark_used_queue();
        true
    }

    /// Raises the interrupt if the driver wants to hear about used buffers.
    pub fn signal_used(&mut self) {
        let mut notify = false;
        for q in [&mut self.rx.queue, &mut self.tx.queue] {
            notify |= q.needs_notification(&self.mem).unwrap_or(true);
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::warn!("vsock: cannot signal used queue: {e}");
            }
        }
    }
}
