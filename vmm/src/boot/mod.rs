//! Putting a kernel, its initramfs and the boot data into guest memory.

pub mod cmdline;
pub mod mptable;
pub mod pvh;
pub mod store;
pub mod template;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::devices::virtio::GuestMemory;
use crate::memory::{
    e820_map, low_ram_end, GuestRam, CMDLINE_ADDR, GDT_ADDR, HIGH_MEMORY_START, MMIO_HOLE_START,
    MPTABLE_ADDR,
};
use template::{FileKey, InitramfsImage, KernelImage, INITRAMFS, KERNELS};

const PAGE: u64 = 4096;
const EM_X86_64: u16 = 62;

/// Errors of loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel not found: {}", .0.display())]
    KernelNotFound(PathBuf),
    #[error("kernel {}: {reason}", path.display())]
    KernelInvalid { path: PathBuf, reason: String },
    #[error("cannot read kernel {}", path.display())]
    KernelRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initramfs not found: {}", .0.display())]
    InitramfsNotFound(PathBuf),
    #[error("cannot read initramfs {}", path.display())]
    InitramfsRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initramfs {} ({size} bytes) does not fit between the kernel and the end of memory", path.display())]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str),
    #[error("cannot prepare the {what} for mapping: {source}")]
    Prepare {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot map the {what} into guest memory: {source}")]
    Map {
        what: &'static str,
        #[source]
        source: crate::memory::Error,
    },
    #[error(transparent)]
    Mptable(#[from] mptable::Error),
    #[error(transparent)]
    Pvh(#[from] pvh::Error),
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The PVH 32-bit entry point.
    pub entry: u64,
    /// First byte above the kernel's image (text, data, bss).
    pub end: u64,
}

/// The kernel file as linux-loader reads it. Its bulk reads into guest
/// memory (the PT_LOAD segments) are done by the host kernel, from the file
/// straight into the memfd behind the slice, instead of through the mapping.
struct KernelSource<'a> {
    file: File,
    ram: &'a GuestRam,
}

impl Read for KernelSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for KernelSource<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for KernelSource<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let target = self
            .ram
            .file_offset_of_host(buf.ptr_guard_mut().as_ptr(), len);
        let Some(file_offset) = target else {
            return self.file.read_volatile(buf);
        };
        let pos = self
            .file
            .stream_position()
            .map_err(VolatileMemoryError::IOError)?;
        let file_len = self
            .file
            .metadata()
            .map_err(VolatileMemoryError::IOError)?
            .len();
        let n = (len as u64).min(file_len.saturating_sub(pos));
        if n > 0 {
            self.ram
                .copy_from_file(&self.file, pos, file_offset, n)
                .map_err(VolatileMemoryError::IOError)?;
            self.file
                .seek(SeekFrom::Start(pos + n))
                .map_err(VolatileMemoryError::IOError)?;
        }
        Ok(n as usize)
    }
}

/// Loads the `vmlinux` at `path` at its ELF physical addresses and finds
/// its PVH entry note. The kernel is prepared once per process
/// ([`template`]), or once per host with a `store` directory ([`store`]),
/// and placed with [`GuestRam::place_image`]: mapped copy-on-write, or
/// copied into RAM shared with back ends.
pub fn load_kernel(
    ram: &GuestRam,
    path: &Path,
    store: Option<&Path>,
) -> Result<LoadedKernel, Error> {
    let file = open(
        path,
        || Error::KernelNotFound(path.to_path_buf()),
        |source| Error::KernelRead {
            path: path.to_path_buf(),
            source,
        },
    )?;
    let key = FileKey::of(&file).map_err(|source| Error::KernelRead {
        path: path.to_path_buf(),
        source,
    })?;
    let image = KERNELS.get_or_build(key, || {
        stored_or_prepared(
            store,
            "kernel",
            |dir| store::load_kernel(dir, &key),
            || prepare_kernel(file, path),
            |dir, image| store::save_kernel(dir, &key, image),
        )
    })?;
    if image.end.div_ceil(PAGE) * PAGE > low_ram_end(ram.size()) {
        return Err(Error::KernelInvalid {
            path: path.to_path_buf(),
            reason: format!("its image ends at {:#x}, beyond guest memory", image.end),
        });
    }
    let len = image.end.div_ceil(PAGE) * PAGE - image.start;
    ram.place_image(image.start, len, &image.file, image.start)
        .map_err(|source| Error::Map {
            what: "kernel",
            source,
        })?;
    Ok(LoadedKernel {
        entry: image.entry,
        end: image.end,
    })
}

