//! The kvm-clock value a snapshot resumes from.
//!
//! `KVM_GET_CLOCK` gives KVM's own idea of the guest clock. Unless KVM
//! vouches for it (`KVM_CLOCK_TSC_STABLE`), that idea can differ from what
//! the guest itself last read: the guest extrapolates its pvclock page with
//! its TSC, KVM from the host's clock. Linux never lets its clock go back,
//! so a restore that starts behind the guest's last reading freezes the
//! restored guest's clock (and every timer, `sleep` included) until it has
//! caught up. QEMU reads the guest's pvclock page for the same reason. We
//! resume from the later of the two values: never behind the guest's own
//! reading, never behind KVM's.

use kvm_bindings::kvm_msr_entry;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemory;

pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_KVM_SYSTEM_TIME_NEW`: the guest-physical address of this vCPU's
/// pvclock page, bit 0 = enabled.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `KVM_CLOCK_TSC_STABLE` in `kvm_clock_data.flags`.
pub const KVM_CLOCK_TSC_STABLE: u32 = 2;

/// `struct pvclock_vcpu_time_info`, 32 bytes.
const PVCLOCK_SIZE: usize = 32;

/// The guest time (ns) a pvclock page `raw` gives at guest TSC `tsc`, as
/// the guest computes it; `None` for a page being updated (odd version).
/// Every field is the guest's: the arithmetic cannot overflow or panic.
pub fn pvclock_read(raw: &[u8; PVCLOCK_SIZE], tsc: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap_or_default());
    let version = u32_at(0);
    if version & 1 == 1 {
        return None;
    }
    let tsc_timestamp = u64_at(8);
    let system_time = u64_at(16);
    let mul = u32_at(24) as u128;
    let shift = raw[28] as i8;
    let mut delta = tsc.saturating_sub(tsc_timestamp);
    delta = if shift < 0 {
        delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0)
    } else {
        // A left shift that loses bits is a page no kernel writes.
        let s = shift as u32;
        if s >= 64 || delta.leading_zeros() < s {
            return None;
        }
        delta << s
    };
    let ns = ((delta as u128 * mul) >> 32) as u64;
    system_time.checked_add(ns)
}

/// What the guest's clock read on one vCPU at its pause, from the vCPU's
/// saved MSRs (its TSC and pvclock address) and guest memory.
pub fn guest_reading(mem: &GuestMemory, msrs: &[kvm_msr_entry]) -> Option<u64> {
    let msr = |index: u32| msrs.iter().find(|m| m.index == index).map(|m| m.data);
    let tsc = msr(MSR_IA32_TSC)?;
    let system_time = msr(MSR_KVM_SYSTEM_TIME_NEW)?;
    if system_time & 1 == 0 {
        return None;
    }
    let mut raw = [0u8; PVCLOCK_SIZE];
    // An address outside guest memory is the guest's mistake: no reading.
    mem.read_slice(&mut raw, GuestAddress(system_time & !1))
        .ok()?;
    pvclock_read(&raw, tsc)
}

/// The clock to resume from: KVM's, or the latest vCPU reading if that is
/// later (see the module documentation).
pub fn resume_from(kvm_clock: u64, readings: impl IntoIterator<Item = Option<u64>>) -> u64 {
    readings.into_iter().flatten().fold(kvm_clock, u64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(version: u32, tsc_ts: u64, system_time: u64, mul: u32, shift: i8) -> [u8; 32] {
        let mut p = [0u8; 32];
        p[0..4].copy_from_slice(&version.to_le_bytes());
        p[8..16].copy_from_slice(&tsc_ts.to_le_bytes());
        p[16..24].copy_from_slice(&system_time.to_le_bytes());
        p[24..28].copy_from_slice(&mul.to_le_bytes());
        p[28] = shift as u8;
        p
    }

    #[test]
    fn reads_like_the_guest() {
        // The values of a snapshot taken on a kvm_pvm host: a 2.6 GHz TSC
        // (mul 3308756133, shift -1), 58.0987 s at the page's timestamp.
        let p = page(10, 9_250_995_488_292, 58_098_737_293, 3_308_756_133, -1);
        let ns = pvclock_read(&p, 9_262_508_293_493).unwrap();
        assert_eq!(ns / 1_000_000, 62_533);
        // At the timestamp itself: the system time; before it: no going back.
        assert_eq!(pvclock_read(&p, 9_250_995_488_292), Some(58_098_737_293));
        assert_eq!(pvclock_read(&p, 0), Some(58_098_737_293));
    }

    #[test]
    fn hostile_pages_give_no_reading_or_a_bounded_one() {
        assert_eq!(pvclock_read(&page(3, 0, 5, 1, 0), 10), None, "odd version");
        assert_eq!(pvclock_read(&page(2, 0, 0, u32::MAX, 63), 10), None);
        assert_eq!(
            pvclock_read(&page(2, 0, u64::MAX, u32::MAX, 0), u64::MAX),
            None
        );
        assert_eq!(
            pvclock_read(&page(2, 0, 0, u32::MAX, -128), u64::MAX),
            Some(0)
        );
        for shift in [-128i8, -64, -1, 0, 1, 31, 127] {
            let _ = pvclock_read(&page(0, 7, 9, u32::MAX, shift), u64::MAX);
        }
    }

    #[test]
    fn resumes_from_the_later_clock() {
        assert_eq!(resume_from(100, [None, Some(90)]), 100);
        assert_eq!(resume_from(100, [Some(130), Some(120)]), 130);
        assert_eq!(resume_from(100, []), 100);
    }
}
