//! The VM-wide KVM state: PIT, kvm-clock, the two PICs and the IO-APIC.
//! Saved while every vCPU is parked; restored after every vCPU's own
//! state (its LAPIC above all) and before any vCPU runs.
//!
//! The order matters because `KVM_SET_PIT2` re-arms the PIT: channel 0
//! fires its saved count (a few ms) after the call, whatever else is
//! still being restored. A tick delivered to a LAPIC that
//! `KVM_SET_LAPIC` then overwrote, or to an IO-APIC not yet restored, is
//! lost; our guests (no LAPIC timer on kvm_pvm) run the PIT one-shot and
//! wait for that tick before they program the next, so their timers
//! stopped for good. QEMU, too, loads the PIT last, as the VM starts.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::Error;

#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

pub fn save(vm: &VmFd) -> Result<VmState, Error> {
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    tracing::debug!(
        flags = clock.flags,
        tsc_stable = clock.flags & super::kvmclock::KVM_CLOCK_TSC_STABLE != 0,
        "KVM_GET_CLOCK"
    );
    // KVM_SET_CLOCK takes no TSC_STABLE/REALTIME flags from us: the guest
    // clock resumes where it stopped and the agent steps the wall clock.
    clock.flags = 0;
    Ok(VmState {
        pit,
        clock,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Restores the interrupt controllers, then the PIT, then the clock, into
/// a VM whose vCPUs have their state back (module comment: why last).
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), Error> {
    let chips = [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (chip, id) in chips {
        if chip.chip_id != id {
            return Err(Error::Corrupt {
                what: "irqchip state".into(),
                reason: format!("chip id {} where {id} belongs", chip.chip_id),
            });
        }
    }
    for (chip, _) in chips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}
