//! virtio-blk requests, parsed from a guest descriptor chain.
//!
//! Pure: reads guest memory, touches no file. Every field of the chain is
//! guest-controlled, so nothing here trusts an address, a length, a flag or
//! the framing. Per virtio 1.x no framing is assumed: the request is the
//! device-readable byte stream (16-byte header, then data for the device)
//! followed by the device-writable byte stream (data for the driver, then
//! one status byte), however the driver cut them into descriptors.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes in a virtio-blk sector, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the request header: type (le32), reserved (le32), sector (le64).
pub const HEADER_LEN: u64 = 16;
/// Bytes of one discard / write-zeroes range: sector (le64), sectors (le32),
/// flags (le32).
pub const RANGE_LEN: u64 = 16;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most data segments one request may carry (the driver is told less, see
/// `SEG_MAX`; this only bounds what a misbehaving driver can make us do).
pub const MAX_SEGMENTS: usize = 1024;
/// Most ranges in one discard or write-zeroes request (advertised as
/// `max_discard_seg` and `max_write_zeroes_seg`).
pub const MAX_RANGES: u32 = 32;

/// A piece of guest memory that the parser has checked lies inside guest
/// memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// What the driver asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read from the disk into `data` (device-writable segments).
    Read {
        sector: u64,
        data: Vec<Segment>,
    },
    /// Write `data` (device-readable segments) to the disk.
    Write {
        sector: u64,
        data: Vec<Segment>,
    },
    Flush,
    /// Write the disk's id into `data`.
    GetId {
        data: Vec<Segment>,
    },
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
    /// A request type this device does not implement.
    Unsupported(u32),
}

/// A well-formed request and where its status byte goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub status: GuestAddress,
}

/// Why a descriptor chain is not a valid request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain is empty")]
    EmptyChain,
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("last descriptor has no device-writable status byte")]
    NoStatus,
    #[error("request header has {len} readable bytes, needs 16")]
    ShortHeader { len: u64 },
    #[error("cannot read request header")]
    HeaderUnreadable,
    #[error("request type {kind} carries {len} device-readable data bytes")]
    UnexpectedReadable { kind: u32, len: u64 },
    #[error("request type {kind} carries {len} device-writable data bytes")]
    UnexpectedWritable { kind: u32, len: u64 },
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength { len: u64 },
    #[error("sector {sector} with {len} bytes overflows")]
    SectorOverflow { sector: u64, len: u64 },
    #[error("{count} data segments exceed the limit of {MAX_SEGMENTS}")]
    TooManySegments { count: usize },
    #[error("range payload of {len} bytes is not 1 to {MAX_RANGES} ranges of 16 bytes")]
    BadRanges { len: u64 },
}

/// A chain that is not a valid request, with the status byte to report
/// that on, when the chain has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub error: ParseError,
    pub status: Option<GuestAddress>,
}

