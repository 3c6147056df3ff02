//! The remote engine against the local one, on the same host in the same
//! run: an in-process `smol serve` on 127.0.0.1, one machine created
//! through it and one created locally (both restored from the same warm
//! snapshot), then
//!
//! - `remote/state`: a call that never reaches the guest (HTTP, auth, the
//!   server's lookup): the remote path's own cost;
//! - exec(`true`) round trips and a 1 MiB (64 MiB on real KVM) exec_stream,
//!   remote ÷ local, printed as `ratio:` lines.
//!
//! Needs the `server` feature (`cargo xtask bench` enables all features).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use smol::{ConnectOptions, Machine, MachineConfig};

mod common;

use common::{p50, stream_bytes};

const MIB: usize = 1 << 20;

fn benches(c: &mut Criterion) {
    let pvm = smol::is_kvm_pvm_host();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let home = tempfile::Builder::new()
        .prefix("smol-rbench")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let key = smol::server::keys::KeyStore::new(home.path())
        .create("bench")
        .expect("key");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("listen");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = rt.spawn(smol::server::serve(
        listener,
        home.path().to_path_buf(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let shape = MachineConfig::default().disk_mb(256);
    let local = rt
        .block_on(Machine::create_with(
            shape.clone().name("local"),
            ConnectOptions::local().home(home.path()),
        ))
        .unwrap_or_else(|e| panic!("the local machine (run `cargo xtask assets`?): {e}"));
    let remote = rt
        .block_on(Machine::create_with(
            shape.name("remote"),
            ConnectOptions::cloud(&key).endpoint(&url),
        ))
        .expect("the remote machine");

    let runs = if pvm { 8 } else { 200 };
    let state = p50(runs * 5, || {
        rt.block_on(remote.state()).expect("state");
    });
    println!("remote state() p50 {state:.3?} (no guest work: HTTP, key check, lookup)");
    let l = p50(runs, || {
        rt.block_on(local.exec(["true"])).expect("exec");
    });
    let r = p50(runs, || {
        rt.block_on(remote.exec(["true"])).expect("exec");
    });
    println!(
        "ratio: remote exec(true) p50 {r:.3?} / local {l:.3?} = {:.3} (the remote path adds {:.2?})",
        r.as_secs_f64() / l.as_secs_f64(),
        r.saturating_sub(l)
    );
    let bytes = if pvm { MIB } else { 64 * MIB };
    let ls = p50(if pvm { 3 } else { 10 }, || {
        stream_bytes(&rt, &local, bytes);
    });
    let rs = p50(if pvm { 3 } else { 10 }, || {
        stream_bytes(&rt, &remote, bytes);
    });
    let rate = |d: Duration| bytes as f64 / d.as_secs_f64() / MIB as f64;
    println!(
        "ratio: remote exec_stream {:.2} MiB/s / local {:.2} MiB/s = {:.3}",
        rate(rs),
        rate(ls),
        ls.as_secs_f64() / rs.as_secs_f64()
    );

    let mut g = c.benchmark_group("remote");
    g.sampling_mode(SamplingMode::Flat).sample_size(20);
    g.bench_function("state", |b| {
        b.to_async(&rt)
            .iter(|| async { remote.state().await.expect("state") })
    });
    g.finish();

    rt.block_on(remote.delete()).expect("delete remote");
    rt.block_on(local.delete()).expect("delete local");
    let _ = stop_tx.send(());
    rt.block_on(server)
        .expect("server task")
        .expect("server ended cleanly");
}

criterion_group!(remote_benches, benches);
criterion_main!(remote_benches);
