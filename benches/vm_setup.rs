//! Host-side VM set-up: from `Vm::start` to the boot vCPU's first `KVM_RUN`,
//! with 256 MiB of guest memory, our kernel and initramfs (what every
//! machine pays before the guest runs a single instruction).
//!
//! Measured with `iter_custom` from the monitor's own `BootTimings`, so the
//! teardown of each VM (`stop`, outside the measured span) does not count.
//! The kernel and initramfs are prepared once per process and then mapped
//! copy-on-write into every VM; the first VM pays the preparation, and its
//! set-up time is printed on its own before the steady-state figures, with
//! that of a first VM whose images come from an image cache on disk (what
//! the SDK's machines use, so every process after the host's first).
//! Needs the assets and /dev/kvm.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, Criterion};
use smol_vmm::{BootTimings, Vm, VmConfig, VsockConfig};

fn asset(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("SMOL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/smol")))
        .expect("neither SMOL_CACHE_DIR nor HOME is set");
    cache.join("assets").join(name)
}

fn config(dir: &Path, vsock: bool) -> VmConfig {
    let kernel = asset("SMOL_KERNEL", "vmlinux");
    let initramfs = asset("SMOL_INITRAMFS", "initramfs.cpio");
    for p in [&kernel, &initramfs] {
        assert!(
            p.is_file(),
            "guest asset {} is missing: run `cargo xtask assets`",
            p.display()
        );
    }
    VmConfig {
        kernel,
        initramfs: Some(initramfs),
        image_cache: None,
        cmdline: String::new(),
        vcpus: 1,
        memory_mib: 256,
        console_log: None,
        vsock: vsock.then(|| VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("bench.sock"),
        }),
        disks: Vec::new(),
        net: None,
        fs: Vec::new(),
    }
}

fn start_stop(config: &VmConfig) -> BootTimings {
    let mut vm = Vm::start(config.clone()).expect("vm starts");
    let t = vm.timings();
    vm.stop();
    t
}

/// Median of each phase over `n` runs, printed once so the breakdown is
/// visible next to criterion's total.
fn print_phases(config: &VmConfig, n: usize) {
    let runs: Vec<BootTimings> = (0..n).map(|_| start_stop(config)).collect();
    let median = |f: fn(&BootTimings) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    eprintln!(
        "vm_setup phases (median of {n}): kvm {:?}, memory {:?}, kernel+initramfs {:?}, \
         devices {:?}, vcpus {:?}, to first KVM_RUN {:?}; total {:?}",
        median(|t| t.kvm),
        median(|t| t.memory),
        median(|t| t.kernel_load),
        median(|t| t.devices),
        median(|t| t.vcpus),
        median(|t| t.first_run),
        median(|t| t.total),
    );
}

fn vm_setup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let plain = config(dir.path(), false);
    let with_vsock = config(dir.path(), true);
    let first = start_stop(&plain);
    eprintln!(
        "vm_setup first VM of the process (prepares the boot images): kernel+initramfs {:?}, total {:?}",
        first.kernel_load, first.total
    );
    // With an image cache: the first VM on the host prepares and stores the
    // images; the first VM of every later process maps the stored ones.
    // Each later process is a real one: this bench run again, as a child
    // that starts one VM and prints its timings.
    let store = tempfile::tempdir().unwrap();
    let cached = VmConfig {
        image_cache: Some(store.path().to_path_buf()),
        ..plain.clone()
    };
    smol_vmm::release_boot_images();
    let storing = start_stop(&cached);
    let mut later: Vec<(Duration, Duration)> = (0..7)
        .map(|_| first_vm_of_a_process(store.path()))
        .collect();
    later.sort();
    let (total, load) = later[later.len() / 2];
    eprintln!(
        "vm_setup first VM of the host (prepares and stores the images): total {:?}; \
         first VM of a new process (maps the stored images), median of {}: kernel+initramfs {load:?}, total {total:?} (aim ≤ 10 ms)",
        storing.total,
        later.len(),
    );
    print_phases(&plain, 31);

    let mut group = c.benchmark_group("vm_setup");
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(10));
    for (name, cfg) in [("256mib", &plain), ("256mib_vsock", &with_vsock)] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| start_stop(cfg).total).sum());
        });
    }
    group.finish();
}

/// Set in the child that [`first_vm_of_a_process`] runs: the image cache.
const CHILD_ENV: &str = "SMOL_BENCH_FIRST_VM_CACHE";

/// Runs this bench binary as a new process that starts one VM with the
/// image cache `store`; returns that VM's total and kernel+initramfs times.
fn first_vm_of_a_process(store: &Path) -> (Duration, Duration) {
    let out = std::process::Command::new(std::env::current_exe().expect("bench binary"))
        .env(CHILD_ENV, store)
        .output()
        .expect("run the bench binary as a child");
    assert!(out.status.success(), "child: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let nanos: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().expect("child prints nanoseconds"))
        .collect();
    assert_eq!(nanos.len(), 2, "child printed {text:?}");
    (
        Duration::from_nanos(nanos[0]),
        Duration::from_nanos(nanos[1]),
    )
}

criterion_group!(benches, vm_setup);

fn main() {
    if let Some(store) = std::env::var_os(CHILD_ENV) {
        let dir = tempfile::tempdir().unwrap();
        let config = VmConfig {
            image_cache: Some(PathBuf::from(store)),
            ..config(dir.path(), false)
        };
        let t = start_stop(&config);
        println!("{} {}", t.total.as_nanos(), t.kernel_load.as_nanos());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