/// Parses one descriptor chain into a request.
///
/// On error, `Malformed::status` is the chain's status byte when the last
/// descriptor is device-writable, non-empty and inside guest memory; the
/// caller writes IOERR there, or returns the chain with length 0 when there
/// is none.
pub fn parse<M>(mut chain: DescriptorChain<M>) -> Result<Request, Malformed>
where
    M: Deref,
    M::Target: GuestMemoryBackend,
{
    // The iterator itself bounds the chain (queue or indirect table size,
    // 4 GiB in all) and ends it at the first out-of-table index.
    let descs: Vec<_> = chain.by_ref().collect();
    let mem = chain.memory();

    let status = descs.last().and_then(|d| {
        let addr = d.addr().0.checked_add(u64::from(d.len()).checked_sub(1)?)?;
        (d.is_write_only() && mem.check_range(GuestAddress(addr), 1)).then_some(GuestAddress(addr))
    });
    let fail = |error| Malformed { error, status };

    if descs.is_empty() {
        return Err(fail(ParseError::EmptyChain));
    }
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in &descs {
        if d.len() == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(fail(ParseError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            }));
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err(fail(ParseError::ReadableAfterWritable));
        } else {
            readable.push(seg);
        }
    }
    let Some(status_addr) = status else {
        return Err(fail(ParseError::NoStatus));
    };
    // The status byte is the last writable byte; what precedes it is data.
    let data_in = split_at(&writable, total_len(&writable) - 1).0;

    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN {
        return Err(fail(ParseError::ShortHeader { len: readable_len }));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_bytes(mem, &readable, &mut header).map_err(|()| fail(ParseError::HeaderUnreadable))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let data_out = split_at(&readable, HEADER_LEN).1;

    let in_len = total_len(&data_in);
    let out_len = total_len(&data_out);
    let no_readable = |len| match len {
        0 => Ok(()),
        len => Err(fail(ParseError::UnexpectedReadable { kind, len })),
    };
    let no_writable = |len| match len {
        0 => Ok(()),
        len => Err(fail(ParseError::UnexpectedWritable { kind, len })),
    };
    let kind = match kind {
        VIRTIO_BLK_T_IN => {
            no_readable(out_len)?;
            check_data(sector, &data_in, in_len).map_err(fail)?;
            RequestKind::Read {
                sector,
                data: data_in,
            }
        }
        VIRTIO_BLK_T_OUT => {
            no_writable(in_len)?;
            check_data(sector, &data_out, out_len).map_err(fail)?;
            RequestKind::Write {
                sector,
                data: data_out,
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            no_readable(out_len)?;
            no_writable(in_len)?;
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            no_readable(out_len)?;
            check_segment_count(&data_in).map_err(fail)?;
            RequestKind::GetId { data: data_in }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            no_writable(in_len)?;
            let ranges = read_ranges(mem, &data_out, out_len).map_err(fail)?;
            if kind == VIRTIO_BLK_T_DISCARD {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            }
        }
        other => RequestKind::Unsupported(other),
    };
    Ok(Request {
        kind,
        status: status_addr,
    })
}

/// Sum of the segment lengths (cannot overflow: at most 65535 u32s).
pub fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits a segment list at byte `at` (clamped to its length).
fn split_at(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = at;
    for seg in segs {
        let len = u64::from(seg.len);
        if left >= len {
            head.push(*seg);
            left -= len;
        } else if left == 0 {
            tail.push(*seg);
        } else {
            // left < len <= u32::MAX, and the segment is inside guest memory,
            // so neither the cast nor the addition can overflow.
            head.push(Segment {
                addr: seg.addr,
                len: left as u32,
            });
            tail.push(Segment {
                addr: GuestAddress(seg.addr.0 + left),
                len: seg.len - left as u32,
            });
            left = 0;
        }
    }
    (head, tail)
}

/// Fills `buf` from the start of `segs`.
fn read_bytes<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), ()> {
    let mut done = 0;
    for seg in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(seg.len as usize);
        mem.read_slice(&mut buf[done..done + n], seg.addr)
            .map_err(|_| ())?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Every request's data obeys [`MAX_SEGMENTS`], whatever its type.
fn check_segment_count(data: &[Segment]) -> Result<(), ParseError> {
    if data.len() > MAX_SEGMENTS {
        return Err(ParseError::TooManySegments { count: data.len() });
    }
    Ok(())
}

fn check_data(sector: u64, data: &[Segment], len: u64) -> Result<(), ParseError> {
    check_segment_count(data)?;
    if len % SECTOR_SIZE != 0 {
        return Err(ParseError::UnalignedLength { len });
    }
    sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len))
        .map(|_| ())
        .ok_or(ParseError::SectorOverflow { sector, len })
}