/// The image from the `store` directory when it holds a valid one, else
/// prepared, and then stored there for later processes. Failing to store
/// it is logged, not an error: the next process prepares it again.
fn stored_or_prepared<T>(
    store: Option<&Path>,
    what: &str,
    load: impl FnOnce(&Path) -> Option<T>,
    prepare: impl FnOnce() -> Result<T, Error>,
    save: impl FnOnce(&Path, &T) -> io::Result<()>,
) -> Result<T, Error> {
    if let Some(image) = store.and_then(load) {
        return Ok(image);
    }
    let image = prepare()?;
    if let Some(dir) = store {
        if let Err(e) = save(dir, &image) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot store the prepared {what}");
        }
    }
    Ok(image)
}

/// Lays the kernel out in a scratch memfd as big as the RAM below the
/// 32-bit hole (sparse: only the segments take memory), at the guest
/// addresses it will have in every VM, then seals it.
fn prepare_kernel(mut file: File, path: &Path) -> Result<KernelImage, Error> {
    let invalid = |reason: String| Error::KernelInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let prepare = |source| Error::Prepare {
        what: "kernel",
        source,
    };
    check_elf_header(&mut file).map_err(invalid)?;
    let scratch =
        GuestRam::new(MMIO_HOLE_START).map_err(|e| prepare(io::Error::other(e.to_string())))?;
    let mut source = KernelSource {
        file,
        ram: &scratch,
    };
    let loaded = Elf::load(
        scratch.memory(),
        None,
        &mut source,
        Some(GuestAddress(HIGH_MEMORY_START)),
    )
    .map_err(|e| invalid(describe_loader_error(&e)))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => {
            return Err(invalid(
                "no pvh entry note (build with CONFIG_PVH=y)".into(),
            ))
        }
    };
    let start = lowest_segment(&mut source.file).map_err(invalid)? & !(PAGE - 1);
    let end = loaded.kernel_end;
    if start < HIGH_MEMORY_START || end <= start {
        return Err(invalid(format!(
            "its segments span {start:#x}..{end:#x}, not a kernel image above 1 MiB"
        )));
    }
    let file = template::seal_ram(scratch, end.div_ceil(PAGE) * PAGE).map_err(prepare)?;
    Ok(KernelImage {
        file,
        start,
        end,
        entry,
    })
}

/// The lowest physical address of a loadable segment (the loader has
/// already checked the headers).
fn lowest_segment(file: &mut File) -> Result<u64, String> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut ehdr))
        .map_err(|e| format!("cannot read its header: {e}"))?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as usize;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as usize;
    if phentsize < 56 {
        return Err(format!("program header size {phentsize} is too small"));
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut table))
        .map_err(|e| format!("cannot read its program headers: {e}"))?;
    table
        .chunks_exact(phentsize)
        .filter(|ph| {
            let kind = u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes"));
            let memsz = u64::from_le_bytes(ph[40..48].try_into().expect("8 bytes"));
            kind == 1 && memsz > 0
        })
        .map(|ph| u64::from_le_bytes(ph[24..32].try_into().expect("8 bytes")))
        .min()
        .ok_or_else(|| "no loadable segment".to_string())
}

/// Loads the initramfs at the top of memory below 4 GiB, page aligned,
/// placed ([`GuestRam::place_image`]) from an image prepared once per
/// process, or once per host with a `store` directory.
/// Returns `(address, size)`; [`check_initramfs_fits`] then checks it stays
/// clear of the kernel (the two load in parallel).
pub fn load_initramfs(
    ram: &GuestRam,
    path: &Path,
    store: Option<&Path>,
) -> Result<(u64, u64), Error> {
    let file = open(
        path,
        || Error::InitramfsNotFound(path.to_path_buf()),
        |source| Error::InitramfsRead {
            path: path.to_path_buf(),
            source,
        },
    )?;
    let read_err = |source| Error::InitramfsRead {
        path: path.to_path_buf(),
        source,
    };
    let key = FileKey::of(&file).map_err(read_err)?;
    let size = key.size();
    let too_large = || Error::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let top = low_ram_end(ram.size());
    let addr = match top.checked_sub(size).map(|a| a & !(PAGE - 1)) {
        Some(a) if a >= HIGH_MEMORY_START && size > 0 => a,
        _ => return Err(too_large()),
    };
    let image = INITRAMFS.get_or_build(key, || {
        stored_or_prepared(
            store,
            "initramfs",
            |dir| store::load_initramfs(dir, &key),
            || prepare_initramfs(&file, size, path),
            |dir, image| store::save_initramfs(dir, &key, image),
        )
    })?;
    let len = image.size.div_ceil(PAGE) * PAGE;
    ram.place_image(addr, len, &image.file, image.offset)
        .map_err(|source| Error::Map {
            what: "initramfs",
            source,
        })?;
    Ok((addr, size))
}

