//! The Intel MultiProcessor table (MP spec 1.4): how Linux, without ACPI,
//! learns the CPUs, the IO-APIC and how ISA interrupts reach it.
//!
//! Without a table the kernel runs in virtual-wire mode (slower timer path,
//! one CPU). A malformed one is worse: the kernel can switch to symmetric
//! I/O without an IO-APIC and never deliver the serial interrupt, so every
//! byte user space prints is lost. Hence the byte-level tests below.

use crate::memory::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_MAX_LEN};

/// IO-APIC input pins (KVM's in-kernel IO-APIC has 24).
pub const IOAPIC_PINS: u8 = 24;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
/// Family 6; the kernel only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX bits the entry advertises: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const SPEC_REV: u8 = 4;

/// Errors of MP table construction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an mp table for {0} vcpus does not fit in the bios area")]
    TooLarge(u8),
    #[error("an mp table needs at least one vcpu")]
    NoCpus,
}

/// The IO-APIC's id: just after the CPUs' local APIC ids.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// Builds the floating pointer followed by the configuration table, to be
/// written at guest physical `addr` (the pointer's address field refers to
/// the table at `addr + 16`).
pub fn build(addr: u64, vcpus: u8) -> Result<Vec<u8>, Error> {
    if vcpus == 0 {
        return Err(Error::NoCpus);
    }
    let entries = vcpus as usize + 2 + IOAPIC_PINS as usize + 2;
    let table_len =
        HEADER_LEN + PROCESSOR_LEN * vcpus as usize + ENTRY_LEN * (entries - vcpus as usize);
    if FLOATING_LEN + table_len > MPTABLE_MAX_LEN || vcpus == u8::MAX {
        return Err(Error::TooLarge(vcpus));
    }
    let table_addr =
        u32::try_from(addr + FLOATING_LEN as u64).map_err(|_| Error::TooLarge(vcpus))?;

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);

    // Floating pointer structure.
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a table is present, no IMCR
    out[10] = checksum(&out[..FLOATING_LEN]);

    // Configuration table header.
    let hdr = out.len();
    out.extend_from_slice(b"PCMP");
    out.extend_from_slice(&(table_len as u16).to_le_bytes());
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(b"SMOL    "); // OEM id
    out.extend_from_slice(b"SMOLVMM     "); // product id
    out.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    out.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    out.extend_from_slice(&(entries as u16).to_le_bytes());
    out.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    out.push(0); // extended table checksum
    out.push(0);

    for cpu in 0..vcpus {
        out.push(ENTRY_PROCESSOR);
        out.push(cpu); // local APIC id
        out.push(LAPIC_VERSION);
        out.push(CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 });
        out.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        out.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
    }

    // One ISA bus: every interrupt source below is an ISA IRQ.
    out.push(ENTRY_BUS);
    out.push(0);
    out.extend_from_slice(b"ISA   ");

    let ioapic = ioapic_id(vcpus);
    out.push(ENTRY_IOAPIC);
    out.push(ioapic);
    out.push(IOAPIC_VERSION);
    out.push(IOAPIC_ENABLED);
    out.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());

    // ISA IRQ n goes to IO-APIC pin n, as KVM's default GSI routing does;
    // flags 0 = bus-default polarity and trigger (ISA: active high, edge).
    for irq in 0..IOAPIC_PINS {
        out.push(ENTRY_IO_INTERRUPT);
        out.push(INT_TYPE_INT);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.push(0); // source bus
        out.push(irq);
        out.push(ioapic);
        out.push(irq);
    }

    // LINT0 takes the legacy PIC (ExtINT), LINT1 NMI, on every CPU.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        out.push(ENTRY_LOCAL_INTERRUPT);
        out.push(kind);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.push(0);
        out.push(0);
        out.push(0xff); // all local APICs
        out.push(lint);
    }

    debug_assert_eq!(out.len(), FLOATING_LEN + table_len);
    out[hdr + 7] = checksum(&out[hdr..]);
    Ok(out)
}

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MPTABLE_ADDR;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn floating_pointer_is_valid() {
        let t = build(MPTABLE_ADDR, 1).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(u32_at(&t, 4) as u64, MPTABLE_ADDR + 16);
        assert_eq!(t[8], 1);
        assert_eq!(t[9], 4);
        assert_eq!(sum(&t[..16]), 0);
        // Linux looks for the pointer on a 16-byte boundary.
        assert_eq!(MPTABLE_ADDR % 16, 0);
    }

    #[test]
    fn table_header_and_checksum() {
        for vcpus in [1u8, 2, 8, 64, 254] {
            let t = build(MPTABLE_ADDR, vcpus).unwrap();
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            assert_eq!(u16_at(table, 4) as usize, table.len());
            assert_eq!(table[6], 4);
            assert_eq!(sum(table), 0, "checksum for {vcpus} vcpus");
            assert_eq!(u16_at(table, 34) as usize, vcpus as usize + 2 + 24 + 2);
            assert_eq!(u32_at(table, 36) as u64, LAPIC_ADDR);
        }
    }

    #[test]
    fn entries_describe_cpus_bus_ioapic_and_irqs() {
        let vcpus = 2;
        let t = build(MPTABLE_ADDR, vcpus).unwrap();
        let table = &t[16..];
        let mut off = HEADER_LEN;
        for cpu in 0..vcpus {
            let e = &table[off..off + PROCESSOR_LEN];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1], cpu);
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOT_PROCESSOR != 0, cpu == 0);
            off += PROCESSOR_LEN;
        }
        assert_eq!(&table[off..off + 8], b"\x01\x00ISA   ");
        off += 8;
        let ioapic = &table[off..off + 8];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], vcpus);
        assert_eq!(ioapic[3], IOAPIC_ENABLED);
        assert_eq!(u32_at(ioapic, 4) as u64, IOAPIC_ADDR);
        off += 8;
        for irq in 0..24u8 {
            let e = &table[off..off + 8];
            assert_eq!(
                e,
                &[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, vcpus, irq]
            );
            off += 8;
        }
        assert_eq!(
            &table[off..off + 8],
            &[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]
        );
        assert_eq!(
            &table[off + 8..off + 16],
            &[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]
        );
        assert_eq!(off + 16, table.len());
    }

    #[test]
    fn zero_or_too_many_cpus_are_errors() {
        assert!(matches!(build(MPTABLE_ADDR, 0), Err(Error::NoCpus)));
        assert!(matches!(
            build(MPTABLE_ADDR, 255),
            Err(Error::TooLarge(255))
        ));
    }
}
