//! How a VM's run ends: the first exit reason wins, every vCPU is kicked out
//! of `KVM_RUN`, and waiters are woken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::lock;
use crate::ExitReason;

/// Shared by the vCPU threads, the devices that can end the VM (i8042,
/// console) and the [`crate::Vm`] handle.
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
    stop: AtomicBool,
    /// Set by [`ExitState::sample_vcpus`]: vCPUs log where they are.
    sample: AtomicBool,
    panic_line: Mutex<Option<String>>,
    /// vCPU threads to signal; emptied before they are joined so that no
    /// stale thread id is ever signalled.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
}

impl Default for ExitState {
    fn default() -> Self {
        Self::new()
    }
}

impl ExitState {
    pub fn new() -> Self {
        ExitState {
            reason: Mutex::new(None),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            sample: AtomicBool::new(false),
            panic_line: Mutex::new(None),
            vcpu_threads: Mutex::new(Vec::new()),
        }
    }

    /// Whether vCPUs must leave their run loop.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Kicks every vCPU out of `KVM_RUN` once so that it logs its
    /// registers, then lets it run on: for diagnosing a guest that hangs.
    pub fn sample_vcpus(&self) {
        self.sample.store(true, Ordering::SeqCst);
        self.kick_vcpus();
    }

    /// Whether a sample was requested (and clears the request).
    pub fn take_sample_request(&self) -> bool {
        self.sample.swap(false, Ordering::SeqCst)
    }

    /// Records `reason` unless one is already recorded, stops every vCPU
    /// and wakes waiters.
    pub fn finish(&self, reason: ExitReason) {
        {
            let mut r = lock(&self.reason);
            if r.is_none() {
                tracing::debug!(?reason, "vm exit");
                *r = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.cond.notify_all();
        self.kick_vcpus();
    }

    /// The guest reset the machine (i8042 0xfe). After a kernel panic
    /// (`panic=-1` reboots at once) that is a crash, not a shutdown.
    pub fn guest_reset(&self) {
        match lock(&self.panic_line).clone() {
            Some(line) => self.finish(ExitReason::Crashed(line)),
            None => self.finish(ExitReason::GuestShutdown),
        }
    }

    /// The console showed a kernel panic line.
    pub fn note_panic(&self, line: String) {
        let mut p = lock(&self.panic_line);
        if p.is_none() {
            *p = Some(line);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Blocks until an exit reason is recorded or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut r = lock(&self.reason);
        loop {
            if let Some(reason) = r.clone() {
                return Some(reason);
            }
            match deadline {
                None => r = self.cond.wait(r).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    r = self
                        .cond
                        .wait_timeout(r, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    pub fn add_vcpu_thread(&self, thread: libc::pthread_t) {
        lock(&self.vcpu_threads).push(thread);
    }

    /// Signals every registered vCPU thread (see `vcpu::kick_signal`).
    pub fn kick_vcpus(&self) {
        let threads = lock(&self.vcpu_threads);
        for t in threads.iter() {
            // SAFETY: every id in the list belongs to a vCPU thread that has
            // not been joined yet (`forget_vcpu_threads` empties the list
            // before joining), so it is a valid pthread_t; the signal has a
            // handler installed before any vCPU thread starts.
            unsafe {
                libc::pthread_kill(*t, crate::vcpu::kick_signal());
            }
        }
    }

    /// Kicks every vCPU one last time and forgets their ids, before joining.
    pub fn forget_vcpu_threads(&self) {
        self.kick_vcpus();
        lock(&self.vcpu_threads).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins() {
        let s = ExitState::new();
        assert_eq!(s.reason(), None);
        assert!(!s.should_stop());
        s.guest_reset();
        s.finish(ExitReason::HostStop);
        assert_eq!(s.reason(), Some(ExitReason::GuestShutdown));
        assert!(s.should_stop());
    }

    #[test]
    fn reset_after_panic_is_a_crash() {
        let s = ExitState::new();
        s.note_panic("Kernel panic - not syncing: Attempted to kill init!".into());
        s.guest_reset();
        assert!(matches!(s.reason(), Some(ExitReason::Crashed(l)) if l.contains("kill init")));
    }

    #[test]
    fn wait_times_out_then_sees_the_exit() {
        let s = Arc::new(ExitState::new());
        assert_eq!(s.wait(Some(Duration::from_millis(10))), None);
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait(None));
        std::thread::sleep(Duration::from_millis(10));
        s.finish(ExitReason::HostStop);
        assert_eq!(t.join().unwrap(), Some(ExitReason::HostStop));
    }
}
