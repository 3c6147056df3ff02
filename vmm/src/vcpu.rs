//! The vCPU run loop: one thread per vCPU, serving port I/O and MMIO exits
//! from the buses until the VM ends.
//!
//! A host-initiated stop must get a vCPU out of `KVM_RUN` even while the
//! guest idles in HLT inside the kernel: the stopper sets the stop flag and
//! signals the thread. The signal handler sets `immediate_exit` in the
//! thread's `kvm_run`, so a signal that lands just before `KVM_RUN` is
//! entered still makes it return at once (with EINTR) instead of being lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::{lock, Bus};
use crate::exit::ExitState;
use crate::snapshot::{self, vcpu::VcpuState};
use crate::ExitReason;

thread_local! {
    /// This thread's `kvm_run` mapping, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: one volatile store into this thread's
    // own kvm_run page.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread from its VcpuFd's
        // kvm_run mapping, which outlives the run loop (it is cleared before
        // the VcpuFd drops); `immediate_exit` is a plain u8 KVM reads on entry.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler, once per process.
pub fn install_kick_handler() -> Result<(), kvm_ioctls::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick);
    });
    result
}

/// Buses shared by every vCPU.
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Parks every vCPU outside `KVM_RUN` for a snapshot: each saves its own
/// state on its thread, then waits until [`PauseControl::resume`].
///
/// Pauses are numbered: a vCPU still parked from the previous pause when
/// the next one begins (a resume and a new pause in quick succession)
/// saves its state again for the new one instead of being counted stale.
pub struct PauseControl {
    /// Fast check for the vCPU loop; the truth is in `state`.
    requested: AtomicBool,
    state: Mutex<PauseState>,
    cond: Condvar,
    msrs: Vec<u32>,
}

type SavedState = Result<VcpuState, snapshot::Error>;

struct PauseState {
    requested: bool,
    generation: u64,
    /// Per vCPU: the pause it saved for, and what it saved.
    parked: Vec<Option<(u64, SavedState)>>,
}

