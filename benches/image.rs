//! OCI images: what a container costs over a plain exec, and the host-side
//! pieces that need no guest.
//!
//! - `image/exec_true` and `image/run_true`: `exec(["true"])` on the base
//!   rootfs against `run(image, ["true"])` of an image the machine already
//!   has (overlay mount, namespaces, chroot, user; no registry). The p50 of
//!   each and their difference are printed (aim on real KVM: < 20 ms extra).
//! - `image/unpack_busybox` (host only): unpacking the gzip busybox test
//!   layer with the guest's unpacker into a temp directory.
//! - `image/resolve_cached` (host only): resolving an image whose blobs are
//!   all in the blob cache (an oci-layout source: index, manifest, config).
//!
//! One machine is booted per bench process (~20 s on kvm_pvm hosts, where
//! guest-side figures are emulated and not representative);
//! `SMOL_BENCH_NO_GUEST=1` runs the host-side benches only.

#[path = "../tests/support/images.rs"]
mod images;

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use smol::image::{BlobStore, ImageResolver};
use smol::{Machine, MachineConfig};

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn host_benches(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    home: &std::path::Path,
    layout: &str,
) {
    let layer = images::busybox_layers().remove(0);
    let mut g = c.benchmark_group("image");
    g.sample_size(20)
        .throughput(Throughput::Bytes(layer.tar.len() as u64));
    g.bench_function("unpack_busybox", |b| {
        b.iter_batched(
            || tempfile::tempdir_in(home).expect("tempdir"),
            |dir| smol_agent::image::unpack_layer(&layer.blob[..], dir.path()).expect("unpack"),
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let resolver =
        ImageResolver::new(BlobStore::open(home.join("images")).expect("store")).expect("resolver");
    rt.block_on(resolver.pull(layout)).expect("first resolve");
    let mut g = c.benchmark_group("image");
    g.sample_size(50);
    g.bench_function("resolve_cached", |b| {
        b.to_async(rt).iter(|| async {
            let p = resolver.pull(layout).await.expect("resolve");
            assert_eq!(p.stats.blobs_fetched, 0);
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let pvm = smol::is_kvm_pvm_host();
    if pvm {
        println!("kvm_pvm host: guest-side costs are emulated here (~0.4 ms per guest syscall)");
    }
    let (rt, home) = common::runtime_and_home();
    let dir = home.path().join("layout");
    images::write_oci_layout(&dir, &[("bench", &images::busybox_image())]);
    let layout = format!("oci-layout:{}:bench", dir.display());

    host_benches(c, &rt, home.path(), &layout);
    if std::env::var_os("SMOL_BENCH_NO_GUEST").is_some() {
        println!("SMOL_BENCH_NO_GUEST set: host-side benches only");
        return;
    }

    let opts = smol::ConnectOptions::local().home(home.path());
    let t = Instant::now();
    let m = rt
        .block_on(Machine::create_with(MachineConfig::default(), opts))
        .unwrap_or_else(|e| panic!("booting the bench machine (run `cargo xtask assets`?): {e}"));
    println!("bench machine booted in {:.1?}", t.elapsed());
    let t = Instant::now();
    rt.block_on(m.pull_image(&layout))
        .expect("pull the bench image");
    println!("bench image sent to the machine in {:.1?}", t.elapsed());

    let runs = if pvm { 10 } else { 200 };
    let exec: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            rt.block_on(m.exec(["true"])).expect("exec true");
            t.elapsed()
        })
        .collect();
    let run: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let r = rt.block_on(m.run(&layout, ["true"])).expect("run true");
            assert_eq!(r.exit_code, 0);
            t.elapsed()
        })
        .collect();
    let (e, r) = (p50(exec), p50(run));
    println!(
        "`true`: exec p50 {e:.2?}, run (cached image) p50 {r:.2?}, container overhead {:.2?} over {runs} runs each",
        r.saturating_sub(e)
    );

    let mut g = c.benchmark_group("image");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    if pvm {
        g.measurement_time(Duration::from_secs(20))
            .warm_up_time(Duration::from_secs(1));
    }
    g.bench_function("exec_true", |b| {
        b.to_async(&rt)
            .iter(|| async { m.exec(["true"]).await.expect("exec") })
    });
    g.bench_function("run_true", |b| {
        b.to_async(&rt)
            .iter(|| async { m.run(&layout, ["true"]).await.expect("run") })
    });
    g.finish();

    rt.block_on(m.delete()).expect("delete");
}

criterion_group!(image_benches, benches);
criterion_main!(image_benches);
