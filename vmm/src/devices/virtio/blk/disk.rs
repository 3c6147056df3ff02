//! The disk back end: a raw, usually sparse, image file served with
//! positional vectored I/O straight between the file and guest memory.
//!
//! Knows requests, not queues: `execute` turns one parsed request into a
//! status byte and the number of bytes written for the driver.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::request::{RequestKind, SectorRange, Segment, ID_LEN, SECTOR_SIZE};
use super::Error;
use crate::devices::virtio::GuestMemory;

/// Most iovecs one preadv/pwritev accepts (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// The result of one request, as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Bytes written into the request's device-writable data (not counting
    /// the status byte).
    pub written: u32,
}

impl Outcome {
    fn ok(written: u32) -> Self {
        Outcome {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }

    fn failed(status: u32) -> Self {
        Outcome {
            status: status as u8,
            written: 0,
        }
    }
}

/// Why a request failed; only its status reaches the guest.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("bytes {offset}+{len} beyond the disk's {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("range flags {flags:#x} not supported")]
    Flags { flags: u32 },
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("disk i/o failed")]
    Io(#[source] io::Error),
}

impl Failure {
    fn status(&self) -> u32 {
        match self {
            Failure::Flags { .. } | Failure::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// An open disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    /// Usable bytes: the file size rounded down to whole sectors.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
}

impl DiskFile {
    /// Opens a raw image (a regular file or a block device) and takes an
    /// advisory lock on it, shared when read-only, exclusive otherwise, so
    /// that two monitors never write one disk.
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<DiskFile, Error> {
        let id_bytes = id.as_bytes();
        if id_bytes.len() > ID_LEN {
            return Err(Error::IdTooLong { id: id.to_owned() });
        }
        let mut padded = [0u8; ID_LEN];
        padded[..id_bytes.len()].copy_from_slice(id_bytes);

        let open_err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let kind = file.metadata().map_err(open_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(Error::NotADisk {
                path: path.to_owned(),
            });
        }
        let op = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::InUse {
                    path: path.to_owned(),
                }
            } else {
                open_err(err)
            });
        }
        // Seeking to the end sizes block devices as well as files.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(DiskFile {
            file,
            path: path.to_owned(),
            capacity: size - size % SECTOR_SIZE,
            read_only,
            id: padded,
        })
    }

    /// Size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves one request. Guest memory in `kind` was range-checked by the
    /// parser; it is checked again here, since the memory could differ.
    pub fn execute(&self, mem: &GuestMemory, kind: &RequestKind) -> Outcome {
        match self.try_execute(mem, kind) {
            Ok(written) => Outcome::ok(written),
            Err(failure) => {
                match &failure {
                    Failure::Io(e) => {
                        tracing::warn!(disk = %self.path.display(), error = %e, "{failure}")
                    }
                    _ => tracing::debug!(disk = %self.path.display(), "{failure}"),
                }
                Outcome::failed(failure.status())
            }
        }
    }

    fn try_execute(&self, mem: &GuestMemory, kind: &RequestKind) -> Result<u32, Failure> {
        match kind {
            RequestKind::Read { sector, data } => {
                let (offset, len) = self.byte_range(*sector, total(data))?;
                self.transfer(mem, data, offset, false)
                    .map_err(Failure::Io)?;
                // The parser bounds a chain to 4 GiB, so the length fits.
                Ok(u32::try_from(len).unwrap_or(u32::MAX))
            }
            RequestKind::Write { sector, data } => {
                self.writable()?;
                let (offset, _) = self.byte_range(*sector, total(data))?;
                self.transfer(mem, data, offset, true)
                    .map_err(Failure::Io)?;
                Ok(0)
            }
            RequestKind::Flush => {
                self.file.sync_data().map_err(Failure::Io)?;
                Ok(0)
            }
            RequestKind::GetId { data } => self.write_id(mem, data),
            RequestKind::Discard(ranges) => {
                self.writable()?;
                self.zero_ranges(ranges, true)?;
                Ok(0)
            }
            RequestKind::WriteZeroes(ranges) => {
                self.writable()?;
                self.zero_ranges(ranges, false)?;
                Ok(0)
            }
            RequestKind::Unsupported(kind) => Err(Failure::Unsupported(*kind)),
        }
    }

    fn writable(&self) -> Result<(), Failure> {
        if self.read_only {
            Err(Failure::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The byte range of `len` bytes at `sector`, if it lies on the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Result<(u64, u64), Failure> {
        let offset = sector.saturating_mul(SECTOR_SIZE);
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => Ok((offset, len)),
            _ => Err(Failure::OutOfRange {
                offset,
                len,
                capacity: self.capacity,
            }),
        }
    }

    /// Moves the bytes of `data` between guest memory and the file at
    /// `offset`: into the file when `to_disk`, out of it otherwise.
    fn transfer(
        &self,
        mem: &GuestMemory,
        data: &[Segment],
        mut offset: u64,
        to_disk: bool,
    ) -> io::Result<()> {
        let mut iovs = Vec::with_capacity(data.len());
        for seg in data {
            // A segment can straddle two adjacent memory regions.
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                iovs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        let mut start = 0;
        while start < iovs.len() {
            let batch = &iovs[start..iovs.len().min(start + IOV_MAX)];
            let pos = offset as libc::off_t;
            // SAFETY: every iovec points into a guest memory mapping owned by
            // `mem`, which is borrowed for this whole call, and lies inside it
            // (get_slices checked the range). The kernel accesses these bytes
            // as raw memory; no Rust reference to them exists. The count is at
            // most IOV_MAX.
            let ret = unsafe {
                if to_disk {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as i32,
                        pos,
                    )
                } else {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as i32,
                        pos,
                    )
                }
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ret == 0 {
                // The file shrank under us (capacity was fixed at open).
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut done = ret as usize;
            offset += done as u64;
            while done > 0 {
                let iov = &mut iovs[start];
                if done >= iov.iov_len {
                    done -= iov.iov_len;
                    start += 1;
                } else {
                    // SAFETY: done < iov_len, so the pointer stays inside the
                    // same guest memory slice.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
                    iov.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }

    fn write_id(&self, mem: &GuestMemory, data: &[Segment]) -> Result<u32, Failure> {
        let mut done = 0;
        for seg in data {
            if done == ID_LEN {
                break;
            }
            let n = (ID_LEN - done).min(seg.len as usize);
            mem.write_slice(&self.id[done..done + n], seg.addr)
                .map_err(|e| Failure::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            done += n;
        }
        Ok(done as u32)
    }

    /// Discard (a hint: a file system that cannot punch holes ignores it)
    /// or write zeroes (always reads back zeros afterwards). Every range is
    /// checked before any is applied.
    fn zero_ranges(&self, ranges: &[SectorRange], discard: bool) -> Result<(), Failure> {
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        let mut spans = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.flags & !allowed != 0 {
                return Err(Failure::Flags { flags: r.flags });
            }
            let (offset, len) =
                self.byte_range(r.sector, u64::from(r.num_sectors) * SECTOR_SIZE)?;
            spans.push((
                offset,
                len,
                r.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            ));
        }
        for (offset, len, unmap) in spans {
            if len == 0 {
                continue;
            }
            let mode = if discard || unmap {
                libc::FALLOC_FL_PUNCH_HOLE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
            match self.fallocate(mode | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                Ok(()) => {}
                Err(e) if unsupported(&e) && discard => {}
                Err(e) if unsupported(&e) => self.write_zeroes(offset, len).map_err(Failure::Io)?,
                Err(e) => return Err(Failure::Io(e)),
            }
        }
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a file descriptor we own; no memory is
        // involved. offset + len <= capacity <= i64::MAX (a file size).
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zeroes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn total(data: &[Segment]) -> u64 {
    super::request::total_len(data)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_SCSI_CMD;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::blk::tests::{image, test_mem, BUF_BASE, MEM_SIZE};

    const OK: Outcome = Outcome {
        status: VIRTIO_BLK_S_OK as u8,
        written: 0,
    };
    const IOERR: Outcome = Outcome {
        status: VIRTIO_BLK_S_IOERR as u8,
        written: 0,
    };
    const UNSUPP: Outcome = Outcome {
        status: VIRTIO_BLK_S_UNSUPP as u8,
        written: 0,
    };

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn read(sector: u64, data: Vec<Segment>) -> RequestKind {
        RequestKind::Read { sector, data }
    }

    fn write(sector: u64, data: Vec<Segment>) -> RequestKind {
        RequestKind::Write { sector, data }
    }

    fn range(sector: u64, num_sectors: u32, flags: u32) -> SectorRange {
        SectorRange {
            sector,
            num_sectors,
            flags,
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn guest_bytes(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn write_read_round_trip_at_offsets() {
        let mem = test_mem();
        let img = image(1 << 20);
        let disk = DiskFile::open(img.path(), false, "d").unwrap();
        assert_eq!(disk.capacity_sectors(), 2048);

        for (sector, len) in [(0u64, 512usize), (1, 4096), (777, 65536), (2047, 512)] {
            let data = pattern(len, sector as u8);
            mem.write_slice(&data, GuestAddress(BUF_BASE)).unwrap();
            let out = disk.execute(&mem, &write(sector, vec![seg(BUF_BASE, len as u32)]));
            assert_eq!(out, OK, "write at {sector}");

            let back = BUF_BASE + 0x8_0000;
            let out = disk.execute(&mem, &read(sector, vec![seg(back, len as u32)]));
            assert_eq!(
                out,
                Outcome {
                    status: 0,
                    written: len as u32
                }
            );
            assert_eq!(guest_bytes(&mem, back, len), data, "read at {sector}");

            let mut file = vec![0u8; len];
            img.as_file()
                .read_exact_at(&mut file, sector * 512)
                .unwrap();
            assert_eq!(file, data, "file at {sector}");
        }
    }

    #[test]
    fn scattered_segments_across_memory_regions() {
        let mem = test_mem();
        let img = image(1 << 20);
        let disk = DiskFile::open(img.path(), false, "d").unwrap();
        let data = pattern(3 * 4096, 9);
        // Three segments: one straddling the boundary between the regions.
        let segs = vec![
            seg(BUF_BASE + 0x4000, 4096),
            seg(MEM_SIZE / 2 - 1000, 4096),
            seg(BUF_BASE, 4096),
        ];
        let mut at = 0;
        for s in &segs {
            mem.write_slice(&data[at..at + s.len as usize], s.addr)
                .unwrap();
            at += s.len as usize;
        }
        assert_eq!(disk.execute(&mem, &write(64, segs)), OK);
        let mut file = vec![0u8; data.len()];
        img.as_file().read_exact_at(&mut file, 64 * 512).unwrap();
        assert_eq!(file, data);

        // Many small segments, more than one preadv batch.
        let segs: Vec<_> = (0..1500u64)
            .map(|i| seg(BUF_BASE + 0x2_0000 + i * 600, 8))
            .collect();
        let out = disk.execute(&mem, &read(64, segs));
        assert_eq!(out.status, 0);
        assert_eq!(out.written, 12000);
        assert_eq!(guest_bytes(&mem, BUF_BASE + 0x2_0000 + 600, 8), data[8..16]);
        assert_eq!(
            guest_bytes(&mem, BUF_BASE + 0x2_0000 + 1499 * 600, 8),
            data[1499 * 8..1500 * 8]
        );
    }

    #[test]
    fn out_of_range_is_an_io_error() {
        let mem = test_mem();
        let img = image(1 << 20);
        let disk = DiskFile::open(img.path(), false, "d").unwrap();
        let buf = vec![seg(BUF_BASE, 1024)];
        assert_eq!(
            disk.execute(&mem, &read(2048, vec![seg(BUF_BASE, 512)])),
            IOERR
        );
        assert_eq!(disk.execute(&mem, &read(2047, buf.clone())), IOERR);
        assert_eq!(disk.execute(&mem, &write(2047, buf.clone())), IOERR);
        assert_eq!(disk.execute(&mem, &read(u64::MAX, buf.clone())), IOERR);
        assert_eq!(
            disk.execute(&mem, &RequestKind::Discard(vec![range(2040, 16, 0)])),
            IOERR
        );
        assert_eq!(
            disk.execute(
                &mem,
                &RequestKind::WriteZeroes(vec![range(u64::MAX, u32::MAX, 0)])
            ),
            IOERR
        );
        // Nothing was written past the end.
        assert_eq!(img.as_file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn size_rounds_down_to_whole_sectors() {
        let img = image(5000);
        let disk = DiskFile::open(img.path(), false, "d").unwrap();
        assert_eq!(disk.capacity_sectors(), 9);
        let mem = test_mem();
        assert_eq!(
            disk.execute(&mem, &read(9, vec![seg(BUF_BASE, 512)])),
            IOERR
        );
        assert_eq!(
            disk.execute(&mem, &read(8, vec![seg(BUF_BASE, 512)]))
                .status,
            0
        );
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let mem = test_mem();
        let img = image(1 << 20);
        let disk = DiskFile::open(img.path(), false, "vol-42").unwrap();
        assert_eq!(disk.execute(&mem, &RequestKind::Flush), OK);

        mem.write_slice(&[0xff; 32], GuestAddress(BUF_BASE))
            .unwrap();
        let out = disk.execute(
            &mem,
            &RequestKind::GetId {
                data: vec![seg(BUF_BASE, 32)],
            },
        );
        assert_eq!(out.written, 20);
        let id = guest_bytes(&mem, BUF_BASE, 32);
        assert_eq!(&id[..6], b"vol-42");
        assert_eq!(id[6..20], [0; 14]);
        assert_eq!(id[20..], [0xff; 12], "wrote past the 20 id bytes");

        // A short buffer gets what fits, over two segments.
        let out = disk.execute(
            &mem,
            &RequestKind::GetId {
                data: vec![seg(BUF_BASE + 0x100, 2), seg(BUF_BASE + 0x200, 3)],
            },
        );
        assert_eq!(out.written, 5);
        assert_eq!(guest_bytes(&mem, BUF_BASE + 0x100, 2), b"vo");
        assert_eq!(guest_bytes(&mem, BUF_BASE + 0x200, 3), b"l-4");

        assert_eq!(
            disk.execute(&mem, &RequestKind::Unsupported(VIRTIO_BLK_T_SCSI_CMD)),
            UNSUPP
        );
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mem = test_mem();
        let img = image(1 << 20);
        img.as_file().write_all_at(&[7u8; 512], 0).unwrap();
        let disk = DiskFile::open(img.path(), true, "ro").unwrap();
        assert!(disk.read_only());
        mem.write_slice(&[1u8; 512], GuestAddress(BUF_BASE))
            .unwrap();
        assert_eq!(
            disk.execute(&mem, &write(0, vec![seg(BUF_BASE, 512)])),
            IOERR
        );
        assert_eq!(
            disk.execute(&mem, &RequestKind::Discard(vec![range(0, 1, 0)])),
            IOERR
        );
        assert_eq!(
            disk.execute(&mem, &RequestKind::WriteZeroes(vec![range(0, 1, 0)])),
            IOERR
        );
        assert_eq!(disk.execute(&mem, &RequestKind::Flush), OK);
        let out = disk.execute(&mem, &read(0, vec![seg(BUF_BASE, 512)]));
        assert_eq!(out.status, 0);
        assert_eq!(guest_bytes(&mem, BUF_BASE, 512), [7u8; 512]);
        let mut file = [0u8; 512];
        img.as_file().read_exact_at(&mut file, 0).unwrap();
        assert_eq!(file, [7u8; 512]);
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zeros() {
        let mem = test_mem();
        let img = image(4 << 20);
        let disk = DiskFile::open(img.path(), false, "d").unwrap();
        let ones = vec![0x5au8; 1 << 20];
        img.as_file().write_all_at(&ones, 0).unwrap();
        img.as_file().sync_all().unwrap();
        let blocks_before = img.as_file().metadata().unwrap().blocks();

        // Discard 256 KiB at 64 KiB, write zeroes (allocated and unmapped)
        // over two other ranges.
        let discard = RequestKind::Discard(vec![range(128, 512, 0)]);
        assert_eq!(disk.execute(&mem, &discard), OK);
        let zeroes = RequestKind::WriteZeroes(vec![
            range(1024, 8, 0),
            range(1100, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        ]);
        assert_eq!(disk.execute(&mem, &zeroes), OK);

        let mut file = vec![0u8; 1 << 20];
        img.as_file().read_exact_at(&mut file, 0).unwrap();
        let zero = |from: usize, len: usize| file[from..from + len].iter().all(|&b| b == 0);
        assert!(zero(128 * 512, 512 * 512));
        assert!(zero(1024 * 512, 8 * 512));
        assert!(zero(1100 * 512, 3 * 512));
        assert!(file[..128 * 512].iter().all(|&b| b == 0x5a));
        assert!(file[640 * 512..1024 * 512].iter().all(|&b| b == 0x5a));
        assert!(file[1103 * 512..].iter().all(|&b| b == 0x5a));
        // The guest sees the zeros too, and the file kept its size.
        let out = disk.execute(&mem, &read(128, vec![seg(BUF_BASE, 4096)]));
        assert_eq!(out.status, 0);
        assert_eq!(guest_bytes(&mem, BUF_BASE, 4096), vec![0u8; 4096]);
        assert_eq!(img.as_file().metadata().unwrap().len(), 4 << 20);
        // Where the file system punches holes, the discard freed blocks.
        let blocks_after = img.as_file().metadata().unwrap().blocks();
        assert!(
            blocks_after <= blocks_before,
            "{blocks_after} > {blocks_before}"
        );

        // Flags: discard takes none, write zeroes only UNMAP.
        assert_eq!(
            disk.execute(&mem, &RequestKind::Discard(vec![range(0, 1, 1)])),
            UNSUPP
        );
        assert_eq!(
            disk.execute(&mem, &RequestKind::WriteZeroes(vec![range(0, 1, 2)])),
            UNSUPP
        );
        // A rejected range leaves the others of its request untouched.
        let mixed = RequestKind::WriteZeroes(vec![range(0, 1, 0), range(8192, 1, 0)]);
        assert_eq!(disk.execute(&mem, &mixed), IOERR);
        let mut first = [0u8; 512];
        img.as_file().read_exact_at(&mut first, 0).unwrap();
        assert_eq!(first, [0x5a; 512]);
    }

    #[test]
    fn write_zeroes_fallback_writes_zeros() {
        let img = image(1 << 20);
        let disk = DiskFile::open(img.path(), false, "d").unwrap();
        img.as_file().write_all_at(&[1u8; 8192], 0).unwrap();
        disk.write_zeroes(512, 4096).unwrap();
        let mut file = vec![0u8; 8192];
        img.as_file().read_exact_at(&mut file, 0).unwrap();
        assert_eq!(file[..512], [1u8; 512]);
        assert!(file[512..4608].iter().all(|&b| b == 0));
        assert_eq!(file[4608..], [1u8; 3584]);
    }
}
