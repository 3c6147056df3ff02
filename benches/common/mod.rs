//! Helpers of the guest benches: medians of timed runs, and a stream of
//! zeros read to its end.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use smol::{ExecEvent, Machine};

/// p50 of `n` timed runs of `f`.
pub fn p50(n: usize, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

/// Streams `bytes` zeros out of the guest (`head -c N /dev/zero`) and
/// checks that all of them arrived; returns the count.
pub fn stream_bytes(rt: &tokio::runtime::Runtime, m: &Machine, bytes: usize) -> usize {
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

/// Seconds the guest itself spends on `script` (a `sh` fragment), by its
/// own clock (`/proc/uptime`, 10 ms steps: scripts should take ≥ 1 s).
pub fn guest_seconds(rt: &tokio::runtime::Runtime, m: &Machine, script: &str) -> f64 {
    let wrapped =
        format!("read s _ < /proc/uptime; {script}; read e _ < /proc/uptime; echo \"$s $e\"");
    let r = rt
        .block_on(m.exec(["sh", "-c", &wrapped]))
        .expect("guest timing");
    assert!(r.success(), "guest timing of {script:?}: {r:?}");
    let out = r.stdout_lossy();
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|x| x.parse().expect("uptime"))
        .collect();
    assert_eq!(v.len(), 2, "{out:?}");
    (v[1] - v[0]).max(0.01)
}

/// A multi-threaded runtime and a short home for a bench's machines (the
/// vsock socket path must fit in sun_path).
pub fn runtime_and_home() -> (tokio::runtime::Runtime, tempfile::TempDir) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let home = tempfile::Builder::new()
        .prefix("smol-bench")
        .tempdir_in("/tmp")
        .expect("tempdir");
    (rt, home)
}
