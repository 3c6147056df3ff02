//! Guest physical memory: the address map and its memfd backing.
//!
//! RAM is one memfd, mapped `MAP_SHARED` into the monitor and registered
//! with KVM. Keeping it in a file (rather than anonymous memory) is what lets
//! a later fork or snapshot map the same pages `MAP_PRIVATE`.
//!
//! The exception is what the boot loader maps over it: the kernel image and
//! the initramfs are mapped copy-on-write (`MAP_PRIVATE`) from prepared,
//! sealed memfds ([`GuestRam::map_private`]) instead of being copied for
//! every VM. Those ranges are recorded; their bytes live in the mapping, not
//! in the RAM memfd, and [`GuestRam::file_offset_of_guest`] refuses them.
//!
//! A VM with vhost-user devices hands the memfd to their back ends
//! (virtiofsd), which map it themselves: they must see every byte the
//! guest sees. Such RAM is made with [`GuestRam::new_shared`] (or
//! [`GuestRam::from_snapshot_shared`]) and keeps every byte in the memfd:
//! [`GuestRam::place_image`] copies the boot images in instead of mapping
//! them over, and a restore copies the snapshot's pages into a new memfd
//! instead of mapping its file privately.
//!
//! The guest physical map (x86_64):
//!
//! ```text
//! 0x0000_0000  RAM: GDT, PVH start info, memory map, command line
//! 0x000a_0000  legacy hole (VGA, BIOS), not RAM
//! 0x000f_0000  MP table (the BIOS area, where Linux scans for it)
//! 0x0010_0000  RAM: kernel (at its ELF physical address), initramfs at the top
//! 0xc000_0000  32-bit hole: virtio-mmio windows from 0xd000_0000,
//!              IO-APIC 0xfec0_0000, local APIC 0xfee0_0000
//! 0x1_0000_0000  RAM above 3 GiB, if any
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::devices::virtio::GuestMemory;

/// GDT used for the PVH 32-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// `hvm_start_info` for the PVH entry (RBX points here).
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// `hvm_modlist_entry` array (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6100;
/// `hvm_memmap_table_entry` array (the e820 map).
pub const MEMMAP_ADDR: u64 = 0x7000;
/// Room for the memory map: at most this many entries.
pub const MEMMAP_MAX_ENTRIES: usize = 16;
/// The kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86 `COMMAND_LINE_SIZE`: the kernel truncates anything longer.
pub const CMDLINE_MAX_LEN: usize = 2048;
/// End of base memory (start of the VGA/BIOS hole).
pub const BASE_MEMORY_END: u64 = 0xa_0000;
/// The MP table, in the BIOS area Linux scans (0xf0000-0xfffff). It is
/// backed by guest memory but reported reserved, never RAM.
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// Room for the MP table (the whole scanned BIOS area).
pub const MPTABLE_MAX_LEN: usize = 0x1_0000;
/// Where RAM resumes above the legacy hole; kernels load above it.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit device hole: RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit device hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IO-APIC's registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages, Intel only), placed just below the IO-APIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

