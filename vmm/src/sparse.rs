//! Sparse files: finding where a file holds data, so that copies and
//! snapshots touch only those bytes (reading a hole of a shared memfd would
//! allocate it).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `lseek(file, pos, whence)`.
pub(crate) fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    let pos =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an open fd has no memory effects. Callers use it
    // only to find data and holes, on descriptors nothing else reads from.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The data extents `(start, end)` of `file` inside `start..end`, in
/// order, clipped to it; everything else reads as zero.
pub(crate) fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // ENXIO: no data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE)?.min(end);
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_are_found_and_clipped() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1; 4096], 64 << 10).unwrap();
        f.write_all_at(&[2; 8192], 512 << 10).unwrap();
        let all = data_extents(&f, 0, 1 << 20).unwrap();
        assert_eq!(all, vec![(64 << 10, 68 << 10), (512 << 10, 520 << 10)]);
        let clipped = data_extents(&f, 66 << 10, 516 << 10).unwrap();
        assert_eq!(clipped, vec![(66 << 10, 68 << 10), (512 << 10, 516 << 10)]);
        assert!(data_extents(&f, 600 << 10, 1 << 20).unwrap().is_empty());
    }
}
