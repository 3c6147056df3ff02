//! Guest round trips through the whole stack (SDK, vsock device, agent):
//! `exec/true` (exec of `true`, with its p50 printed), `exec_stream/
//! throughput`, and `files/write_file` / `files/read_file` throughput.
//!
//! One machine is booted per bench process (a boot costs ~20 s on kvm_pvm
//! hosts). On such hosts guest-side figures are not representative and the
//! data sizes are small (1 MiB); on real KVM they are 64 MiB for the stream
//! and 256 MiB for files.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use smol::{ExecEvent, Machine, MachineConfig};

const MIB: usize = 1 << 20;

struct Bench {
    rt: tokio::runtime::Runtime,
    machine: Machine,
    _home: tempfile::TempDir,
}

fn boot() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let home = tempfile::Builder::new()
        .prefix("smol-bench")
        .tempdir_in("/tmp")
        .expect("tempdir");
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

fn stream_bytes(rt: &tokio::runtime::Runtime, m: &Machine, bytes: usize) -> usize {
    rt.block_on(async {
        let mut s = m
            .exec_stream(["head", "-c", &bytes.to_string(), "/dev/zero"])
            .await
            .expect("exec_stream");
        let mut n = 0;
        while let Some(ev) = s.next().await {
            match ev.expect("stream") {
                ExecEvent::Stdout(b) => n += b.len(),
                ExecEvent::Exit(0) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert_eq!(n, bytes);
        n
    })
}

fn benches(c: &mut Criterion) {
    let pvm = smol::is_kvm_pvm_host();
    if pvm {
        println!("kvm_pvm host: guest-side costs are emulated here (~0.4 ms per guest syscall); sizes reduced to 1 MiB");
    }
    let b = boot();
    let m = &b.machine;

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

    let stream_size = if pvm { MIB } else { 64 * MIB };
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

    let file_size = if pvm { MIB } else { 256 * MIB };
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
