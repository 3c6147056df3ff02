//! The kernel command line the monitor builds.

use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use crate::memory::CMDLINE_MAX_LEN;

/// What every guest gets: serial console, `reboot=k` (the i8042 reset
/// port is the shutdown signal), reboot at once on panic, and the agent as
/// init from the initramfs. (Our kernel has neither PCI nor modules; a
/// `pci=off` or `nomodule` here would only reach init as stray arguments.)
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1 rdinit=/init";

/// Boot flags a guest needs on a kvm_pvm host (see shared/HOST.md): mask
/// the instructions the module's emulator lacks, skip the slow legacy ptys,
/// and enable the three workarounds of our kernel patch. (`ptp_kvm`, which
/// spins there, is simply not built: `initcall_blacklist=` would need
/// KALLSYMS.)
///
/// Beyond HOST.md's list:
/// - The local APIC timer does not fire under kvm_pvm. With the
///   TSC-deadline bit visible (our CPUID passes KVM's supported set; qemu's
///   default CPU model hides it) Linux skips the PIT and the guest stalls
///   with no tick at all, so the bit is cleared and the APIC timer left
///   off: the PIT drives the tick, and the ~1 s calibration that would fail
///   anyway is skipped.
/// - `erms` and `fsrm` are cleared so that the kernel's out-of-line
///   memcpy, memset, clear_page and user copies use `rep movsq`/`rep stosq`
///   rather than byte-wise `rep movsb`/`rep stosb`: the emulator pays ~3 us
///   per string iteration. (Clearing `rep_good` too, for the unrolled
///   forms, was faster still, but is left out until the zeroed 16-byte runs
///   that tests/machine.rs describes are understood: they showed with and
///   without it.) The agent's own start-up (fresh pages) went from 27.7 s to 2.3 s.
/// - `GLIBC_TUNABLES=...`, which the kernel hands to init's environment and
///   the agent to every program: under `noxsave` the guest kernel saves
///   only the SSE state at a task switch, but user space runs on the real
///   CPU, whose CPUID and XGETBV say AVX is usable (kvm_pvm does not load a
///   guest XCR0 there; a guest-side CR4.OSXSAVE with XCR0 = x87|SSE was
///   tried and XGETBV still read 0x7). glibc's AVX2 memcpy then lost the
///   upper YMM halves whenever another task ran between its loads and
///   stores (another task's VZEROUPPER): 16 zero bytes at offsets 16 and
///   48 of a 4 KiB chunk of exec output, in most 1 MiB streams. The
///   tunables keep glibc's string functions on SSE. Programs that pick AVX
///   themselves (Go's runtime, numeric libraries) stay exposed on these
///   hosts only (README, "Hosts with kvm_pvm").
pub const KVM_PVM_FLAGS: &str =
    "noxsave clearcpuid=popcnt,smap,tsc_deadline_timer,erms,fsrm noapictimer \
    pty.legacy_count=0 no_int3_selftest fpu_no_fwait syscall_via_pf \
    GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX_Fast_Unaligned_Load,-AVX,-AVX2,-AVX512F,-AVX512VL,-FMA";

/// Console verbosity: KERN_NOTICE and more urgent only. The banner
/// ("Linux version ...") is a notice, so it still reaches the console log,
/// while the hundreds of informational lines (each byte one exit to the
/// monitor) do not.
pub const LOGLEVEL: &str = "loglevel=6";

/// A virtio-mmio device window announced to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Errors of command line construction.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("command line is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("command line has a character that is not printable ascii: {0:?}")]
    InvalidChar(String),
    #[error("command line rejected: {0}")]
    Rejected(String),
}

/// Builds the guest command line: [`BASE`], the kvm_pvm flags when `kvm_pvm`,
/// [`LOGLEVEL`], one `virtio_mmio.device=` per slot, then `extra`.
pub fn build(kvm_pvm: bool, slots: &[MmioSlot], extra: &str) -> Result<Cmdline, Error> {
    if let Some(c) = extra.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(Error::InvalidChar(c.to_string()));
    }
    let mut cmdline = Cmdline::new(CMDLINE_MAX_LEN).map_err(map_err)?;
    cmdline.insert_str(BASE).map_err(map_err)?;
    if kvm_pvm {
        cmdline.insert_str(KVM_PVM_FLAGS).map_err(map_err)?;
    }
    cmdline.insert_str(LOGLEVEL).map_err(map_err)?;
    for slot in slots {
        cmdline
            .add_virtio_mmio_device(slot.size, GuestAddress(slot.base), slot.irq, None)
            .map_err(map_err)?;
    }
    if !extra.trim().is_empty() {
        cmdline.insert_str(extra).map_err(map_err)?;
    }
    Ok(cmdline)
}

fn map_err(e: linux_loader::cmdline::Error) -> Error {
    match e {
        linux_loader::cmdline::Error::TooLarge => Error::TooLong {
            max: CMDLINE_MAX_LEN - 1,
        },
        other => Error::Rejected(other.to_string().to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn base_only() {
        let c = build(false, &[], "").unwrap();
        assert_eq!(text(&c), format!("{BASE} {LOGLEVEL}"));
    }

    #[test]
    fn kvm_pvm_flags_and_devices_and_extra() {
        let slots = [
            MmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioSlot {
                base: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let c = build(true, &slots, "quiet foo=bar").unwrap();
        let s = text(&c);
        assert!(s.starts_with(BASE));
        assert!(s.contains(
            "noxsave clearcpuid=popcnt,smap,tsc_deadline_timer,erms,fsrm noapictimer \
             pty.legacy_count=0 no_int3_selftest fpu_no_fwait syscall_via_pf \
             GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX_Fast_Unaligned_Load,-AVX,-AVX2,-AVX512F,-AVX512VL,-FMA"
        ));
        assert!(s.contains("virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"));
        assert!(s.ends_with(" quiet foo=bar"));
    }

    #[test]
    fn no_pvm_flags_on_real_kvm() {
        let s = text(&build(false, &[], "").unwrap());
        assert!(!s.contains("syscall_via_pf"));
    }

    #[test]
    fn too_long_is_an_error() {
        let extra = "x".repeat(CMDLINE_MAX_LEN);
        assert!(matches!(
            build(false, &[], &extra),
            Err(Error::TooLong { .. })
        ));
    }

    #[test]
    fn control_characters_are_refused() {
        assert!(matches!(
            build(false, &[], "a\nb"),
            Err(Error::InvalidChar(_))
        ));
        assert!(matches!(
            build(false, &[], "caf\u{e9}"),
            Err(Error::InvalidChar(_))
        ));
    }
}
