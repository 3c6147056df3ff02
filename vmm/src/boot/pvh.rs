//! PVH boot: the `hvm_start_info` block and the flat 32-bit segments the
//! kernel's PVH entry point expects.
//!
//! Entry state (xen/include/public/arch-x86/hvm/start_info.h and the PVH
//! boot ABI): protected mode without paging, CS a flat 32-bit code segment,
//! DS/ES/SS flat data, RBX the physical address of `hvm_start_info`.

use kvm_bindings::kvm_segment;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use crate::devices::virtio::GuestMemory;
use crate::memory::{
    E820Entry, CMDLINE_ADDR, MEMMAP_ADDR, MEMMAP_MAX_ENTRIES, PVH_INFO_ADDR, PVH_MODLIST_ADDR,
};

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// Version 1 carries the memory map.
pub const START_VERSION: u32 = 1;

/// The boot GDT: null, flat 32-bit code, flat 32-bit data, a TSS.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];
pub const CODE_SELECTOR_INDEX: u8 = 1;
pub const DATA_SELECTOR_INDEX: u8 = 2;
pub const TSS_SELECTOR_INDEX: u8 = 3;

/// Errors of writing the PVH boot block.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memory map has {0} entries, room for {MEMMAP_MAX_ENTRIES}")]
    MemmapTooLong(usize),
    #[error("cannot write the pvh start info: {0}")]
    Write(String),
}

/// Encodes a GDT descriptor from access/flags bits (`0xF0FF` layout: high
/// nibble granularity/size, low byte present/dpl/type), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM view of GDT entry `index`.
pub fn segment(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The start info, memory map and module list for a guest with memory map
/// `e820` and an optional initramfs `(address, size)`.
pub fn boot_params(e820: &[E820Entry], initramfs: Option<(u64, u64)>) -> Result<BootParams, Error> {
    if e820.len() > MEMMAP_MAX_ENTRIES {
        return Err(Error::MemmapTooLong(e820.len()));
    }
    let info = hvm_start_info {
        magic: START_MAGIC,
        version: START_VERSION,
        flags: 0,
        nr_modules: initramfs.is_some() as u32,
        modlist_paddr: if initramfs.is_some() {
            PVH_MODLIST_ADDR
        } else {
            0
        },
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: 0,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        reserved: 0,
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if let Some((paddr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    Ok(params)
}

/// Writes the start info, memory map and module list into guest memory.
pub fn write(mem: &GuestMemory, params: &BootParams) -> Result<(), Error> {
    PvhBootConfigurator::write_bootparams(params, mem).map_err(|e| Error::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{e820_map, E820_RAM};
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs = segment(GDT[1], CODE_SELECTOR_INDEX);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x08));
        assert_eq!(
            (cs.type_, cs.present, cs.s, cs.db, cs.g, cs.l),
            (0xb, 1, 1, 1, 1, 0)
        );
        let ds = segment(GDT[2], DATA_SELECTOR_INDEX);
        assert_eq!(
            (ds.base, ds.limit, ds.selector, ds.type_),
            (0, 0xffff_ffff, 0x10, 0x3)
        );
        let tr = segment(GDT[3], TSS_SELECTOR_INDEX);
        assert_eq!(
            (tr.limit, tr.selector, tr.type_, tr.s, tr.g),
            (0x67, 0x18, 0xb, 0, 0)
        );
        assert_eq!(segment(GDT[0], 0).unusable, 1);
    }

    #[test]
    fn known_gdt_encodings() {
        // The canonical flat descriptors.
        assert_eq!(GDT[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT[3], 0x0000_8b00_0000_0067);
    }

    #[test]
    fn start_info_in_guest_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e820 = e820_map(64 * MIB);
        let params = boot_params(&e820, Some((0x300_0000, 0x1234))).unwrap();
        write(&mem, &params).unwrap();

        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_ADDR);
        assert_eq!(info.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(info.memmap_paddr, MEMMAP_ADDR);
        assert_eq!(info.memmap_entries as usize, e820.len());

        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));

        for (i, e) in e820.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(MEMMAP_ADDR + 24 * i as u64))
                .unwrap();
            assert_eq!((got.addr, got.size, got.type_), (e.addr, e.size, e.kind));
        }
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(MEMMAP_ADDR + 24 * (e820.len() as u64 - 1)))
            .unwrap();
        assert_eq!(last.type_, E820_RAM);
        assert_eq!(last.addr + last.size, 64 * MIB);
    }

    #[test]
    fn no_initramfs_no_module() {
        let params = boot_params(&e820_map(64 * MIB), None).unwrap();
        assert!(params.modules.is_none());
        let info = &params.header;
        // nr_modules is the fourth u32.
        assert_eq!(&info[12..16], &[0, 0, 0, 0]);
    }

    #[test]
    fn overlong_memmap_is_an_error() {
        let e820 = vec![
            E820Entry {
                addr: 0,
                size: 4096,
                kind: E820_RAM
            };
            MEMMAP_MAX_ENTRIES + 1
        ];
        assert!(matches!(
            boot_params(&e820, None),
            Err(Error::MemmapTooLong(_))
        ));
    }
}