const PAGE_SIZE: u64 = 4096;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the guest memory file")]
    Memfd(#[source] io::Error),
    #[error("cannot size the guest memory file to {0} bytes")]
    Truncate(u64, #[source] io::Error),
    #[error("cannot map {0} bytes of guest memory")]
    Mmap(usize, #[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions overlap or are invalid")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot register guest memory slot {0} with kvm")]
    KvmSlot(u32, #[source] kvm_ioctls::Error),
    #[error("guest memory size of {0} bytes is not page aligned")]
    Unaligned(u64),
    #[error("cannot map {len:#x} bytes copy-on-write at guest address {addr:#x}: {reason}")]
    Overlay { addr: u64, len: u64, reason: String },
    #[error("cannot copy a {0}-byte snapshot into guest memory")]
    Copy(u64, #[source] io::Error),
    #[error("cannot keep {0} bytes of guest memory out of core dumps")]
    DontDump(usize, #[source] io::Error),
}

/// Marks `len` bytes of guest memory at `host` MADV_DONTDUMP: a crash of
/// the monitor (inside a user's process, by default) must not write the
/// guest's RAM, its secrets included, into a core file.
fn dont_dump(host: *mut u8, len: usize) -> Result<(), Error> {
    // SAFETY: `host..host + len` is a whole mapping of guest memory that
    // the caller owns and keeps mapped; MADV_DONTDUMP only sets a flag on
    // its VMAs and changes no byte and no mapping.
    let ret = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTDUMP) };
    if ret != 0 {
        return Err(Error::DontDump(len, io::Error::last_os_error()));
    }
    Ok(())
}

/// One entry of the e820 memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The RAM ranges `(start, length)` for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// Where RAM below 4 GiB ends: the initramfs and boot data must sit below.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// The e820 map: base memory, the BIOS area holding the MP table reserved,
/// then RAM from 1 MiB (split around the 32-bit hole when memory reaches
/// it).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: BASE_MEMORY_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: MPTABLE_ADDR,
            size: HIGH_MEMORY_START - MPTABLE_ADDR,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let start_hi = start.max(HIGH_MEMORY_START);
        let end = start + len;
        if end > start_hi {
            map.push(E820Entry {
                addr: start_hi,
                size: end - start_hi,
                kind: E820_RAM,
            });
        }
    }
    map
}

/// Guest RAM backed by one memfd.
pub struct GuestRam {
    mem: GuestMemory,
    file: Arc<File>,
    size: u64,
    /// Mapped `MAP_PRIVATE` as a whole (restored from a snapshot).
    private: bool,
    /// Guest ranges `(addr, len)` mapped over the memfd by `map_private`.
    overlays: Mutex<Vec<(u64, u64)>>,
    /// Every byte lives in the memfd, which other processes map: nothing
    /// may be mapped over it.
    shared: bool,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM in a memfd, mapped shared.
    pub fn new(size: u64) -> Result<Self, Error> {
        if size == 0 || size % 4096 != 0 {
            return Err(Error::Unaligned(size));
        }
        let file = Arc::new(create_memfd()?);
        file.set_len(size).map_err(|e| Error::Truncate(size, e))?;
        Self::map(file, size, libc::MAP_SHARED, false)
    }

    /// Like [`GuestRam::new`], for a VM whose vhost-user back ends map the
    /// memfd: every guest byte stays in it (see the module documentation).
    pub fn new_shared(size: u64) -> Result<Self, Error> {
        let mut ram = Self::new(size)?;
        ram.shared = true;
        Ok(ram)
    }

    /// Guest RAM restored from a snapshot's memory file into a new memfd,
    /// for a VM whose vhost-user back ends map it: the file's data extents
    /// are copied (inside the host kernel), its holes stay holes. Costs a
    /// copy of the guest's pages where [`GuestRam::from_snapshot`] maps
    /// them lazily; the file is never changed.
    pub fn from_snapshot_shared(file: &File, size: u64) -> Result<Self, Error> {
        let ram = Self::new_shared(size)?;
        let copy = |e: io::Error| Error::Copy(size, e);
        let len = file.metadata().map_err(copy)?.len();
        if len != size {
            return Err(copy(io::Error::other(format!(
                "the memory file holds {len} bytes"
            ))));
        }
        let ranges: Vec<_> = crate::sparse::data_extents(file, 0, size)
            .map_err(copy)?
            .into_iter()
            .map(|(start, end)| (start, start, end - start))
            .collect();
        ram.copy_ranges_from_file(file, &ranges).map_err(copy)?;
        Ok(ram)
    }

    /// Guest RAM restored from a snapshot's memory file: `file` (laid out
    /// like the memfd, `size` bytes) mapped copy-on-write. Pages load
    /// lazily from the file and the guest's writes stay private to this
    /// VM, so one file serves any number of VMs and never changes.
    pub fn from_snapshot(file: File, size: u64) -> Result<Self, Error> {
        if size == 0 || size % 4096 != 0 {
            return Err(Error::Unaligned(size));
        }
        Self::map(Arc::new(file), size, libc::MAP_PRIVATE, true)
    }

    fn map(file: Arc<File>, size: u64, share: libc::c_int, private: bool) -> Result<Self, Error> {
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (start, len) in ram_ranges(size) {
            let region = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::from_arc(file.clone(), offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(share | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| Error::Mmap(len as usize, e))?;
            // `GuestRegionMmap::new` only fails when start + len overflows,
            // which `ram_ranges` never produces.
            dont_dump(region.as_ptr(), region.size())?;
            let region = GuestRegionMmap::new(region, GuestAddress(start))
                .expect("ram range within the address space");
            regions.push(region);
            offset += len;
        }
        let mem = GuestMemory::from_regions(regions).map_err(Error::Regions)?;
        Ok(GuestRam {
            mem,
            file,
            size,
            private,
            overlays: Mutex::new(Vec::new()),
            shared: false,
        })
    }

    /// Whether the whole RAM is a private (copy-on-write) mapping of its
    /// file, as after a restore: the file then does not hold the guest's
    /// writes.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Whether every guest byte lives in the memfd, which vhost-user back
    /// ends may map ([`GuestRam::new_shared`]).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Registers every region as a KVM memory slot (slots 0, 1, ...).
    pub fn register(&self, vm: &VmFd) -> Result<(), Error> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 is inside every region");
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping behind `host` lives as long as `self.mem`,
            // which the VM keeps until after the VM fd (and so the slot) is
            // closed; the slots do not overlap.
            unsafe { vm.set_user_memory_region(desc) }.map_err(|e| Error::KvmSlot(slot, e))?;
        }
        Ok(())
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The memfd behind the RAM (for fork and snapshot).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd offset behind host address `ptr` if `len` bytes from it
    /// lie inside one region's mapping and none of them is mapped over by
    /// [`GuestRam::map_private`].
    pub fn file_offset_of_host(&self, ptr: *const u8, len: usize) -> Option<u64> {
        if self.private {
            return None;
        }
        let ptr = ptr as usize;
        let (addr, off) = self.mem.iter().find_map(|region| {
            let base = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .ok()? as usize;
            let off = ptr.checked_sub(base)?;
            (off.checked_add(len)? as u64 <= region.len()).then(|| {
                let addr = region.start_addr().0 + off as u64;
                (addr, region.file_offset().map(|f| f.start() + off as u64))
            })
        })?;
        if self.overlaps_overlay(addr, len as u64) {
            return None;
        }
        off
    }

    /// The memfd offset behind guest physical `addr` if `len` bytes from it
    /// lie inside one region and none of them is mapped over by
    /// [`GuestRam::map_private`].
    pub fn file_offset_of_guest(&self, addr: u64, len: u64) -> Option<u64> {
        if self.private || self.overlaps_overlay(addr, len) {
            return None;
        }
        self.mem.iter().find_map(|region| {
            let off = addr.checked_sub(region.start_addr().0)?;
            (off.checked_add(len)? <= region.len())
                .then(|| region.file_offset().map(|f| f.start() + off))
                .flatten()
        })
    }

    fn overlaps_overlay(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        self.overlays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&(a, l)| addr < a + l && a < end)
    }

    /// The guest ranges `(addr, len)` mapped copy-on-write over the memfd.
    pub fn private_ranges(&self) -> Vec<(u64, u64)> {
        self.overlays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `len` bytes of `file` from `file_offset` into guest memory at
    /// `addr` (page aligned, inside one region), for the boot images:
    /// mapped copy-on-write ([`GuestRam::map_private`]) into RAM of this
    /// process alone, copied into the memfd (its data extents; holes read
    /// as zero already) into [shared](GuestRam::new_shared) RAM.
    pub fn place_image(
        &self,
        addr: u64,
        len: u64,
        file: &File,
        file_offset: u64,
    ) -> Result<(), Error> {
        if !self.shared {
            return self.map_private(addr, len, file, file_offset);
        }
        let fail = |reason: String| Error::Overlay { addr, len, reason };
        let target = self
            .file_offset_of_guest(addr, len)
            .ok_or_else(|| fail("outside guest memory".into()))?;
        let end = file_offset
            .checked_add(len)
            .ok_or_else(|| fail("file range overflows".into()))?;
        let ranges: Vec<_> = crate::sparse::data_extents(file, file_offset, end)
            .map_err(|e| fail(e.to_string()))?
            .into_iter()
            .map(|(start, stop)| (start, target + (start - file_offset), stop - start))
            .collect();
        self.copy_ranges_from_file(file, &ranges)
            .map_err(|e| fail(e.to_string()))
    }

    /// Maps `len` bytes of `file` from `file_offset` over guest memory at
    /// `addr`, copy-on-write: the guest reads the file's pages (shared with
    /// every VM mapping the same file, no copy) and its writes go to pages
    /// private to this VM; the file never changes. `addr`, `len` and
    /// `file_offset` must be page aligned and the range inside one region.
    ///
    /// Call it before the guest runs: it replaces whatever the range held.
    pub fn map_private(
        &self,
        addr: u64,
        len: u64,
        file: &File,
        file_offset: u64,
    ) -> Result<(), Error> {
        let fail = |reason: String| Error::Overlay { addr, len, reason };
        if self.shared {
            return Err(fail(
                "guest memory shared with back ends keeps every byte in its memfd".into(),
            ));
        }
        if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || file_offset % PAGE_SIZE != 0 || len == 0
        {
            return Err(fail("not page aligned".into()));
        }
        let region = self
            .mem
            .iter()
            .find(|r| {
                let start = r.start_addr().0;
                addr >= start
                    && addr
                        .checked_add(len)
                        .is_some_and(|end| end <= start + r.len())
            })
            .ok_or_else(|| fail("outside guest memory".into()))?;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(addr - region.start_addr().0))
            .map_err(|e| fail(e.to_string()))?;
        let offset =
            libc::off_t::try_from(file_offset).map_err(|_| fail("file offset too large".into()))?;
        // SAFETY: `host..host + len` lies inside the mapping of `region`,
        // which `self.mem` owns and unmaps as a whole when dropped (the
        // overlay with it); MAP_FIXED replaces those pages with a private
        // mapping of `file`, which the mapping keeps open. Guest memory is
        // only ever accessed through volatile slices and raw pointers, never
        // Rust references, so changing the bytes behind them is sound.
        let ret = unsafe {
            libc::mmap(
                host.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(fail(io::Error::last_os_error().to_string()));
        }
        // A new mapping: it does not inherit the flag of the one it replaced.
        dont_dump(host, len as usize)?;
        self.overlays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, len));
        Ok(())
    }

    /// Copies `len` bytes of `src` from `src_offset` into the memfd at
    /// `file_offset`, inside the host kernel (sendfile).
    ///
    /// On nested hosts the page faults of copying through the mapping cost
    /// more than the copy itself; writing through the file allocates the
    /// pages without faulting them in. The mapping is `MAP_SHARED` of the
    /// same file, so the guest sees the bytes.
    pub fn copy_from_file(
        &self,
        src: &File,
        src_offset: u64,
        file_offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.copy_ranges_from_file(src, &[(src_offset, file_offset, len)])
    }

    /// [`GuestRam::copy_from_file`] for several `(src_offset, file_offset,
    /// len)` ranges.
    pub fn copy_ranges_from_file(&self, src: &File, ranges: &[(u64, u64, u64)]) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        if self.private {
            // The file is a snapshot's: it must never change.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "guest memory restored from a snapshot is not writable through its file",
            ));
        }
        // An open file description of our own: sendfile writes at the file
        // position, which must not be shared with concurrent loaders.
        let mut out = File::options()
            .write(true)
            .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))?;
        for &(src_offset, file_offset, len) in ranges {
            let in_bounds = file_offset
                .checked_add(len)
                .is_some_and(|end| end <= self.size);
            if !in_bounds {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at {file_offset:#x} are beyond guest memory"),
                ));
            }
            out.seek(SeekFrom::Start(file_offset))?;
            sendfile_all(&out, src, src_offset, len)?;
        }
        Ok(())
    }
}