/// Copies the initramfs into a sealed memfd, inside the host kernel.
fn prepare_initramfs(src: &File, size: u64, path: &Path) -> Result<InitramfsImage, Error> {
    let prepare = |source| Error::Prepare {
        what: "initramfs",
        source,
    };
    let file = template::memfd(c"smol-initramfs").map_err(prepare)?;
    file.set_len(size.div_ceil(PAGE) * PAGE).map_err(prepare)?;
    crate::memory::sendfile_all(&file, src, 0, size).map_err(|source| Error::InitramfsRead {
        path: path.to_path_buf(),
        source,
    })?;
    template::seal(&file).map_err(prepare)?;
    Ok(InitramfsImage {
        file,
        offset: 0,
        size,
    })
}

/// The initramfs at `addr` must start above the kernel's image.
pub fn check_initramfs_fits(
    path: &Path,
    (addr, size): (u64, u64),
    kernel_end: u64,
) -> Result<(), Error> {
    if addr < kernel_end.div_ceil(PAGE) * PAGE {
        return Err(Error::InitramfsTooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok(())
}

/// Writes the boot data: GDT, command line, MP table, PVH start info with
/// the e820 map and the initramfs module.
pub fn write_boot_data(
    mem: &GuestMemory,
    cmdline: &Cmdline,
    vcpus: u8,
    initramfs: Option<(u64, u64)>,
) -> Result<(), Error> {
    let gdt: Vec<u8> = pvh::GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_ADDR))
        .map_err(|_| Error::GuestWrite("the gdt"))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|_| Error::GuestWrite("the command line"))?;
    let mptable = mptable::build(MPTABLE_ADDR, vcpus)?;
    mem.write_slice(&mptable, GuestAddress(MPTABLE_ADDR))
        .map_err(|_| Error::GuestWrite("the mp table"))?;
    let params = pvh::boot_params(&e820_map(mem_size(mem)), initramfs)?;
    pvh::write(mem, &params)?;
    Ok(())
}

fn mem_size(mem: &GuestMemory) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

