//! Pull progress on the terminal: [`PullState`] turns [`PullEvent`]s into
//! what a bar shows (bytes and layers, done and in all), [`PullBar`] draws
//! it with indicatif on stderr, or, when stderr is not a terminal (the bar
//! hides itself then), prints a plain line per step instead.
//!
//! Shared with `examples/demo.rs`, which includes this file.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use smol::PullEvent;

/// Which part of a pull the events are about.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the manifest is known.
    #[default]
    Resolving,
    /// Layers into the host's blob cache.
    Fetching,
    /// Layers from the cache into a machine.
    Sending,
}

/// What a pull has done so far, counted from its events. The byte and
/// layer counts are those of the current phase.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PullState {
    pub phase: Phase,
    pub reference: String,
    pub layers_total: usize,
    pub layers_done: usize,
    /// Layers the cache already had (fetching phase).
    pub layers_cached: usize,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes counted for each layer, by index.
    per_layer: HashMap<usize, u64>,
    finished: HashSet<usize>,
}

impl PullState {
    /// Counts `ev`; returns the line that says what happened, for output
    /// that is not a terminal (none for byte progress).
    pub fn apply(&mut self, ev: &PullEvent) -> Option<String> {
        match ev {
            PullEvent::Resolved {
                reference,
                digest,
                layers,
                bytes,
            } => {
                *self = PullState {
                    phase: Phase::Fetching,
                    reference: reference.clone(),
                    layers_total: *layers,
                    bytes_total: *bytes,
                    ..PullState::default()
                };
                let digest = digest
                    .as_ref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                Some(format!(
                    "resolved {reference}{digest}: {}, {}",
                    layers_text(*layers),
                    HumanBytes(*bytes)
                ))
            }
            PullEvent::LayerProgress { index, done, .. } => {
                if !self.finished.contains(index) {
                    self.count(*index, *done);
                }
                None
            }
            PullEvent::LayerDone {
                index,
                digest,
                size,
                cached,
            } => {
                if !self.finish(*index, *size) {
                    return None;
                }
                if *cached {
                    self.layers_cached += 1;
                }
                let how = if *cached { "cached" } else { "fetched" };
                Some(format!(
                    "layer {}/{} {} {} {how}",
                    index + 1,
                    self.layers_total,
                    short(digest.as_str()),
                    HumanBytes(*size)
                ))
            }
            PullEvent::Sending { layers, bytes } => {
                *self = PullState {
                    phase: Phase::Sending,
                    reference: std::mem::take(&mut self.reference),
                    layers_total: *layers,
                    bytes_total: *bytes,
                    ..PullState::default()
                };
                (*layers > 0).then(|| {
                    format!(
                        "sending {} ({}) to the machine",
                        layers_text(*layers),
                        HumanBytes(*bytes)
                    )
                })
            }
            PullEvent::LayerSent {
                index,
                digest,
                size,
            } => {
                if !self.finish(*index, *size) {
                    return None;
                }
                Some(format!(
                    "layer {} {} in the machine ({}/{})",
                    index + 1,
                    short(digest.as_str()),
                    self.layers_done,
                    self.layers_total
                ))
            }
            // Events this version does not know about change nothing.
            _ => None,
        }
    }

    /// Sets layer `index`'s byte count.
    fn count(&mut self, index: usize, bytes: u64) {
        let before = self.per_layer.insert(index, bytes).unwrap_or(0);
        self.bytes_done = self.bytes_done - before.min(self.bytes_done) + bytes;
    }

    /// Marks layer `index` done with all its bytes; false if it already was.
    fn finish(&mut self, index: usize, size: u64) -> bool {
        if !self.finished.insert(index) {
            return false;
        }
        self.count(index, size);
        self.layers_done += 1;
        true
    }
}

/// "1 layer", "2 layers".
pub fn layers_text(n: usize) -> String {
    if n == 1 {
        "1 layer".into()
    } else {
        format!("{n} layers")
    }
}

/// `sha256:0123456789ab` of a digest.
fn short(digest: &str) -> &str {
    &digest[..digest.len().min("sha256:".len() + 12)]
}

/// A progress bar for one pull, fed by its [`PullEvent`]s.
pub struct PullBar {
    bar: ProgressBar,
    state: Mutex<PullState>,
}