impl PauseControl {
    /// For `count` vCPUs whose MSRs `msrs` are saved.
    pub fn new(count: usize, msrs: Vec<u32>) -> Self {
        PauseControl {
            requested: AtomicBool::new(false),
            state: Mutex::new(PauseState {
                requested: false,
                generation: 0,
                parked: (0..count).map(|_| None).collect(),
            }),
            cond: Condvar::new(),
            msrs,
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// vCPU side, after `KVM_RUN` returned EINTR (so no I/O is pending):
    /// saves the state and waits for the resume (or the VM's end).
    fn park(&self, id: u8, fd: &VcpuFd, exit: &ExitState) {
        self.park_with(id, exit, || snapshot::vcpu::save(fd, &self.msrs));
    }

    /// [`PauseControl::park`] with the state saved by `save`.
    fn park_with(&self, id: u8, exit: &ExitState, mut save: impl FnMut() -> SavedState) {
        let mut st = lock(&self.state);
        while st.requested && !exit.should_stop() {
            let generation = st.generation;
            drop(st);
            let saved = save();
            st = lock(&self.state);
            if st.generation == generation {
                if let Some(slot) = st.parked.get_mut(id as usize) {
                    *slot = Some((generation, saved));
                }
                self.cond.notify_all();
            }
            while st.requested && st.generation == generation && !exit.should_stop() {
                st = self
                    .cond
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            // Resumed, stopped, or a newer pause: save again for that one.
        }
    }

    /// Parks every vCPU and returns their states, in id order. On an error
    /// the vCPUs are resumed.
    pub fn pause(
        &self,
        exit: &ExitState,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, snapshot::Error> {
        let deadline = Instant::now() + timeout;
        let generation = {
            let mut st = lock(&self.state);
            st.generation += 1;
            st.requested = true;
            self.requested.store(true, Ordering::SeqCst);
            self.cond.notify_all();
            st.generation
        };
        exit.kick_vcpus();
        let mut st = lock(&self.state);
        loop {
            let done = st
                .parked
                .iter()
                .all(|s| matches!(s, Some((g, _)) if *g == generation));
            if done {
                break;
            }
            let now = Instant::now();
            if exit.should_stop() || now >= deadline {
                drop(st);
                self.resume();
                return Err(snapshot::Error::Pause(if exit.should_stop() {
                    "the vm stopped".into()
                } else {
                    format!("the vcpus did not stop within {timeout:?}")
                }));
            }
            st = self
                .cond
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let states: Vec<_> = st.parked.iter_mut().map(|s| s.take()).collect();
        drop(st);
        let mut out = Vec::with_capacity(states.len());
        for (_, saved) in states.into_iter().flatten() {
            match saved {
                Ok(state) => out.push(state),
                Err(e) => {
                    self.resume();
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut st = lock(&self.state);
        st.requested = false;
        self.requested.store(false, Ordering::SeqCst);
        self.cond.notify_all();
    }
}

/// One vCPU and what its thread needs.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub buses: Arc<Buses>,
    pub exit: Arc<ExitState>,
    pub pause: Arc<PauseControl>,
    /// The boot vCPU reports the instant of its first `KVM_RUN`.
    pub first_run: Option<Sender<Instant>>,
}

/// Clears this thread's `kvm_run` pointer for the kick handler when the
/// run loop ends, returning or unwinding; a panic also ends the VM.
struct RunGuard {
    exit: Arc<ExitState>,
    id: u8,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        if std::thread::panicking() {
            self.exit.finish(ExitReason::Crashed(format!(
                "the monitor's vcpu {} thread panicked",
                self.id
            )));
        }
    }
}

impl Vcpu {
    /// Runs until the VM ends; records a crash or a guest shutdown in the
    /// exit state.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        // Declared after `self`, so dropped before it (and its VcpuFd):
        // the pointer is gone before the mapping, even when a panic
        // unwinds out of `run_once`, and the VM then stops.
        let _guard = RunGuard {
            exit: self.exit.clone(),
            id: self.id,
        };
        // Unblock the kick signal in case the creating thread had it blocked.
        let _ = vmm_sys_util::signal::unblock_signal(kick_signal());

        if let Some(tx) = self.first_run.take() {
            let _ = tx.send(Instant::now());
        }
        while !self.exit.should_stop() {
            if let Some(reason) = self.run_once() {
                self.exit.finish(reason);
                break;
            }
        }
        tracing::debug!(vcpu = self.id, "vcpu thread done");
    }

    /// One `KVM_RUN` and the handling of its exit; `Some` ends the VM.
    fn run_once(&mut self) -> Option<ExitReason> {
        let buses = &self.buses;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !buses.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.pio.write(port as u64, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !buses.mmio.read(addr, data) {
                    tracing::debug!(addr, "mmio read outside any device");
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !buses.mmio.write(addr, data) {
                    tracing::debug!(addr, "mmio write outside any device");
                }
                None
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel irqchip; ours has one.
                None
            }
            Ok(VcpuExit::Shutdown) => Some(ExitReason::Crashed(format!(
                "vcpu {}: triple fault (kvm shutdown exit)",
                self.id
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    Some(ExitReason::GuestShutdown)
                }
                other => Some(ExitReason::Crashed(format!(
                    "vcpu {}: kvm system event {other}",
                    self.id
                ))),
            },
            Ok(VcpuExit::InternalError) => Some(ExitReason::Crashed(self.internal_error())),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Crashed(format!(
                "vcpu {}: kvm entry failed, hardware reason {reason:#x} on cpu {cpu}",
                self.id
            ))),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => {
                tracing::debug!(vcpu = self.id, exit = ?other, "unhandled vcpu exit");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Cleared before the checks: a kick landing after them
                // sets it again and the next KVM_RUN returns at once.
                self.fd.set_kvm_immediate_exit(0);
                if self.exit.take_sample_request() {
                    self.log_state();
                }
                if self.pause.requested() {
                    self.pause.park(self.id, &self.fd, &self.exit);
                }
                None
            }
            Err(e) => Some(ExitReason::Crashed(format!(
                "vcpu {}: KVM_RUN failed: {e}",
                self.id
            ))),
        }
    }

    /// Logs where the guest is: instruction pointer and privilege level.
    fn log_state(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => tracing::info!(
                vcpu = self.id,
                rip = format_args!("{:#x}", regs.rip),
                rsp = format_args!("{:#x}", regs.rsp),
                cpl = sregs.cs.dpl,
                rax = format_args!("{:#x}", regs.rax),
                "vcpu state"
            ),
            (Err(e), _) | (_, Err(e)) => {
                tracing::info!(vcpu = self.id, error = %e, "vcpu state unreadable")
            }
        }
    }

    /// "KVM internal error" with its suberror and where the guest was.
    fn internal_error(&mut self) -> String {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR, `internal` is the union
        // member KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let rip = self
            .fd
            .get_regs()
            .map(|r| format!("{:#x}", r.rip))
            .unwrap_or_else(|_| "?".into());
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let suberror = match internal.suberror {
            1 => " (emulation failure)".to_string(),
            2 => " (simultaneous exception)".to_string(),
            3 => " (delivery event failure)".to_string(),
            _ => String::new(),
        };
        format!(
            "vcpu {}: kvm internal error, suberror {}{suberror}, rip {rip}, data {:x?}",
            self.id,
            internal.suberror,
            &internal.data[..ndata]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_to_back_pauses_each_get_the_state() {
        // A vCPU stand-in that parks whenever asked; the host side pauses
        // and resumes as fast as it can, so a new pause often begins before
        // the vCPU has seen the last resume.
        let pause = Arc::new(PauseControl::new(1, Vec::new()));
        let exit = Arc::new(ExitState::new());
        let saves = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let vcpu = {
            let (pause, exit, saves) = (pause.clone(), exit.clone(), saves.clone());
            std::thread::spawn(move || {
                while !exit.should_stop() {
                    if pause.requested() {
                        pause.park_with(0, &exit, || {
                            saves.fetch_add(1, Ordering::SeqCst);
                            Err(snapshot::Error::NotRunning)
                        });
                    }
                    std::hint::spin_loop();
                }
            })
        };
        for i in 0..2000 {
            match pause.pause(&exit, Duration::from_secs(5)) {
                Err(snapshot::Error::NotRunning) => {}
                other => panic!("pause {i}: {other:?}"),
            }
            pause.resume();
        }
        assert!(saves.load(Ordering::SeqCst) >= 2000);
        exit.finish(crate::ExitReason::HostStop);
        vcpu.join().unwrap();
    }
}