fn open(
    path: &Path,
    not_found: impl FnOnce() -> Error,
    other: impl FnOnce(io::Error) -> Error,
) -> Result<File, Error> {
    match File::open(path) {
        Ok(f) => match f.metadata() {
            Ok(meta) if meta.is_dir() => Err(other(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ))),
            Ok(_) => Ok(f),
            Err(e) => Err(other(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found()),
        Err(e) => Err(other(e)),
    }
}

/// Refuses what is plainly not an x86-64 ELF before the loader reads it,
/// with a message that says which.
fn check_elf_header(file: &mut File) -> Result<(), String> {
    let mut hdr = [0u8; 64];
    let mut got = 0;
    while got < hdr.len() {
        match file.read(&mut hdr[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("cannot read its header: {e}")),
        }
    }
    if got < hdr.len() {
        return Err(format!(
            "only {got} bytes long, too short for an elf header"
        ));
    }
    if &hdr[0..4] != b"\x7fELF" {
        if &hdr[0..2] == b"MZ" {
            return Err(
                "not an elf file (a compressed bzImage? use the uncompressed vmlinux)".into(),
            );
        }
        return Err("not an elf file (bad magic)".into());
    }
    if hdr[4] != 2 {
        return Err("not a 64-bit elf".into());
    }
    let machine = u16::from_le_bytes([hdr[18], hdr[19]]);
    if machine != EM_X86_64 {
        return Err(format!("elf machine {machine} is not x86-64"));
    }
    Ok(())
}

fn describe_loader_error(e: &linux_loader::loader::Error) -> String {
    // The loader's messages are capitalised and prefixed; keep ours uniform.
    let text = e.to_string();
    let text = text.rsplit(": ").next().unwrap_or(&text).to_lowercase();
    format!("cannot load it: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn ram(mib: u64) -> GuestRam {
        GuestRam::new(mib << 20).unwrap()
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn missing_kernel() {
        let err = load_kernel(&ram(64), Path::new("/nonexistent/vmlinux"), None).unwrap_err();
        assert!(matches!(err, Error::KernelNotFound(_)), "{err}");
    }

    #[test]
    fn garbage_kernel() {
        let f = file_with(&[0x42; 4096]);
        let err = load_kernel(&ram(64), f.path(), None).unwrap_err();
        assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn empty_and_short_kernels() {
        for len in [0usize, 10] {
            let f = file_with(&vec![0x7f; len]);
            let err = load_kernel(&ram(64), f.path(), None).unwrap_err();
            assert!(err.to_string().contains("too short"), "{err}");
        }
    }

    #[test]
    fn truncated_elf_kernel() {
        // A valid x86-64 ELF header whose program headers are missing.
        let mut hdr = vec![0u8; 64];
        hdr[0..4].copy_from_slice(b"\x7fELF");
        hdr[4] = 2; // 64-bit
        hdr[5] = 1; // little endian
        hdr[18] = 62; // x86-64
        hdr[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // entry
        hdr[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        hdr[54] = 56; // phentsize
        hdr[56] = 3; // phnum
        let f = file_with(&hdr);
        let err = load_kernel(&ram(64), f.path(), None).unwrap_err();
        assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");
    }

    #[test]
    fn directory_as_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_kernel(&ram(64), dir.path(), None).unwrap_err();
        assert!(matches!(err, Error::KernelRead { .. }), "{err}");
    }

    #[test]
    fn initramfs_goes_to_the_top() {
        let r = ram(64);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let f = file_with(&data);
        let (addr, size) = load_initramfs(&r, f.path(), None).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE, 0);
        assert!(addr + size <= 64 << 20);
        assert!(addr + size + PAGE > 64 << 20);
        let mut back = vec![0u8; 10_000];
        r.memory()
            .read_slice(&mut back, GuestAddress(addr))
            .unwrap();
        assert_eq!(back, data);
        // The rest of the last page reads as zeros.
        let mut tail = vec![0xffu8; (3 * PAGE - 10_000) as usize];
        r.memory()
            .read_slice(&mut tail, GuestAddress(addr + 10_000))
            .unwrap();
        assert!(tail.iter().all(|&b| b == 0));

        // Rewriting the file in place prepares a new image: a later VM sees
        // the new bytes, not the cached ones.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let changed: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        std::fs::write(f.path(), &changed).unwrap();
        let r2 = ram(64);
        let (addr2, _) = load_initramfs(&r2, f.path(), None).unwrap();
        r2.memory()
            .read_slice(&mut back, GuestAddress(addr2))
            .unwrap();
        assert_eq!(back, changed);
        check_initramfs_fits(f.path(), (addr, size), 0x200_0000).unwrap();

        // From a store directory, in a process that has no image yet: the
        // stored bytes start a page into the file, the guest sees them at
        // the same address.
        let store = tempfile::tempdir().unwrap();
        INITRAMFS.clear();
        load_initramfs(&ram(64), f.path(), Some(store.path())).unwrap();
        INITRAMFS.clear();
        let r3 = ram(64);
        let (addr3, _) = load_initramfs(&r3, f.path(), Some(store.path())).unwrap();
        assert_eq!(addr3, addr2);
        r3.memory()
            .read_slice(&mut back, GuestAddress(addr3))
            .unwrap();
        assert_eq!(back, changed);
        r3.memory()
            .read_slice(&mut tail, GuestAddress(addr3 + 10_000))
            .unwrap();
        assert!(tail.iter().all(|&b| b == 0));
    }

    #[test]
    fn initramfs_too_large_or_missing() {
        let r = ram(64);
        let f = file_with(&vec![0; 40 << 20]);
        let placed = load_initramfs(&r, f.path(), None).unwrap();
        let err = check_initramfs_fits(f.path(), placed, 30 << 20).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { .. }), "{err}");
        let f = file_with(&vec![0; 70 << 20]);
        let err = load_initramfs(&r, f.path(), None).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { .. }), "{err}");
        let err = load_initramfs(&r, Path::new("/nonexistent.cpio"), None).unwrap_err();
        assert!(matches!(err, Error::InitramfsNotFound(_)), "{err}");
        let empty = file_with(&[]);
        assert!(load_initramfs(&r, empty.path(), None).is_err());
    }

    #[test]
    fn kernel_is_mapped_copy_on_write() {
        // A minimal PVH ELF: one PT_LOAD of 3 pages at 16 MiB, a Xen note.
        let code: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7) as u8).collect();
        let mut f = vec![0u8; 0x1000];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, at: usize, kind: u32, off: u64, addr: u64, size: u64| {
            f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
            f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
            f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
            f[at + 40..at + 48].copy_from_slice(&(size + 4096).to_le_bytes());
        };
        ph(&mut f, 64, 1, 0x1000, 0x100_0000, code.len() as u64);
        ph(&mut f, 120, 4, 0x200, 0, 20);
        f[0x200..0x204].copy_from_slice(&4u32.to_le_bytes());
        f[0x204..0x208].copy_from_slice(&4u32.to_le_bytes());
        f[0x208..0x20c].copy_from_slice(&18u32.to_le_bytes());
        f[0x20c..0x210].copy_from_slice(b"Xen\0");
        f[0x210..0x214].copy_from_slice(&0x100_0040u32.to_le_bytes());
        f.extend_from_slice(&code);
        let file = file_with(&f);

        let r = ram(64);
        let k = load_kernel(&r, file.path(), None).unwrap();
        assert_eq!(k.entry, 0x100_0040);
        assert_eq!(k.end, 0x100_0000 + code.len() as u64 + 4096);
        let mut back = vec![0u8; code.len()];
        r.memory()
            .read_slice(&mut back, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(back, code);
        // The bss page past the segment's file bytes reads as zeros.
        let mut bss = vec![0xffu8; 4096];
        r.memory()
            .read_slice(&mut bss, GuestAddress(0x100_0000 + code.len() as u64))
            .unwrap();
        assert!(bss.iter().all(|&b| b == 0));
        assert_eq!(
            r.private_ranges(),
            vec![(0x100_0000, code.len() as u64 + 4096)]
        );
        // The mapped range is not in the RAM memfd: nothing may write the
        // memfd behind the guest's back there.
        assert_eq!(r.file_offset_of_guest(0x100_0000, 16), None);
        assert_eq!(r.file_offset_of_guest(0x200_0000, 16), Some(0x200_0000));

        // A second VM maps the same prepared image; one VM's writes stay
        // its own.
        let r2 = ram(64);
        assert_eq!(load_kernel(&r2, file.path(), None).unwrap(), k);
        r.memory()
            .write_slice(&[0xaa; 64], GuestAddress(0x100_0000))
            .unwrap();
        r2.memory()
            .read_slice(&mut back, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(back, code);
        let r3 = ram(64);
        load_kernel(&r3, file.path(), None).unwrap();
        r3.memory()
            .read_slice(&mut back, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(back, code);

        // With a store directory, the next process maps the stored image:
        // the same bytes, and the stored file is not written again.
        let store = tempfile::tempdir().unwrap();
        KERNELS.clear();
        let r4 = ram(64);
        assert_eq!(
            load_kernel(&r4, file.path(), Some(store.path())).unwrap(),
            k
        );
        let stored: Vec<_> = std::fs::read_dir(store.path()).unwrap().flatten().collect();
        assert_eq!(stored.len(), 1, "one kernel image stored");
        use std::os::unix::fs::MetadataExt;
        let ino = stored[0].metadata().unwrap().ino();
        KERNELS.clear();
        let r5 = ram(64);
        assert_eq!(
            load_kernel(&r5, file.path(), Some(store.path())).unwrap(),
            k
        );
        r5.memory()
            .read_slice(&mut back, GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(back, code);
        assert_eq!(std::fs::metadata(stored[0].path()).unwrap().ino(), ino);

        // Guest memory too small for the image is refused by name.
        let err = load_kernel(&ram(16), file.path(), None).unwrap_err();
        assert!(err.to_string().contains("beyond guest memory"), "{err}");

        // The same image without its note is refused by name.
        f[0x208..0x20c].copy_from_slice(&17u32.to_le_bytes());
        let file = file_with(&f);
        let err = load_kernel(&r, file.path(), None).unwrap_err();
        assert!(err.to_string().contains("no pvh entry note"), "{err}");
    }

    #[test]
    fn boot_data_lands_where_the_guest_looks() {
        let m = mem(64);
        let cl = cmdline::build(false, &[], "").unwrap();
        write_boot_data(&m, &cl, 1, Some((0x300_0000, 4096))).unwrap();
        let mut buf = vec![0u8; cmdline::BASE.len()];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(buf, cmdline::BASE.as_bytes());
        let mut sig = [0u8; 4];
        m.read_slice(&mut sig, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&sig, b"_MP_");
        let code: u64 = m.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, pvh::GDT[1]);
    }
}
