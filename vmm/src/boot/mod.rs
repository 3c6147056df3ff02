//! Putting a kernel, its initramfs and the boot data into guest memory.

pub mod cmdline;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemory;
use crate::memory::{
    e820_map, low_ram_end, CMDLINE_ADDR, GDT_ADDR, HIGH_MEMORY_START, MPTABLE_ADDR,
};

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

/// Loads the `vmlinux` at `path` at its ELF physical addresses and finds
/// its PVH entry note.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, Error> {
    let mut file = open(
        path,
        || Error::KernelNotFound(path.to_path_buf()),
        |source| Error::KernelRead {
            path: path.to_path_buf(),
            source,
        },
    )?;
    let invalid = |reason: String| Error::KernelInvalid {
        path: path.to_path_buf(),
        reason,
    };
    check_elf_header(&mut file).map_err(invalid)?;

    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|e| invalid(describe_loader_error(&e)))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => {
            return Err(invalid(
                "no pvh entry note (build with CONFIG_PVH=y)".into(),
            ))
        }
    };
    if loaded.kernel_end > low_ram_end(mem_size(mem)) {
        return Err(invalid(format!(
            "its image ends at {:#x}, beyond guest memory",
            loaded.kernel_end
        )));
    }
    Ok(LoadedKernel {
        entry,
        end: loaded.kernel_end,
    })
}

/// Loads the initramfs at the top of memory below 4 GiB, page aligned and
/// above the kernel. Returns `(address, size)`.
pub fn load_initramfs(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), Error> {
    let mut file = open(
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
    let size = file.metadata().map_err(read_err)?.len();
    let top = low_ram_end(mem_size(mem));
    let floor = kernel_end.div_ceil(PAGE) * PAGE;
    let addr = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    let addr = match addr {
        Some(a) if a >= floor && size > 0 => a,
        _ => {
            return Err(Error::InitramfsTooLarge {
                path: path.to_path_buf(),
                size,
            })
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|_| {
            read_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file changed while loading",
            ))
        })?;
    Ok((addr, size))
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

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn missing_kernel() {
        let err = load_kernel(&mem(64), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, Error::KernelNotFound(_)), "{err}");
    }

    #[test]
    fn garbage_kernel() {
        let f = file_with(&[0x42; 4096]);
        let err = load_kernel(&mem(64), f.path()).unwrap_err();
        assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");
        assert!(err.to_string().contains("bad magic"), "{err}");
    }

    #[test]
    fn empty_and_short_kernels() {
        for len in [0usize, 10] {
            let f = file_with(&vec![0x7f; len]);
            let err = load_kernel(&mem(64), f.path()).unwrap_err();
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
        let err = load_kernel(&mem(64), f.path()).unwrap_err();
        assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");
    }

    #[test]
    fn directory_as_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_kernel(&mem(64), dir.path()).unwrap_err();
        assert!(matches!(err, Error::KernelRead { .. }), "{err}");
    }

    #[test]
    fn initramfs_goes_to_the_top() {
        let m = mem(64);
        let data = vec![0x5a; 10_000];
        let f = file_with(&data);
        let (addr, size) = load_initramfs(&m, f.path(), 0x200_0000).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % PAGE, 0);
        assert!(addr + size <= 64 << 20);
        assert!(addr + size + PAGE > 64 << 20);
        let mut back = vec![0u8; 10_000];
        m.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn initramfs_too_large_or_missing() {
        let m = mem(64);
        let f = file_with(&vec![0; 40 << 20]);
        let err = load_initramfs(&m, f.path(), 30 << 20).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { .. }), "{err}");
        let err = load_initramfs(&m, Path::new("/nonexistent.cpio"), 0).unwrap_err();
        assert!(matches!(err, Error::InitramfsNotFound(_)), "{err}");
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
