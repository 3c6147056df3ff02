//! Guest memory to a sparse file: only the pages that are not zero are
//! written, at the offsets the memfd lays them out, so a restore maps the
//! file as it stands.
//!
//! What the guest sees is read through the mapping (it includes the
//! copy-on-write overlays of the kernel and initramfs, and after a restore
//! the pages the guest wrote). Which pages can hold data is found without
//! touching the rest, since reading a hole of a shared memfd would allocate
//! it: the backing file's data extents (SEEK_DATA/SEEK_HOLE), the overlay
//! ranges, and for a private mapping the pages /proc/self/pagemap reports
//! present or swapped.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;

const PAGE: u64 = 4096;
/// Bytes read from guest memory at a time.
const CHUNK_PAGES: usize = 256;
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// What [`write`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryWritten {
    /// Bytes of non-zero pages in the file.
    pub data_bytes: u64,
    /// Bytes of pages read and found to be zero.
    pub zero_bytes: u64,
}

/// Writes the guest memory of `ram` to a new sparse file at `path`. Every
/// vCPU must be parked and every device quiesced.
pub fn write(ram: &GuestRam, path: &Path) -> io::Result<MemoryWritten> {
    let out = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    out.set_len(ram.size())?;
    let overlays = ram.private_ranges();
    let mut written = MemoryWritten::default();
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE as usize];
    for region in ram.memory().iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let pages = (len / PAGE) as usize;
        let mut want = vec![false; pages];
        mark_data_extents(fo.file(), fo.start(), len, &mut want)?;
        for &(addr, olen) in &overlays {
            let lo = addr.max(start);
            let hi = (addr + olen).min(start + len);
            for p in (lo.saturating_sub(start) / PAGE)..(hi.saturating_sub(start) / PAGE) {
                want[p as usize] = true;
            }
        }
        if ram.is_private() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| io::Error::other(e.to_string()))?;
            mark_resident(host as u64, &mut want)?;
        }
        let mut page = 0usize;
        while page < pages {
            if !want[page] {
                page += 1;
                continue;
            }
            let run = want[page..]
                .iter()
                .take(CHUNK_PAGES)
                .take_while(|w| **w)
                .count();
            let bytes = run * PAGE as usize;
            let gpa = start + page as u64 * PAGE;
            ram.memory()
                .read_slice(&mut buf[..bytes], GuestAddress(gpa))
                .map_err(|e| io::Error::other(format!("reading guest memory at {gpa:#x}: {e}")))?;
            write_nonzero(
                &out,
                &buf[..bytes],
                fo.start() + page as u64 * PAGE,
                &mut written,
            )?;
            page += run;
        }
    }
    Ok(written)
}

/// Writes the non-zero pages of `data` to `out` at `offset` onwards,
/// coalescing neighbours into one write.
fn write_nonzero(
    out: &File,
    data: &[u8],
    offset: u64,
    written: &mut MemoryWritten,
) -> io::Result<()> {
    let page = PAGE as usize;
    let mut i = 0;
    while i < data.len() {
        if data[i..i + page].iter().all(|&b| b == 0) {
            written.zero_bytes += PAGE;
            i += page;
            continue;
        }
        let mut j = i + page;
        while j < data.len() && data[j..j + page].iter().any(|&b| b != 0) {
            j += page;
        }
        out.write_all_at(&data[i..j], offset + i as u64)?;
        written.data_bytes += (j - i) as u64;
        i = j;
    }
    Ok(())
}

/// Marks the pages of `file[offset..offset + len]` that lie in data
/// extents (everything else reads as zero).
fn mark_data_extents(file: &File, offset: u64, len: u64, want: &mut [bool]) -> io::Result<()> {
    for (data, hole) in crate::sparse::data_extents(file, offset, offset + len)? {
        let first = (data - offset) / PAGE;
        let last = (hole - offset).div_ceil(PAGE);
        for p in first..last {
            want[p as usize] = true;
        }
    }
    Ok(())
}

/// Marks the pages of the mapping at `host` that this process has present
/// or swapped out (the pages a private mapping may hold apart from its file).
fn mark_resident(host: u64, want: &mut [bool]) -> io::Result<()> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; 8 * 4096];
    let mut done = 0usize;
    while done < want.len() {
        let n = (want.len() - done).min(4096);
        let at = (host / PAGE + done as u64) * 8;
        pagemap.read_exact_at(&mut entries[..n * 8], at)?;
        for (i, e) in entries[..n * 8].chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            if v & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                want[done + i] = true;
            }
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn only_nonzero_pages_are_written_and_a_restore_reads_them_back() {
        let ram = GuestRam::new(16 * MIB).unwrap();
        ram.memory()
            .write_slice(&[0xab; 5000], GuestAddress(0x3000))
            .unwrap();
        ram.memory()
            .write_obj(0x1234_5678_u32, GuestAddress(9 * MIB))
            .unwrap();
        // A page written and zeroed again is data in the memfd, not in the file.
        ram.memory()
            .write_slice(&[0; 4096], GuestAddress(4 * MIB))
            .unwrap();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("memory.bin");
        let w = write(&ram, &p).unwrap();
        assert_eq!(w.data_bytes, 3 * PAGE, "{w:?}");
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 16 * MIB);
        assert!(meta.blocks() * 512 <= 8 * PAGE, "sparse: {}", meta.blocks());

        let back = GuestRam::from_snapshot(File::open(&p).unwrap(), 16 * MIB).unwrap();
        let mut b = [0u8; 5000];
        back.memory()
            .read_slice(&mut b, GuestAddress(0x3000))
            .unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        let v: u32 = back.memory().read_obj(GuestAddress(9 * MIB)).unwrap();
        assert_eq!(v, 0x1234_5678);

        // Writes to the restored memory stay private, and a snapshot of it
        // sees them (pagemap) and the file's pages alike.
        back.memory()
            .write_obj(7u64, GuestAddress(12 * MIB))
            .unwrap();
        let mut again = [0u8; 4];
        File::open(&p)
            .unwrap()
            .read_exact_at(&mut again, 12 * MIB)
            .unwrap();
        assert_eq!(again, [0; 4], "the snapshot file never changes");
        let p2 = t.path().join("memory2.bin");
        let w2 = write(&back, &p2).unwrap();
        assert_eq!(w2.data_bytes, 4 * PAGE, "{w2:?}");
        let third = GuestRam::from_snapshot(File::open(&p2).unwrap(), 16 * MIB).unwrap();
        let v: u64 = third.memory().read_obj(GuestAddress(12 * MIB)).unwrap();
        assert_eq!(v, 7);
        let v: u32 = third.memory().read_obj(GuestAddress(9 * MIB)).unwrap();
        assert_eq!(v, 0x1234_5678);
        assert!(third.file_offset_of_guest(0x3000, 8).is_none());
    }
}
