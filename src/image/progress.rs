//! Progress of a pull: the [`PullEvent`]s a caller can draw a progress bar
//! from, and their `tracing` side (info when the image is resolved and a
//! layer starts or is done, throttled debug lines for the bytes between).

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::store::Digest;

/// Byte progress is reported every this many bytes of a blob.
pub(crate) const PROGRESS_STEP: u64 = 1 << 20;
/// At most one debug line per layer per this long.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Progress of a pull, for progress bars. In order: one `Resolved`, then
/// for each layer `LayerProgress` events (the first with `done == 0` when
/// its bytes start to move) and one `LayerDone`; layers go concurrently, so
/// tell them apart by `index`. A pull into a machine then sends the layers
/// the machine lacks: one `Sending`, then for each of them `LayerProgress`
/// events again (bytes sent; the machine unpacks them as they arrive) and
/// one `LayerSent`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PullEvent {
    /// The manifest is known: how many layers the image has and their
    /// compressed size in bytes, what the layer events add up to.
    Resolved {
        reference: String,
        /// The manifest digest; `None` for a `docker save` archive, whose
        /// manifest is written only once its layers are read.
        digest: Option<Digest>,
        layers: usize,
        bytes: u64,
    },
    /// Bytes of layer `index` fetched (or imported) so far; after
    /// `Sending`, sent to the machine so far. (Its digest comes with
    /// `LayerDone`: a `docker save` layer's is known only then.)
    LayerProgress { index: usize, done: u64, total: u64 },
    /// Layer `index` is in the host's blob cache (`cached`: it already was).
    LayerDone {
        index: usize,
        digest: Digest,
        size: u64,
        cached: bool,
    },
    /// The image is in the host's blob cache; `layers` layers of `bytes`
    /// bytes in all go to the machine now (none when it has them all).
    Sending { layers: usize, bytes: u64 },
    /// Layer `index` is stored and unpacked in the machine.
    LayerSent {
        index: usize,
        digest: Digest,
        size: u64,
    },
}

/// Receives [`PullEvent`]s. Called from the pulling tasks and threads, so
/// it should return quickly.
pub type ProgressFn = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// The progress of one pull: its sinks and its `tracing` throttle.
#[derive(Clone, Default)]
pub(crate) struct Reporter {
    sinks: Vec<ProgressFn>,
    state: Arc<Mutex<LogState>>,
}

#[derive(Default)]
struct LogState {
    layers: usize,
    last_debug: HashMap<usize, Instant>,
}

impl Reporter {
    pub(crate) fn new(sinks: impl IntoIterator<Item = ProgressFn>) -> Reporter {
        Reporter {
            sinks: sinks.into_iter().collect(),
            state: Arc::default(),
        }
    }

    pub(crate) fn report(&self, ev: &PullEvent) {
        self.trace(ev);
        for sink in &self.sinks {
            sink(ev);
        }
    }

    fn trace(&self, ev: &PullEvent) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            PullEvent::Resolved {
                reference,
                digest,
                layers,
                bytes,
            } => {
                state.layers = *layers;
                tracing::info!(target: "smol::image", reference = %reference, digest = digest.as_ref().map(tracing::field::display), layers, bytes, "resolved image");
            }
            PullEvent::LayerProgress {
                index,
                done: 0,
                total,
            } => {
                state.last_debug.insert(*index, Instant::now());
                tracing::info!(target: "smol::image", layer = index + 1, layers = state.layers, bytes = total, "fetching layer");
            }
            PullEvent::LayerProgress { index, done, total } => {
                let now = Instant::now();
                let due = state
                    .last_debug
                    .get(index)
                    .is_none_or(|t| now.duration_since(*t) >= LOG_EVERY);
                if due {
                    state.last_debug.insert(*index, now);
                    tracing::debug!(target: "smol::image", layer = index + 1, done, total, "layer progress");
                }
            }
            PullEvent::LayerDone {
                index,
                digest,
                size,
                cached,
            } => {
                state.last_debug.remove(index);
                tracing::info!(target: "smol::image", layer = index + 1, layers = state.layers, digest = %digest, bytes = size, cached, "layer ready");
            }
            // The machine side logs its own sends.
            PullEvent::Sending { .. } | PullEvent::LayerSent { .. } => {}
        }
    }

    /// Reports the start, the progress (every [`PROGRESS_STEP`] bytes) and
    /// the end of reading layer `index` from `reader`.
    pub(crate) fn reading<R: Read>(
        &self,
        reader: R,
        index: usize,
        total: u64,
    ) -> ProgressReader<'_, R> {
        self.report(&PullEvent::LayerProgress {
            index,
            done: 0,
            total,
        });
        ProgressReader {
            inner: reader,
            reporter: self,
            index,
            total,
            done: 0,
            next: PROGRESS_STEP,
        }
    }
}

/// A reader that reports the bytes read through it as layer progress.
pub(crate) struct ProgressReader<'a, R> {
    inner: R,
    reporter: &'a Reporter,
    index: usize,
    total: u64,
    done: u64,
    next: u64,
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if n > 0 && (self.done >= self.next || self.done == self.total) {
            self.next = self.done + PROGRESS_STEP;
            self.reporter.report(&PullEvent::LayerProgress {
                index: self.index,
                done: self.done,
                total: self.total,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collecting() -> (Reporter, Arc<Mutex<Vec<PullEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let r = Reporter::new([
            Arc::new(move |e: &PullEvent| sink.lock().unwrap().push(e.clone())) as ProgressFn,
        ]);
        (r, events)
    }

    #[test]
    fn a_reader_reports_start_steps_and_end() {
        let (r, events) = collecting();
        let data = vec![7u8; (PROGRESS_STEP * 2 + 5) as usize];
        let mut out = Vec::new();
        io::copy(&mut r.reading(&data[..], 3, data.len() as u64), &mut out).unwrap();
        assert_eq!(out, data);
        let done: Vec<u64> = events
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                PullEvent::LayerProgress {
                    index: 3,
                    done,
                    total,
                } if *total == data.len() as u64 => *done,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(done.first(), Some(&0));
        assert_eq!(done.last(), Some(&(data.len() as u64)));
        assert!(done.windows(2).all(|w| w[0] < w[1]), "{done:?}");
        // Throttled: one event per step, not one per read.
        assert!(done.len() <= 4, "{done:?}");
    }

    #[test]
    fn every_sink_gets_every_event() {
        let (a, ea) = collecting();
        let (b, eb) = collecting();
        let both = Reporter::new(a.sinks.into_iter().chain(b.sinks));
        let ev = PullEvent::Sending {
            layers: 1,
            bytes: 2,
        };
        both.report(&ev);
        assert_eq!(*ea.lock().unwrap(), vec![ev.clone()]);
        assert_eq!(*eb.lock().unwrap(), vec![ev]);
    }
}
