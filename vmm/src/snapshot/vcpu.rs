//! One vCPU's architectural state: what Firecracker saves on x86, saved on
//! the vCPU's own thread while it is parked outside `KVM_RUN`, and restored
//! on a fresh vCPU before its thread starts.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::Error;

/// `MSR_IA32_TSC_DEADLINE`: restored after the TSC, or the deadline is
/// taken against the old TSC value.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs per `KVM_GET_MSRS` / `KVM_SET_MSRS` call.
const MSR_CHUNK: usize = 64;

/// What a vCPU is at a snapshot.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs to save: KVM's list, with the TSC deadline moved after the TSC.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    static LIST: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l.clone());
    }
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| Error::Kvm {
            op: "KVM_GET_MSR_INDEX_LIST",
            source,
        })?
        .as_slice()
        .to_vec();
    Ok(LIST.get_or_init(|| order_msrs(list)).clone())
}

/// TSC before TSC_DEADLINE, which goes last.
fn order_msrs(mut list: Vec<u32>) -> Vec<u32> {
    let had_deadline = list.contains(&MSR_IA32_TSC_DEADLINE);
    list.retain(|&i| i != MSR_IA32_TSC_DEADLINE);
    if had_deadline {
        list.push(MSR_IA32_TSC_DEADLINE);
    }
    list
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Reads the MSRs of `indices` that this vCPU reports; KVM stops a batch
/// at the first one it cannot read, which is skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Corrupt {
            what: "msr list".into(),
            reason: format!("{e:?}"),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the one that stopped the batch (if any).
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Saves the state of a vCPU that is outside `KVM_RUN` with no I/O
/// pending (it returned EINTR).
pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().ok();
    let debug_regs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
    })
}

/// Restores `state` into a vCPU that has never run, in Firecracker's
/// order: CPUID, MP state, registers, FPU/vector state, debug registers,
/// LAPIC, MSRs (TSC before its deadline), pending events last.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| Error::Corrupt {
        what: "vcpu cpuid".into(),
        reason: format!("{e:?}"),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB region), the
    // size KVM_GET_XSAVE filled in on a host with the same CPUID
    // (checked before restore), so KVM reads only inside it.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| Error::Corrupt {
            what: "vcpu msrs".into(),
            reason: format!("{e:?}"),
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", chunk[n].index),
                "msr not accepted on restore"
            );
        }
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// CPUID feature registers a restored guest may rely on: (leaf, subleaf,
/// register index eax=0..edx=3, bits that vary at run time or are ours).
const FEATURE_REGS: &[(u32, u32, usize, u32)] = &[
    // Leaf 1 ECX without OSXSAVE (27, follows CR4) and the hypervisor bit
    // (31, ours); EDX without HTT (28, ours).
    (1, 0, 2, !((1 << 27) | (1 << 31))),
    (1, 0, 3, !(1 << 28)),
    (7, 0, 1, !0),
    (7, 0, 2, !0),
    (7, 0, 3, !0),
    (0x8000_0001, 0, 2, !0),
    (0x8000_0001, 0, 3, !0),
];

/// What this host offers a guest, for [`missing_features`]: KVM's
/// supported CPUID, with the bits of the host's own CPUID added (on kvm_pvm
/// hosts guest user space runs on the host CPU, and KVM_GET_CPUID2 reports
/// the host's leaves whatever the monitor set).
pub fn host_features(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut out = supported.to_vec();
    for &(leaf, sub, _, _) in FEATURE_REGS {
        // CPUID exists on every x86_64 CPU; a leaf above the maximum
        // returns the top leaf's values, which only widens what we accept.
        let r = std::arch::x86_64::__cpuid_count(leaf, sub);
        match out
            .iter_mut()
            .find(|e| e.function == leaf && e.index == sub)
        {
            Some(e) => {
                e.eax |= r.eax;
                e.ebx |= r.ebx;
                e.ecx |= r.ecx;
                e.edx |= r.edx;
            }
            None => out.push(kvm_cpuid_entry2 {
                function: leaf,
                index: sub,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            }),
        }
    }
    out
}

fn reg(e: &kvm_cpuid_entry2, index: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][index]
}

/// The first CPU feature the snapshot's CPUID has and `host` lacks, as
/// (leaf, register name, missing bits).
pub fn missing_features(
    saved: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Option<(u32, &'static str, u32)> {
    for &(leaf, sub, index, mask) in FEATURE_REGS {
        let find = |list: &[kvm_cpuid_entry2]| {
            list.iter()
                .find(|e| e.function == leaf && e.index == sub)
                .map(|e| reg(e, index))
        };
        let Some(want) = find(saved) else { continue };
        let have = find(host).unwrap_or(0);
        let missing = want & !have & mask;
        if missing != 0 {
            return Some((leaf, ["eax", "ebx", "ecx", "edx"][index], missing));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_deadline_goes_after_the_tsc() {
        assert_eq!(
            order_msrs(vec![0x6e0, 0x10, 0x174]),
            vec![0x10, 0x174, 0x6e0]
        );
        assert_eq!(order_msrs(vec![0x174, 0x10]), vec![0x174, 0x10]);
    }

    #[test]
    fn features_the_host_lacks_are_found() {
        let e = |function, ecx, edx| kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        };
        let host = [e(1, 0b0110, 0), e(7, 0, 0)];
        assert_eq!(missing_features(&[e(1, 0b0010, 0)], &host), None);
        assert_eq!(
            missing_features(&[e(1, 0b1010, 0)], &host),
            Some((1, "ecx", 0b1000))
        );
        // Run-time and monitor-owned bits do not count.
        assert_eq!(
            missing_features(&[e(1, (1 << 27) | (1 << 31), 1 << 28)], &host),
            None
        );
        assert_eq!(
            missing_features(&[e(7, 0, 1 << 4)], &host),
            Some((7, "edx", 1 << 4))
        );
    }
}
