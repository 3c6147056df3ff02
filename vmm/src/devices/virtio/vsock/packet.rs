//! virtio-vsock packet fields (virtio 1.2, section 5.10.6) as plain values.
//!
//! virtio-vsock's `VsockPacket` parses descriptor chains; this file names the
//! constants and copies a header out of (or into) a packet so the muxer works
//! on plain values and never holds a borrow of guest memory longer than needed.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// The host's context id, as the guest addresses it.
pub const HOST_CID: u64 = 2;

/// The only socket type we support (no VIRTIO_VSOCK_F_SEQPACKET).
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flags: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Largest payload we accept in one TX packet and the largest RX data buffer
/// we accept from the driver (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// A packet header as plain values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Copies the header of a parsed packet.
    pub fn of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
        Header {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Writes this header into an RX packet's header buffer.
    pub fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) {
        let mut raw = [0u8; PKT_HEADER_SIZE];
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.type_.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        // The header slice of a parsed packet is exactly PKT_HEADER_SIZE
        // bytes, so this write cannot fail; a failure would only lose a packet.
        if let Err(e) = pkt.set_header_from_raw(&raw) {
            tracing::debug!("vsock: cannot write rx header: {e}");
        }
    }
}

/// A short name for an op, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        OP_REQUEST => "request",
        OP_RESPONSE => "response",
        OP_RST => "rst",
        OP_SHUTDOWN => "shutdown",
        OP_RW => "rw",
        OP_CREDIT_UPDATE => "credit_update",
        OP_CREDIT_REQUEST => "credit_request",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_a_packet() {
        let mut hdr_raw = [0u8; PKT_HEADER_SIZE];
        let mut data_raw = [0u8; 8];
        // SAFETY: both buffers outlive the packet, which is dropped at the end
        // of this test, and nothing else accesses them meanwhile.
        let mut pkt = unsafe { VsockPacket::new(&mut hdr_raw, Some(&mut data_raw)).unwrap() };
        let h = Header {
            src_cid: HOST_CID,
            dst_cid: 3,
            src_port: 1 << 30,
            dst_port: 1024,
            len: 8,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 77,
        };
        h.write_to(&mut pkt);
        assert_eq!(Header::of(&pkt), h);
        assert_eq!(op_name(OP_CREDIT_REQUEST), "credit_request");
        assert_eq!(op_name(99), "unknown");
    }
}
