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
