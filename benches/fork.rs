//! Creates that skip the boot: `fork/warm_create` (until the agent
//! answers), `fork/fork` (until the clone's agent answers), `fork/restore`
//! (a snapshot, until the restored agent answers), with their medians
//! printed, and the host-side snapshot phases of a fork.
//!
//! The first create of the bench's machine shape on a host without a warm
//! snapshot boots (40-60 s on kvm_pvm) and makes it; it is not measured.
//! Memory: `SMOL_BENCH_CLONES=16` forks that many clones of a golden that
//! touched `SMOL_BENCH_TOUCH_MB` (default 64) and prints the sum of their
//! PSS against the golden's.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use smol::{ConnectOptions, Machine, MachineConfig};

struct Bench {
    rt: tokio::runtime::Runtime,
    opts: ConnectOptions,
    _home: tempfile::TempDir,
    snaps: tempfile::TempDir,
}

fn setup() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let home = tempfile::Builder::new()
        .prefix("smol-bfork")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let opts = ConnectOptions::local().home(home.path());
    Bench {
        rt,
        opts,
        _home: home,
        snaps: tempfile::tempdir().expect("tempdir"),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Sum of the proportional set size of the processes' smol VMs: this
/// process's PSS (every VM is in it) from /proc/self/smaps_rollup, in KiB.
fn own_pss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn benches(c: &mut Criterion) {
    let b = setup();
    let pvm = smol::is_kvm_pvm_host();
    let samples = if pvm { 10 } else { 50 };
    let config = MachineConfig::default().forkable(true);

    // The shape's warm snapshot (a boot, the first time on this host).
    let t = Instant::now();
    let golden =
        b.rt.block_on(Machine::create_with(
            config.clone().name("golden"),
            b.opts.clone(),
        ))
        .unwrap_or_else(|e| panic!("creating the golden (run `cargo xtask assets`?): {e}"));
    println!("golden up in {:.2?}", t.elapsed());

    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("m{n}")
    };
    let warm: Vec<Duration> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            let m =
                b.rt.block_on(Machine::create_with(
                    config.clone().name(next()),
                    b.opts.clone(),
                ))
                .expect("warm create");
            let d = t.elapsed();
            b.rt.block_on(m.delete()).expect("delete");
            d
        })
        .collect();
    println!(
        "fork/warm_create: p50 {:.2?} (until the agent answers)",
        median(warm)
    );

    let forks: Vec<Duration> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            let m = b.rt.block_on(golden.fork(&next())).expect("fork");
            let d = t.elapsed();
            b.rt.block_on(m.delete()).expect("delete");
            d
        })
        .collect();
    println!(
        "fork/fork: p50 {:.2?} (until the clone's agent answers)",
        median(forks)
    );

    let dir = b.snaps.path().join("snap");
    let st = b.rt.block_on(golden.snapshot(&dir)).expect("snapshot");
    println!(
        "snapshot of the golden: pause {:.2?}, disk {:.2?}, memory {:.2?} ({} MiB), total {:.2?}",
        st.pause,
        st.disks,
        st.memory,
        st.memory_bytes >> 20,
        st.total
    );
    let restores: Vec<Duration> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            let m =
                b.rt.block_on(Machine::restore_with(
                    &dir,
                    MachineConfig::default().name(next()),
                    b.opts.clone(),
                ))
                .expect("restore");
            let d = t.elapsed();
            b.rt.block_on(m.delete()).expect("delete");
            d
        })
        .collect();
    println!(
        "fork/restore: p50 {:.2?} (until the agent answers)",
        median(restores)
    );

    if let Some(count) = std::env::var("SMOL_BENCH_CLONES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let touch_mb: u64 = std::env::var("SMOL_BENCH_TOUCH_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        let big =
            b.rt.block_on(Machine::create_with(
                config
                    .clone()
                    .name("big")
                    .memory_mb((touch_mb as u32 + 128).max(256)),
                b.opts.clone(),
            ))
            .expect("big golden");
        let r =
            b.rt.block_on(big.exec([
                "sh",
                "-c",
                // A 1 MiB string made in user mode (native speed even on
                // kvm_pvm), written touch_mb times into tmpfs.
                &format!(
                    "s=x; i=0; while [ $i -lt 20 ]; do s=$s$s; i=$((i+1)); done; \
                     n=0; while [ $n -lt {touch_mb} ]; do printf %s \"$s\"; n=$((n+1)); done \
                     > /dev/shm/fill"
                ),
            ]))
            .expect("fill");
        assert_eq!(r.exit_code, 0, "{}", r.stderr_lossy());
        let before = own_pss_kib();
        let clones: Vec<Machine> = (0..count)
            .map(|_| b.rt.block_on(big.fork(&next())).expect("fork"))
            .collect();
        let after = own_pss_kib();
        println!(
            "memory: {count} clones of a golden that touched {touch_mb} MiB add {} MiB of PSS ({} KiB each)",
            (after.saturating_sub(before)) >> 10,
            after.saturating_sub(before) / count as u64
        );
        for m in clones {
            b.rt.block_on(m.delete()).expect("delete");
        }
        b.rt.block_on(big.delete()).expect("delete");
    }

    // Criterion's own estimate of the fork, fewer samples on kvm_pvm.
    let mut g = c.benchmark_group("fork");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(if pvm { 30 } else { 5 }));
    g.bench_function("fork", |bn| {
        bn.iter(|| {
            let m = b.rt.block_on(golden.fork(&next())).expect("fork");
            b.rt.block_on(m.delete()).expect("delete");
        })
    });
    g.finish();
    b.rt.block_on(golden.delete()).expect("delete");
}

criterion_group!(fork_benches, benches);
criterion_main!(fork_benches);
