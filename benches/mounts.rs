//! virtio-fs through the whole stack (the monitor's vhost-user frontend,
//! virtiofsd, the guest's FUSE client), against the machine's own disk
//! (virtio-blk) doing the same work in the same machine:
//!
//! - sequential read of a large file (`dd bs=1M`), page cache dropped first;
//! - a walk of many small files (`find -type f -exec cat`), likewise.
//!
//! Both are timed inside the guest and printed as `ratio:` lines (the
//! share's time over the disk's). On kvm_pvm hosts every guest kernel
//! instruction is emulated, so absolute figures mean little there and the
//! sizes are small (16 MiB, 200 files); on real KVM they are 1 GiB and
//! 5,000 files, and the aim is ≥ 1 GB/s for the sequential read.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use smol::{Machine, MachineConfig, MountSpec};

mod common;

use common::guest_seconds;

const MIB: usize = 1 << 20;
const SHARE: &str = "/mnt/share";

fn benches(c: &mut Criterion) {
    let pvm = smol::is_kvm_pvm_host();
    let (big_mib, files) = if pvm { (16, 200) } else { (1024, 5000) };
    if pvm {
        println!("kvm_pvm host: guest-side costs are emulated here; {big_mib} MiB, {files} files");
    }
    let (rt, home) = common::runtime_and_home();
    let source = tempfile::tempdir().expect("share dir");
    let big = vec![0x5au8; MIB];
    {
        use std::io::Write;
        let mut f = std::fs::File::create(source.path().join("big")).expect("big");
        for _ in 0..big_mib {
            f.write_all(&big).expect("write big");
        }
    }
    let small = source.path().join("small");
    std::fs::create_dir(&small).expect("small dir");
    for i in 0..files {
        // 1 to 16 KiB, varied.
        let len = 1024 * (1 + (i * 7) % 16);
        std::fs::write(small.join(format!("f{i:05}")), &big[..len]).expect("small file");
    }
    let opts = smol::ConnectOptions::local().home(home.path());
    let config = MachineConfig {
        mounts: vec![MountSpec::new(source.path(), SHARE).read_only()],
        ..MachineConfig::default()
    };
    let t = Instant::now();
    let m: Machine = rt
        .block_on(Machine::create_with(config, opts))
        .unwrap_or_else(|e| {
            panic!("booting the bench machine (run `cargo xtask bench`, which installs virtiofsd): {e}")
        });
    println!("bench machine up in {:.1?}", t.elapsed());
    // The same data on the machine's disk.
    let copy =
        format!("mkdir -p /root/disk && cp -r {SHARE}/big {SHARE}/small /root/disk/ && sync");
    let r = rt.block_on(m.exec(["sh", "-c", &copy])).expect("copy");
    assert!(r.success(), "copying to the disk: {r:?}");

    let drop = "sync; echo 3 > /proc/sys/vm/drop_caches";
    let read = |dir: &str| {
        guest_seconds(
            &rt,
            &m,
            &format!("{drop}; dd if={dir}/big of=/dev/null bs=1M 2>/dev/null"),
        )
    };
    let walk = |dir: &str| {
        guest_seconds(
            &rt,
            &m,
            &format!("{drop}; find {dir}/small -type f -exec cat {{}} + > /dev/null"),
        )
    };
    let runs = 3;
    let median = |f: &dyn Fn() -> f64| {
        let mut v: Vec<f64> = (0..runs).map(|_| f()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[runs / 2].max(0.01)
    };
    let fs_read = median(&|| read(SHARE));
    let disk_read = median(&|| read("/root/disk"));
    let rate = |secs: f64| big_mib as f64 / secs;
    println!(
        "ratio: virtio-fs sequential read {:.1} MiB/s / disk {:.1} MiB/s = {:.2} (time ratio {:.2}; real-KVM aim ≥ 1 GB/s)",
        rate(fs_read),
        rate(disk_read),
        disk_read / fs_read,
        fs_read / disk_read
    );
    let fs_walk = median(&|| walk(SHARE));
    let disk_walk = median(&|| walk("/root/disk"));
    println!(
        "ratio: virtio-fs walk of {files} small files {:.2}s / disk {:.2}s = {:.2}",
        fs_walk,
        disk_walk,
        fs_walk / disk_walk
    );

    let mut g = c.benchmark_group("mounts");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    if pvm {
        g.measurement_time(Duration::from_secs(30))
            .warm_up_time(Duration::from_secs(1));
    }
    g.bench_function("stat_one_file", |bn| {
        bn.to_async(&rt).iter(|| async {
            let r = m.exec(["stat", "-c", "%s", &format!("{SHARE}/big")]).await;
            assert!(r.expect("stat").success());
        })
    });
    g.finish();
    rt.block_on(m.delete()).expect("delete");
}

criterion_group!(mount_benches, benches);
criterion_main!(mount_benches);