fn read_ranges<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    data: &[Segment],
    len: u64,
) -> Result<Vec<SectorRange>, ParseError> {
    check_segment_count(data)?;
    let count = len / RANGE_LEN;
    if len % RANGE_LEN != 0 || count == 0 || count > u64::from(MAX_RANGES) {
        return Err(ParseError::BadRanges { len });
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut rest = data.to_vec();
    for _ in 0..count {
        let mut raw = [0u8; RANGE_LEN as usize];
        read_bytes(mem, &rest, &mut raw).map_err(|()| ParseError::BadRanges { len })?;
        rest = split_at(&rest, RANGE_LEN).1;
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[0..8]);
        ranges.push(SectorRange {
            sector: u64::from_le_bytes(sector),
            num_sectors: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
        });
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_SCSI_CMD;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::devices::virtio::blk::tests::{
        desc, test_mem, write_header, BUF_BASE, MEM_SIZE, WRITE,
    };
    use crate::devices::virtio::GuestMemory;

    const H: u64 = BUF_BASE;
    const DATA: u64 = BUF_BASE + 0x1000;
    const ST: u64 = BUF_BASE + 0x100;

    fn parse_descs(mem: &GuestMemory, descs: &[RawDescriptor]) -> Result<Request, Malformed> {
        let mq = MockSplitQueue::new(mem, 16);
        parse(mq.build_desc_chain(descs).unwrap())
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn err(r: Result<Request, Malformed>) -> Malformed {
        r.expect_err("chain should be malformed")
    }

    #[test]
    fn read_with_several_segments() {
        let mem = test_mem();
        write_header(&mem, H, VIRTIO_BLK_T_IN, 42);
        let req = parse_descs(
            &mem,
            &[
                desc(H, 16, 0),
                desc(DATA, 512, WRITE),
                desc(DATA + 0x1000, 1024, WRITE),
                desc(ST, 1, WRITE),
            ],
        )
        .unwrap();
        assert_eq!(req.status, GuestAddress(ST));
        assert_eq!(
            req.kind,
            RequestKind::Read {
                sector: 42,
                data: vec![seg(DATA, 512), seg(DATA + 0x1000, 1024)],
            }
        );
    }

    #[test]
    fn any_layout_header_with_data_and_data_with_status() {
        let mem = test_mem();
        // A write whose header and data share one descriptor.
        write_header(&mem, H, VIRTIO_BLK_T_OUT, 7);
        let req = parse_descs(&mem, &[desc(H, 16 + 1024, 0), desc(ST, 1, WRITE)]).unwrap();
        assert_eq!(
            req.kind,
            RequestKind::Write {
                sector: 7,
                data: vec![seg(H + 16, 1024)],
            }
        );
        // A read whose data and status share one descriptor, header split
        // in two.
        write_header(&mem, H, VIRTIO_BLK_T_IN, 9);
        let req = parse_descs(
            &mem,
            &[desc(H, 10, 0), desc(H + 10, 6, 0), desc(DATA, 513, WRITE)],
        )
        .unwrap();
        assert_eq!(req.status, GuestAddress(DATA + 512));
        assert_eq!(
            req.kind,
            RequestKind::Read {
                sector: 9,
                data: vec![seg(DATA, 512)],
            }
        );
    }

    #[test]
    fn flush_get_id_unsupported() {
        let mem = test_mem();
        write_header(&mem, H, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse_descs(&mem, &[desc(H, 16, 0), desc(ST, 1, WRITE)]).unwrap();
        assert_eq!(req.kind, RequestKind::Flush);

        write_header(&mem, H, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse_descs(
            &mem,
            &[desc(H, 16, 0), desc(DATA, 20, WRITE), desc(ST, 1, WRITE)],
        )
        .unwrap();
        assert_eq!(
            req.kind,
            RequestKind::GetId {
                data: vec![seg(DATA, 20)]
            }
        );

        write_header(&mem, H, VIRTIO_BLK_T_SCSI_CMD, 0);
        let req = parse_descs(&mem, &[desc(H, 16, 0), desc(ST, 1, WRITE)]).unwrap();
        assert_eq!(req.kind, RequestKind::Unsupported(VIRTIO_BLK_T_SCSI_CMD));
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let mem = test_mem();
        write_header(&mem, H, VIRTIO_BLK_T_DISCARD, 0);
        let mut raw = Vec::new();
        for (sector, n, flags) in [(8u64, 16u32, 0u32), (1000, 8, 1)] {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
        let chain = [desc(H, 16, 0), desc(DATA, 32, 0), desc(ST, 1, WRITE)];
        let ranges = vec![
            SectorRange {
                sector: 8,
                num_sectors: 16,
                flags: 0,
            },
            SectorRange {
                sector: 1000,
                num_sectors: 8,
                flags: 1,
            },
        ];
        let req = parse_descs(&mem, &chain).unwrap();
        assert_eq!(req.kind, RequestKind::Discard(ranges.clone()));
        write_header(&mem, H, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let req = parse_descs(&mem, &chain).unwrap();
        assert_eq!(req.kind, RequestKind::WriteZeroes(ranges));

        for len in [0, 17, 16 * (MAX_RANGES + 1)] {
            let e = err(parse_descs(
                &mem,
                &[desc(H, 16, 0), desc(DATA, len, 0), desc(ST, 1, WRITE)],
            ));
            assert_eq!(e.error, ParseError::BadRanges { len: len.into() });
            assert_eq!(e.status, Some(GuestAddress(ST)));
        }
    }

    #[test]
    fn missing_or_unwritable_status_has_no_status() {
        let mem = test_mem();
        write_header(&mem, H, VIRTIO_BLK_T_FLUSH, 0);
        // Header only.
        let e = err(parse_descs(&mem, &[desc(H, 16, 0)]));
        assert_eq!((e.error, e.status), (ParseError::NoStatus, None));
        // Status descriptor not device-writable.
        let e = err(parse_descs(&mem, &[desc(H, 16, 0), desc(ST, 1, 0)]));
        assert_eq!(e.status, None);
        // Status descriptor of length 0.
        let e = err(parse_descs(&mem, &[desc(H, 16, 0), desc(ST, 0, WRITE)]));
        assert_eq!(e.status, None);
        // Status byte outside guest memory.
        let e = err(parse_descs(
            &mem,
            &[desc(H, 16, 0), desc(MEM_SIZE, 1, WRITE)],
        ));
        assert_eq!(e.status, None);
        // Status address that wraps.
        let e = err(parse_descs(
            &mem,
            &[desc(H, 16, 0), desc(u64::MAX, 2, WRITE)],
        ));
        assert_eq!(e.status, None);
    }

    #[test]
    fn malformed_chains_with_a_status_byte() {
        let mem = test_mem();
        let st = Some(GuestAddress(ST));
        let check = |descs: &[RawDescriptor], want: ParseError| {
            let e = err(parse_descs(&mem, descs));
            assert_eq!((e.error, e.status), (want, st));
        };

        write_header(&mem, H, VIRTIO_BLK_T_IN, 0);
        // Header in a device-writable descriptor.
        check(
            &[desc(H, 16, WRITE), desc(ST, 1, WRITE)],
            ParseError::ShortHeader { len: 0 },
        );
        // Header too short.
        check(
            &[desc(H, 8, 0), desc(ST, 1, WRITE)],
            ParseError::ShortHeader { len: 8 },
        );
        // A readable descriptor after a writable one.
        check(
            &[
                desc(H, 16, 0),
                desc(DATA, 512, WRITE),
                desc(DATA, 512, 0),
                desc(ST, 1, WRITE),
            ],
            ParseError::ReadableAfterWritable,
        );
        // Read with device-readable data.
        check(
            &[desc(H, 16, 0), desc(DATA, 512, 0), desc(ST, 1, WRITE)],
            ParseError::UnexpectedReadable { kind: 0, len: 512 },
        );
        // Data length not whole sectors.
        check(
            &[desc(H, 16, 0), desc(DATA, 100, WRITE), desc(ST, 1, WRITE)],
            ParseError::UnalignedLength { len: 100 },
        );
        // Data outside guest memory, and an address range that wraps.
        check(
            &[
                desc(H, 16, 0),
                desc(MEM_SIZE - 256, 512, WRITE),
                desc(ST, 1, WRITE),
            ],
            ParseError::OutsideMemory {
                addr: MEM_SIZE - 256,
                len: 512,
            },
        );
        check(
            &[
                desc(H, 16, 0),
                desc(u64::MAX - 255, 512, WRITE),
                desc(ST, 1, WRITE),
            ],
            ParseError::OutsideMemory {
                addr: u64::MAX - 255,
                len: 512,
            },
        );
        // Sector whose byte offset overflows.
        let sector = u64::MAX / 512;
        write_header(&mem, H, VIRTIO_BLK_T_IN, sector);
        check(
            &[desc(H, 16, 0), desc(DATA, 1024, WRITE), desc(ST, 1, WRITE)],
            ParseError::SectorOverflow { sector, len: 1024 },
        );

        write_header(&mem, H, VIRTIO_BLK_T_OUT, 0);
        // Write with device-writable data.
        check(
            &[desc(H, 16, 0), desc(DATA, 512, WRITE), desc(ST, 1, WRITE)],
            ParseError::UnexpectedWritable { kind: 1, len: 512 },
        );
        write_header(&mem, H, VIRTIO_BLK_T_FLUSH, 0);
        check(
            &[desc(H, 16, 0), desc(DATA, 512, 0), desc(ST, 1, WRITE)],
            ParseError::UnexpectedReadable { kind: 4, len: 512 },
        );
    }

    #[test]
    fn too_many_segments() {
        let mem = test_mem();
        write_header(&mem, H, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![desc(H, 16, 0)];
        descs.extend((0..MAX_SEGMENTS as u64 + 1).map(|i| desc(DATA + i * 512, 512, WRITE)));
        descs.push(desc(ST, 1, WRITE));
        let mq = MockSplitQueue::new(&mem, 2048);
        let e = err(parse(mq.build_desc_chain(&descs).unwrap()));
        assert_eq!(
            e.error,
            ParseError::TooManySegments {
                count: MAX_SEGMENTS + 1
            }
        );
    }

    /// GET_ID, discard and write-zeroes data obey the segment limit of
    /// reads and writes.
    #[test]
    fn get_id_and_ranges_with_too_many_segments_are_refused() {
        let mem = test_mem();
        let too_many = MAX_SEGMENTS as u64 + 1;
        let mq = MockSplitQueue::new(&mem, 2048);
        let parse_with = |kind: u32, flags: u16, seg_len: u32| {
            write_header(&mem, H, kind, 0);
            let mut descs = vec![desc(H, 16, 0)];
            descs.extend((0..too_many).map(|i| desc(DATA + i * 16, seg_len, flags)));
            descs.push(desc(ST, 1, WRITE));
            err(parse(mq.build_desc_chain(&descs).unwrap()))
        };
        let want = ParseError::TooManySegments {
            count: MAX_SEGMENTS + 1,
        };
        // One byte each: 1025 bytes hold the whole id many times over.
        let e = parse_with(VIRTIO_BLK_T_GET_ID, WRITE, 1);
        assert_eq!((e.error, e.status), (want.clone(), Some(GuestAddress(ST))));
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(parse_with(kind, 0, 16).error, want);
        }
    }

    #[test]
    fn split_at_cuts_inside_and_between_segments() {
        let segs = [seg(0x1000, 10), seg(0x2000, 6)];
        assert_eq!(
            split_at(&segs, 4),
            (vec![seg(0x1000, 4)], vec![seg(0x1004, 6), seg(0x2000, 6)])
        );
        assert_eq!(
            split_at(&segs, 10),
            (vec![seg(0x1000, 10)], vec![seg(0x2000, 6)])
        );
        assert_eq!(split_at(&segs, 0), (vec![], segs.to_vec()));
        assert_eq!(split_at(&segs, 99), (segs.to_vec(), vec![]));
    }
}
