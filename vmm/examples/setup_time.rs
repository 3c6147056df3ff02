//! Prints the host-side set-up phases of `Vm::start` (median of N runs).
//!
//! `cargo run --release -p smol-vmm --example setup_time -- VMLINUX [INITRAMFS] [MEMORY_MIB] [RUNS]`

use std::time::Duration;

use smol_vmm::{BootTimings, Vm, VmConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel) = args.first() else {
        eprintln!("usage: setup_time VMLINUX [INITRAMFS] [MEMORY_MIB] [RUNS]");
        std::process::exit(2);
    };
    let initramfs = args.get(1).filter(|s| !s.is_empty()).map(Into::into);
    let memory_mib = args
        .get(2)
        .map_or(256, |s| s.parse().expect("memory in MiB"));
    let runs: usize = args.get(3).map_or(21, |s| s.parse().expect("run count"));
    let config = VmConfig {
        kernel: kernel.into(),
        initramfs,
        image_cache: std::env::var_os("SMOL_IMAGE_CACHE").map(Into::into),
        cmdline: String::new(),
        vcpus: 1,
        memory_mib,
        console_log: None,
        vsock: None,
        disks: Vec::new(),
        net: None,
        fs: Vec::new(),
    };
    let timings: Vec<BootTimings> = (0..runs)
        .map(|_| {
            let mut vm = Vm::start(config.clone()).unwrap_or_else(|e| {
                eprintln!("start failed: {e}");
                std::process::exit(1)
            });
            let t = vm.timings();
            vm.stop();
            t
        })
        .collect();
    let median = |f: fn(&BootTimings) -> Duration| {
        let mut v: Vec<Duration> = timings.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "median of {runs}: kvm {:?}, memory {:?}, kernel+initramfs {:?}, devices {:?}, vcpus {:?}, \
         to first KVM_RUN {:?}; total {:?}",
        median(|t| t.kvm),
        median(|t| t.memory),
        median(|t| t.kernel_load),
        median(|t| t.devices),
        median(|t| t.vcpus),
        median(|t| t.first_run),
        median(|t| t.total)
    );
}
