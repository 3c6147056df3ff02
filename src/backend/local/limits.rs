//! A machine's time limits: `ttl_seconds` (deleted that long after its
//! create) and `auto_stop_seconds` (stopped after that long with no request
//! and no open connection). The handles record activity here; the actor
//! waits for the next limit and enforces it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::config::MachineConfig;

/// When the machine was last used, and how many of its connections are
/// open (an exec, a stream, a file transfer in flight).
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    /// Milliseconds after `base` of the last request.
    last_ms: AtomicU64,
    pub(super) open: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            open: AtomicUsize::new(0),
        })
    }

    /// A request now.
    pub fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> Busy {
        self.touch();
        self.open.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn idle_since(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn busy(&self) -> bool {
        self.open.load(Ordering::SeqCst) > 0
    }
}

/// An open connection of a machine (see [`Activity::open`]).
pub(crate) struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the actor does when a limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    Delete,
    Stop,
}

/// A machine's limits, from its config and record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    delete_at: Option<Instant>,
    auto_stop: Option<Duration>,
}

impl Limits {
    pub fn new(config: &MachineConfig, created_unix: u64) -> Limits {
        let delete_at = config.ttl_seconds.map(|ttl| {
            let now_unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let left = created_unix.saturating_add(ttl).saturating_sub(now_unix);
            Instant::now() + Duration::from_secs(left)
        });
        Limits {
            delete_at,
            auto_stop: config.auto_stop_seconds.map(Duration::from_secs),
        }
    }

    /// When to look again; `running` says whether auto-stop applies.
    pub fn next_check(&self, activity: &Activity, running: bool) -> Option<Instant> {
        let stop_at = match (self.auto_stop, running) {
            (Some(idle), true) if activity.busy() => Some(Instant::now() + idle),
            (Some(idle), true) => Some(activity.idle_since() + idle),
            _ => None,
        };
        match (self.delete_at, stop_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due now, if anything.
    pub fn due(&self, activity: &Activity, running: bool) -> Option<Due> {
        let now = Instant::now();
        if self.delete_at.is_some_and(|at| now >= at) {
            return Some(Due::Delete);
        }
        match self.auto_stop {
            Some(idle) if running && !activity.busy() && now >= activity.idle_since() + idle => {
                Some(Due::Stop)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_open_and_ttl() {
        let config = MachineConfig {
            auto_stop_seconds: Some(10),
            ..MachineConfig::default()
        };
        let a = Activity::new();
        let l = Limits::new(&config, 0);
        assert_eq!(l.due(&a, true), None);
        assert_eq!(l.due(&a, false), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(l.due(&a, true), Some(Due::Stop));
        assert_eq!(
            l.due(&a, false),
            None,
            "a stopped machine is not stopped again"
        );
        // An open connection keeps it up however long it lasts.
        let busy = a.open();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(l.due(&a, true), None);
        drop(busy);
        assert_eq!(l.due(&a, true), None, "closing counts as activity");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(l.due(&a, true), Some(Due::Stop));

        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ttl = MachineConfig {
            ttl_seconds: Some(5),
            ..MachineConfig::default()
        };
        let l = Limits::new(&ttl, now_unix);
        assert_eq!(l.due(&a, true), None);
        assert!(l.next_check(&a, true).is_some());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(l.due(&a, false), Some(Due::Delete));
        // Created long ago: due at once.
        assert_eq!(Limits::new(&ttl, 0).due(&a, true), Some(Due::Delete));
        assert!(Limits::new(&MachineConfig::default(), 0)
            .next_check(&a, true)
            .is_none());
    }
}
