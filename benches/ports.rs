//! Port forwarding through the whole stack (host listener, vsock device,
//! agent, guest TCP): `ports/download` (a GET of a file from busybox
//! `httpd` in the guest, through `MachineConfig.ports`) and `ports/connect`
//! (a GET of a tiny page: the cost of a new forwarded connection).
//!
//! Both are also printed as a ratio against the guest's own cost of the
//! same work, timed inside the same machine: busybox `wget` from the same
//! httpd on the guest's loopback (`ratio:` lines). The guest's serving is
//! what the host cannot remove; the ratio is the relay's.
//!
//! On kvm_pvm hosts guest-side figures are not representative (the guest
//! kernel is emulated) and the file is 1 MiB; on real KVM it is 256 MiB.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use smol::{Machine, MachineConfig, PortSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{guest_seconds, p50};

const MIB: usize = 1 << 20;
const GUEST_PORT: u16 = 8080;

/// GETs `path` over HTTP/1.0 and returns the body's length.
async fn get(addr: SocketAddr, path: &str) -> usize {
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut all = Vec::new();
    c.read_to_end(&mut all).await.expect("response");
    let head = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP header");
    let status = String::from_utf8_lossy(&all[..head.min(64)]).into_owned();
    assert!(
        status.starts_with("HTTP/1.") && status[8..].starts_with(" 200"),
        "{status:?}"
    );
    all.len() - head - 4
}

fn benches(c: &mut Criterion) {
    let pvm = smol::is_kvm_pvm_host();
    let size = if pvm { MIB } else { 256 * MIB };
    if pvm {
        println!("kvm_pvm host: guest-side costs are emulated here; the file is 1 MiB");
    }
    let (rt, home) = common::runtime_and_home();
    let opts = smol::ConnectOptions::local().home(home.path());
    let config = MachineConfig {
        ports: vec![PortSpec::new(0, GUEST_PORT)],
        ..MachineConfig::default()
    };
    let t = Instant::now();
    let m: Machine = rt
        .block_on(Machine::create_with(config, opts))
        .unwrap_or_else(|e| panic!("booting the bench machine (run `cargo xtask assets`?): {e}"));
    println!("bench machine up in {:.1?}", t.elapsed());
    let serve = format!(
        "mkdir -p /root/www && head -c {size} /dev/zero > /root/www/big && echo hi > /root/www/tiny && \
         (setsid httpd -f -p 127.0.0.1:{GUEST_PORT} -h /root/www </dev/null >/dev/null 2>&1 &) && \
         for i in $(seq 50); do netstat -ltn | grep -q ':{GUEST_PORT} ' && exit 0; sleep 0.1; done; exit 1"
    );
    let r = rt.block_on(m.exec(["sh", "-c", &serve])).expect("httpd");
    assert!(r.success(), "starting httpd: {r:?}");
    let addr = rt.block_on(m.ports()).expect("ports")[0].host_addr();

    let runs = if pvm { 5 } else { 20 };
    let reps = if pvm { 5 } else { 20 };
    let wget = |path: &str| {
        format!("for i in $(seq {reps}); do wget -q -O /dev/null http://127.0.0.1:{GUEST_PORT}{path}; done")
    };
    let guest_download = guest_seconds(&rt, &m, &wget("/big")) / reps as f64;
    let download = p50(runs, || assert_eq!(rt.block_on(get(addr, "/big")), size));
    let rate = |secs: f64| size as f64 / secs / MIB as f64;
    println!(
        "ratio: forwarded download {:.2} MiB/s / guest wget {:.2} MiB/s = {:.2} (aim ≥ 0.8; real-KVM aim ≥ 1 GB/s)",
        rate(download.as_secs_f64()),
        rate(guest_download),
        guest_download / download.as_secs_f64()
    );
    let guest_connect = guest_seconds(&rt, &m, &wget("/tiny")) / reps as f64;
    let connect = p50(runs, || assert_eq!(rt.block_on(get(addr, "/tiny")), 3));
    println!(
        "ratio: forwarded GET of a tiny page p50 {:.3?} / guest wget {:.3?} = {:.2} (aim ≤ 1.3)",
        connect,
        Duration::from_secs_f64(guest_connect),
        connect.as_secs_f64() / guest_connect
    );

    let mut g = c.benchmark_group("ports");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    if pvm {
        g.measurement_time(Duration::from_secs(20))
            .warm_up_time(Duration::from_secs(1));
    }
    g.bench_function("connect", |bn| {
        bn.to_async(&rt).iter(|| async { get(addr, "/tiny").await })
    });
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("download", |bn| {
        bn.to_async(&rt).iter(|| async { get(addr, "/big").await })
    });
    g.finish();

    rt.block_on(m.delete()).expect("delete");
}

criterion_group!(port_benches, benches);
criterion_main!(port_benches);
