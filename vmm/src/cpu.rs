//! Architectural state of a vCPU at the PVH entry: CPUID, MSRs, registers,
//! FPU and local APIC.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::pvh::{self, CODE_SELECTOR_INDEX, DATA_SELECTOR_INDEX, TSS_SELECTOR_INDEX};
use crate::memory::{GDT_ADDR, PVH_INFO_ADDR};

/// Errors of vCPU configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kvm cannot report its supported cpuid")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("vcpu {id}: {op} failed")]
    Vcpu {
        id: u8,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF_80000007_EDX_INVARIANT_TSC: u32 = 1 << 8;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without it the kernel treats
/// all of RAM as uncached on real KVM.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// KVM's supported CPUID set. It cannot change while the module is
/// loaded, so it is read once per process (the ioctl costs ~0.4 ms on
/// kvm_pvm hosts, a fifth of the set-up budget).
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, Error> {
    static SUPPORTED: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::SupportedCpuid)?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`: APIC ids and
/// topology (one thread per core, `count` cores in one package), the
/// hypervisor bit, and on kvm_pvm hosts no invariant TSC, so the guest
/// stays on kvm-clock.
pub fn adjust_cpuid(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8, kvm_pvm: bool) {
    let count = count.max(1) as u32;
    let id = id as u32;
    // Bits needed to number the cores of the package.
    let core_bits = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count.min(255) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 in 31:26, threads sharing the cache - 1 in 25:14.
                let cores = (1u32 << core_bits).min(64) - 1;
                e.eax = (e.eax & 0x3fff) | (cores << 26);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        // Core level: every vCPU of the package.
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0007 if kvm_pvm => {
                e.edx &= !LEAF_80000007_EDX_INVARIANT_TSC;
            }
            _ => {}
        }
    }
}

/// The MSRs set at entry.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
}

/// Sets LINT0 to ExtINT (the legacy PIC) and LINT1 to NMI.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    let set = |lapic: &mut kvm_lapic_state, off: usize, mode: u32| {
        let v = read_lapic(lapic, off);
        write_lapic(lapic, off, (v & !0x700) | (mode << 8));
    };
    set(lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set(lapic, APIC_LVT1, APIC_MODE_NMI);
}

fn read_lapic(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn write_lapic(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *b as _;
    }
}

/// Configures vCPU `id` for the PVH entry at `entry`.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    supported: &CpuId,
    entry: u64,
    kvm_pvm: bool,
) -> Result<(), Error> {
    let fail = |op| move |source| Error::Vcpu { id, op, source };

    let mut cpuid = supported.clone();
    adjust_cpuid(cpuid.as_mut_slice(), id, count, kvm_pvm);
    vcpu.set_cpuid2(&cpuid).map_err(fail("KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&boot_msrs()).expect("the boot msr list fits a kvm_msrs");
    let set = vcpu.set_msrs(&msrs).map_err(fail("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        // kvm_pvm refuses some; Linux sets what it needs itself.
        tracing::debug!(
            vcpu = id,
            set,
            wanted = msrs.as_slice().len(),
            "not every boot msr was accepted"
        );
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(fail("KVM_SET_FPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
    let code = pvh::segment(pvh::GDT[CODE_SELECTOR_INDEX as usize], CODE_SELECTOR_INDEX);
    let data = pvh::segment(pvh::GDT[DATA_SELECTOR_INDEX as usize], DATA_SELECTOR_INDEX);
    let tss = pvh::segment(pvh::GDT[TSS_SELECTOR_INDEX as usize], TSS_SELECTOR_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (pvh::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(fail("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: PVH_INFO_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(fail("KVM_SET_REGS"))?;

    let mut lapic = vcpu.get_lapic().map_err(fail("KVM_GET_LAPIC"))?;
    set_lint_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(fail("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            edx: 1 << 8,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut e = [entry(1, 0)];
        adjust_cpuid(&mut e, 3, 4, false);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "clflush size kept");
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);

        let mut e = [entry(1, 0)];
        adjust_cpuid(&mut e, 0, 1, false);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf() {
        let mut e = [entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        adjust_cpuid(&mut e, 2, 3, false);
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx, e[0].edx), (0, 1, 0x100, 2));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (2, 3, 0x201, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (0, 0, 2, 2));
    }

    #[test]
    fn invariant_tsc_hidden_only_on_kvm_pvm() {
        let mut e = [entry(0x8000_0007, 0)];
        adjust_cpuid(&mut e, 0, 1, false);
        assert_ne!(e[0].edx & LEAF_80000007_EDX_INVARIANT_TSC, 0);
        adjust_cpuid(&mut e, 0, 1, true);
        assert_eq!(e[0].edx & LEAF_80000007_EDX_INVARIANT_TSC, 0);
    }

    #[test]
    fn lint_modes() {
        let mut lapic = kvm_lapic_state::default();
        write_lapic(&mut lapic, APIC_LVT0, 0x1_0700);
        set_lint_modes(&mut lapic);
        assert_eq!(read_lapic(&lapic, APIC_LVT0), 0x1_0700);
        assert_eq!(read_lapic(&lapic, APIC_LVT1), 0x400);
    }

    #[test]
    fn msrs_fit() {
        assert!(Msrs::from_entries(&boot_msrs()).is_ok());
    }
}