/// Copies `len` bytes of `src` from `src_offset` to `out` at its current
/// position, inside the host kernel (sendfile).
pub fn sendfile_all(out: &File, src: &File, src_offset: u64, len: u64) -> io::Result<()> {
    let mut in_off = libc::off_t::try_from(src_offset)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both fds are open for the duration of the call and
        // `in_off` is a valid off_t the kernel updates.
        let n = unsafe { libc::sendfile(out.as_raw_fd(), src.as_raw_fd(), &mut in_off, chunk) };
        match n {
            n if n > 0 => left -= n as u64,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn create_memfd() -> Result<File, Error> {
    let name = c"smol-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string and the flags are
    // valid; the return value is checked. Sealing is allowed so that a boot
    // image prepared in guest RAM can be sealed read-only afterwards.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;

    /// The VmFlags of the mapping that holds `addr` in this process.
    fn vm_flags_at(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    /// Issue 15: guest RAM, copy-on-write overlays included, stays out of
    /// the monitor's core dumps.
    #[test]
    fn guest_memory_is_not_dumped() {
        let ram = GuestRam::new(8 * MIB).unwrap();
        let host = |gpa: u64| ram.memory().get_host_address(GuestAddress(gpa)).unwrap() as usize;
        for gpa in [0, 4 * MIB, 8 * MIB - PAGE_SIZE] {
            let flags = vm_flags_at(host(gpa));
            assert!(flags.split(' ').any(|f| f == "dd"), "{gpa:#x}: {flags}");
        }
        let file = create_memfd().unwrap();
        file.set_len(MIB).unwrap();
        ram.map_private(2 * MIB, MIB, &file, 0).unwrap();
        let flags = vm_flags_at(host(2 * MIB));
        assert!(flags.split(' ').any(|f| f == "dd"), "overlay: {flags}");
    }

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 * MIB), vec![(0, 128 * MIB)]);
        assert_eq!(low_ram_end(128 * MIB), 128 * MIB);
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let size = 4096 * MIB;
        assert_eq!(
            ram_ranges(size),
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, size - MMIO_HOLE_START)
            ]
        );
        assert_eq!(low_ram_end(size), MMIO_HOLE_START);
    }

    #[test]
    fn e820_for_small_memory() {
        let map = e820_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0xa_0000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xf_0000,
                    size: 0x1_0000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_for_memory_above_the_hole() {
        let map = e820_map(4096 * MIB);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIGH_MEMORY_START,
                size: MMIO_HOLE_START - HIGH_MEMORY_START,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: MMIO_HOLE_END,
                size: 1024 * MIB,
                kind: E820_RAM
            }
        );
        assert!(map.len() <= MEMMAP_MAX_ENTRIES);
    }

    #[test]
    fn boot_data_does_not_overlap() {
        // Each structure stays inside its slot; devices sit inside the hole
        // and do not touch the APICs. Checked at compile time.
        const {
            assert!(GDT_ADDR + 4 * 8 <= PVH_INFO_ADDR);
            assert!(PVH_INFO_ADDR + 64 <= PVH_MODLIST_ADDR);
            assert!(PVH_MODLIST_ADDR + 32 <= MEMMAP_ADDR);
            assert!(MEMMAP_ADDR + (MEMMAP_MAX_ENTRIES as u64) * 24 <= CMDLINE_ADDR);
            assert!(CMDLINE_ADDR + CMDLINE_MAX_LEN as u64 <= BASE_MEMORY_END);
            assert!(MPTABLE_ADDR + MPTABLE_MAX_LEN as u64 == HIGH_MEMORY_START);
            assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START);
            assert!(VIRTIO_MMIO_BASE + 32 * VIRTIO_MMIO_SIZE <= IOAPIC_ADDR);
        }
    }

    #[test]
    fn memfd_ram_is_shared_with_the_file() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(8 * MIB).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file().read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.file().metadata().unwrap().len(), 8 * MIB);
    }

    #[test]
    fn offsets_of_host_and_guest_addresses() {
        let ram = GuestRam::new(8 * MIB).unwrap();
        let host = ram.memory().get_host_address(GuestAddress(0x3000)).unwrap();
        assert_eq!(ram.file_offset_of_host(host, 16), Some(0x3000));
        assert_eq!(ram.file_offset_of_host(host, 8 * MIB as usize), None);
        assert_eq!(ram.file_offset_of_host(std::ptr::null(), 1), None);
        assert_eq!(ram.file_offset_of_guest(0x3000, 16), Some(0x3000));
        assert_eq!(ram.file_offset_of_guest(8 * MIB - 4, 8), None);
    }

    #[test]
    fn copy_from_file_lands_in_guest_memory() {
        use std::io::Write;
        let ram = GuestRam::new(8 * MIB).unwrap();
        let mut src = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        src.write_all(&data).unwrap();
        ram.copy_from_file(&src, 10, 0x10_0000, 50_000).unwrap();
        let mut back = vec![0u8; 50_000];
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(back, &data[10..50_010]);
        assert!(
            ram.copy_from_file(&src, 99_000, 0, 5_000).is_err(),
            "short source"
        );
    }

    /// Issue 11: RAM shared with back ends holds every byte in its memfd,
    /// boot images included, and refuses overlays.
    #[test]
    fn shared_ram_copies_images_into_its_file() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new_shared(8 * MIB).unwrap();
        assert!(ram.is_shared());
        let image = create_memfd().unwrap();
        image.set_len(3 * MIB).unwrap();
        image.write_all_at(b"kernel text", MIB).unwrap();
        image.write_all_at(b"more", 2 * MIB + 8).unwrap();
        ram.place_image(4 * MIB, 2 * MIB, &image, MIB).unwrap();
        let mut buf = [0u8; 11];
        ram.file().read_exact_at(&mut buf, 4 * MIB).unwrap();
        assert_eq!(&buf, b"kernel text", "in the memfd, not an overlay");
        let mut buf = [0u8; 4];
        ram.memory()
            .read_slice(&mut buf, GuestAddress(5 * MIB + 8))
            .unwrap();
        assert_eq!(&buf, b"more");
        assert!(ram.private_ranges().is_empty());
        assert_eq!(ram.file_offset_of_guest(4 * MIB, 16), Some(4 * MIB));
        assert!(matches!(
            ram.map_private(0, MIB, &image, 0),
            Err(Error::Overlay { .. })
        ));
        // Outside memory is refused, not written.
        assert!(ram.place_image(7 * MIB, 2 * MIB, &image, 0).is_err());

        // A private RAM overlays the image instead.
        let private = GuestRam::new(8 * MIB).unwrap();
        private.place_image(4 * MIB, 2 * MIB, &image, MIB).unwrap();
        assert_eq!(private.private_ranges(), vec![(4 * MIB, 2 * MIB)]);
    }

    #[test]
    fn a_snapshot_restored_shared_is_a_copy_in_a_new_memfd() {
        use std::os::unix::fs::FileExt;
        let snap = tempfile::tempfile().unwrap();
        snap.set_len(8 * MIB).unwrap();
        snap.write_all_at(&[7; 4096], 3 * MIB).unwrap();
        let ram = GuestRam::from_snapshot_shared(&snap, 8 * MIB).unwrap();
        assert!(ram.is_shared() && !ram.is_private());
        let mut buf = [0u8; 4096];
        ram.file().read_exact_at(&mut buf, 3 * MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        ram.memory().write_obj(1u64, GuestAddress(3 * MIB)).unwrap();
        snap.read_exact_at(&mut buf[..8], 3 * MIB).unwrap();
        assert_eq!(buf[..8], [7; 8], "the snapshot file never changes");
        // A file of another size is refused.
        assert!(matches!(
            GuestRam::from_snapshot_shared(&snap, 16 * MIB),
            Err(Error::Copy(..))
        ));
    }

    #[test]
    fn unaligned_size_is_refused() {
        assert!(matches!(GuestRam::new(4097), Err(Error::Unaligned(4097))));
        assert!(matches!(GuestRam::new(0), Err(Error::Unaligned(0))));
    }
}
