//! Guest round trips through the whole stack (SDK, vsock device, agent):
//! `exec/true` (exec of `true`, with its p50 printed), `exec_stream/
//! throughput`, and `files/write_file` / `files/read_file` throughput.
//!
//! Each figure is also printed as a ratio against the guest's own cost of
//! the same work, timed inside the same machine by a shell loop (`ratio:`
//! lines): an exec against the guest spawning `/bin/true`, the stream
//! against a guest-only pipe of the same bytes, files against a guest-only
//! copy. The guest's cost is what the host cannot remove; the ratio is ours.
//!
//! One machine is booted per bench process (a boot costs ~20 s on kvm_pvm
//! hosts). On such hosts guest-side figures are not representative and the
//! data sizes are small (1 MiB); on real KVM they are 64 MiB for the stream
//! and 256 MiB for files.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use smol::{ExecEvent, Machine, MachineConfig};

mod common;

use common::{guest_seconds, p50, stream_bytes};

const MIB: usize = 1 << 20;

struct Bench {
    rt: tokio::runtime::Runtime,
    machine: Machine,
    _home: tempfile::TempDir,
}

fn boot() -> Bench {
    let (rt, home) = common::runtime_and_home();
    let opts = smol::ConnectOptions::local().home(home.path());
    let t = Instant::now();
    let machine = rt
        .block_on(Machine::create_with(MachineConfig::default(), opts))
        .unwrap_or_else(|e| panic!("booting the bench machine (run `cargo xtask assets`?): {e}"));
    println!("bench machine booted in {:.1?}", t.elapsed());
    Bench {
        rt,
        machine,
        _home: home,
    }
}

fn ratios(b: &Bench, pvm: bool, stream_size: usize, file_size: usize) {
    let (rt, m) = (&b.rt, &b.machine);
    let runs = if pvm { 5 } else { 100 };

    let spawns = if pvm { 20 } else { 2000 };
    let guest_spawn = guest_seconds(
        rt,
        m,
        &format!("i=0; while [ $i -lt {spawns} ]; do /bin/true; i=$((i+1)); done"),
    ) / spawns as f64;
    let exec = p50(runs, || {
        rt.block_on(m.exec(["true"])).expect("exec true");
    });
    println!(
        "ratio: exec(true) p50 {:.3?} / guest spawn of /bin/true {:.3?} = {:.2} (aim ≤ 1.3)",
        exec,
        Duration::from_secs_f64(guest_spawn),
        exec.as_secs_f64() / guest_spawn
    );

    // The same bytes from a file: the stream reads it, the guest pipes it.
    let src = "/root/ratio.bin";
    let made = rt
        .block_on(m.exec([
            "sh",
            "-c",
            &format!("head -c {stream_size} /dev/zero > {src}"),
        ]))
        .expect("make the stream source");
    assert!(made.success(), "{made:?}");
    let reps = if pvm { 10 } else { 20 };
    let guest_pipe = guest_seconds(
        rt,
        m,
        &format!("for i in $(seq {reps}); do cat {src} | cat > /dev/null; done"),
    ) / reps as f64;
    let stream = p50(runs, || {
        rt.block_on(async {
            let mut s = m.exec_stream(["cat", src]).await.expect("exec_stream");
            let mut n = 0;
            while let Some(ev) = s.next().await {
                if let ExecEvent::Stdout(b) = ev.expect("stream") {
                    n += b.len();
                }
            }
            assert_eq!(n, stream_size);
        })
    });
    let rate = |d: f64, bytes: usize| bytes as f64 / d / MIB as f64;
    println!(
        "ratio: exec_stream {:.2} MiB/s / guest pipe {:.2} MiB/s = {:.2} (aim ≥ 0.8)",
        rate(stream.as_secs_f64(), stream_size),
        rate(guest_pipe, stream_size),
        guest_pipe / stream.as_secs_f64()
    );

    let data = bytes::Bytes::from(vec![0x5au8; file_size]);
    let file = "/root/ratio-file.bin";
    let write = p50(runs, || {
        rt.block_on(m.write_file(file, data.clone(), None))
            .expect("write_file");
    });
    let read = p50(runs, || {
        let got = rt.block_on(m.read_file(file)).expect("read_file");
        assert_eq!(got.len(), file_size);
    });
    let guest_copy = guest_seconds(
        rt,
        m,
        &format!("for i in $(seq {reps}); do cp {file} {file}.copy; done"),
    ) / reps as f64;
    println!(
        "ratio: write_file {:.2} MiB/s / guest copy {:.2} MiB/s = {:.2} (aim ≥ 0.8)",
        rate(write.as_secs_f64(), file_size),
        rate(guest_copy, file_size),
        guest_copy / write.as_secs_f64()
    );
    println!(
        "ratio: read_file {:.2} MiB/s / guest copy {:.2} MiB/s = {:.2} (aim ≥ 0.8)",
        rate(read.as_secs_f64(), file_size),
        rate(guest_copy, file_size),
        guest_copy / read.as_secs_f64()
    );
}

fn benches(c: &mut Criterion) {
    let pvm = smol::is_kvm_pvm_host();
    if pvm {
        println!("kvm_pvm host: guest-side costs are emulated here (~0.4 ms per guest syscall); sizes reduced to 1 MiB");
    }
    let b = boot();
    let m = &b.machine;
    let stream_size = if pvm { MIB } else { 64 * MIB };
    let file_size = if pvm { MIB } else { 256 * MIB };
    ratios(&b, pvm, stream_size, file_size);

    // p50 of our own, besides criterion's estimate.
    let mut samples: Vec<Duration> = (0..if pvm { 10 } else { 200 })
        .map(|_| {
            let t = Instant::now();
            b.rt.block_on(m.exec(["true"])).expect("exec true");
            t.elapsed()
        })
        .collect();
    samples.sort();
    println!(
        "exec `true` round trip: p50 {:.3?}, p90 {:.3?} over {} runs",
        samples[samples.len() / 2],
        samples[samples.len() * 9 / 10],
        samples.len()
    );

    let mut g = c.benchmark_group("exec");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    if pvm {
        g.measurement_time(Duration::from_secs(10))
            .warm_up_time(Duration::from_secs(1));
    }
    g.bench_function("true", |bn| {
        bn.to_async(&b.rt)
            .iter(|| async { m.exec(["true"]).await.expect("exec true") })
    });
    g.finish();

    let mut g = c.benchmark_group("exec_stream");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Bytes(stream_size as u64));
    if pvm {
        g.measurement_time(Duration::from_secs(20))
            .warm_up_time(Duration::from_secs(1));
    }
    g.bench_function("throughput", |bn| {
        bn.iter(|| stream_bytes(&b.rt, m, stream_size))
    });
    g.finish();

    let data = bytes::Bytes::from(vec![0x5au8; file_size]);
    let mut g = c.benchmark_group("files");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Bytes(file_size as u64));
    if pvm {
        g.measurement_time(Duration::from_secs(20))
            .warm_up_time(Duration::from_secs(1));
    }
    g.bench_function("write_file", |bn| {
        bn.to_async(&b.rt).iter(|| async {
            m.write_file("/root/bench.bin", data.clone(), None)
                .await
                .expect("write_file")
        })
    });
    g.bench_function("read_file", |bn| {
        bn.to_async(&b.rt).iter(|| async {
            let got = m.read_file("/root/bench.bin").await.expect("read_file");
            assert_eq!(got.len(), file_size);
        })
    });
    g.finish();

    b.rt.block_on(m.delete()).expect("delete");
}

criterion_group!(exec_benches, benches);
criterion_main!(exec_benches);