impl PullBar {
    /// A bar on stderr; a spinner until the image is resolved.
    pub fn new(what: &str) -> Arc<PullBar> {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {msg}").expect("spinner template"),
        );
        bar.set_prefix("resolving");
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        if bar.is_hidden() {
            eprintln!("pulling {what}");
        }
        Arc::new(PullBar {
            bar,
            state: Mutex::new(PullState::default()),
        })
    }

    /// The callback to give the pull.
    pub fn callback(self: &Arc<Self>) -> impl Fn(&PullEvent) + Send + Sync + 'static {
        let me = self.clone();
        move |ev| me.update(ev)
    }

    fn update(&self, ev: &PullEvent) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let phase = state.phase;
        let line = state.apply(ev);
        if self.bar.is_hidden() {
            if let Some(line) = line {
                eprintln!("{line}");
            }
            return;
        }
        self.bar.set_length(state.bytes_total);
        self.bar.set_position(state.bytes_done);
        self.bar.set_message(format!(
            "layers {}/{}",
            state.layers_done, state.layers_total
        ));
        if state.phase != phase {
            self.bar.set_prefix(match state.phase {
                Phase::Sending => "sending",
                _ => "pulling",
            });
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{bar:30}] {bytes}/{total_bytes} {msg} {elapsed}",
                )
                .expect("bar template")
                .progress_chars("=> "),
            );
        }
    }

    /// Clears the bar; returns what the pull did.
    pub fn finish(&self) -> PullState {
        self.bar.finish_and_clear();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A spinner on stderr saying what is going on (a plain line when stderr
/// is not a terminal).
pub fn spinner(what: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("spinner template"),
    );
    if bar.is_hidden() {
        eprintln!("{what}");
    }
    bar.set_message(what);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::image::Digest;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn counts_bytes_and_layers_of_a_pull_into_a_machine() {
        let mut s = PullState::default();
        let line = s.apply(&PullEvent::Resolved {
            reference: "r".into(),
            digest: Some(d(0)),
            layers: 3,
            bytes: 600,
        });
        assert_eq!(
            line.unwrap(),
            format!("resolved r ({}): 3 layers, 600 B", d(0))
        );
        assert_eq!(
            (s.phase, s.layers_total, s.bytes_total),
            (Phase::Fetching, 3, 600)
        );

        // Two layers at once, one cached.
        let progress = |index, done, total| PullEvent::LayerProgress { index, done, total };
        assert_eq!(s.apply(&progress(0, 0, 100)), None);
        s.apply(&progress(1, 0, 200));
        s.apply(&progress(0, 50, 100));
        s.apply(&progress(1, 150, 200));
        assert_eq!((s.bytes_done, s.layers_done), (200, 0));
        let line = s.apply(&PullEvent::LayerDone {
            index: 2,
            digest: d(3),
            size: 300,
            cached: true,
        });
        assert_eq!(
            line.unwrap(),
            format!("layer 3/3 {} 300 B cached", &d(3).as_str()[..19])
        );
        s.apply(&PullEvent::LayerDone {
            index: 0,
            digest: d(1),
            size: 100,
            cached: false,
        });
        // Late progress of a finished layer changes nothing.
        s.apply(&progress(0, 50, 100));
        assert_eq!((s.bytes_done, s.layers_done, s.layers_cached), (550, 2, 1));
        s.apply(&PullEvent::LayerDone {
            index: 1,
            digest: d(2),
            size: 200,
            cached: false,
        });
        assert_eq!((s.bytes_done, s.layers_done), (600, 3));
        // A second LayerDone of a layer is not counted twice.
        let again = s.apply(&PullEvent::LayerDone {
            index: 1,
            digest: d(2),
            size: 200,
            cached: false,
        });
        assert_eq!((again, s.bytes_done, s.layers_done), (None, 600, 3));

        // Then into the machine: the counts start again.
        let line = s.apply(&PullEvent::Sending {
            layers: 2,
            bytes: 300,
        });
        assert_eq!(line.unwrap(), "sending 2 layers (300 B) to the machine");
        assert_eq!(
            (
                s.phase,
                s.bytes_done,
                s.bytes_total,
                s.layers_done,
                s.layers_total
            ),
            (Phase::Sending, 0, 300, 0, 2)
        );
        assert_eq!(s.reference, "r");
        s.apply(&progress(1, 0, 200));
        s.apply(&progress(1, 120, 200));
        assert_eq!((s.bytes_done, s.layers_done), (120, 0));
        s.apply(&PullEvent::LayerSent {
            index: 1,
            digest: d(2),
            size: 200,
        });
        let line = s.apply(&PullEvent::LayerSent {
            index: 0,
            digest: d(1),
            size: 100,
        });
        assert_eq!(
            line.unwrap(),
            format!("layer 1 {} in the machine (2/2)", &d(1).as_str()[..19])
        );
        assert_eq!((s.bytes_done, s.layers_done), (300, 2));
    }

    #[test]
    fn nothing_to_send_says_nothing() {
        let mut s = PullState::default();
        assert_eq!(
            s.apply(&PullEvent::Sending {
                layers: 0,
                bytes: 0
            }),
            None
        );
        assert_eq!((s.phase, s.layers_total), (Phase::Sending, 0));
    }

    #[test]
    fn a_docker_archive_has_no_digest_up_front() {
        let mut s = PullState::default();
        let line = s.apply(&PullEvent::Resolved {
            reference: "docker-archive:/x.tar".into(),
            digest: None,
            layers: 1,
            bytes: 2048,
        });
        assert_eq!(
            line.unwrap(),
            "resolved docker-archive:/x.tar: 1 layer, 2.00 KiB"
        );
    }
}
