//! smol's guest agent: PID 1 (`/init`) of the guest.
//!
//! Sets the system up (mounts, hostname, loopback), reaps orphans, serves
//! host requests on vsock, announces readiness on the console, and powers the
//! guest off on a `Shutdown` request or SIGTERM. It must never exit or panic
//! (either is a kernel panic): errors are logged to the console instead.

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

use smol_agent::protocol::{AGENT_PORT, READY_LINE};
use smol_agent::reaper::Reaper;
use smol_agent::server::error_chain;
use smol_agent::server::Agent;
use smol_agent::{log, system, vsock};

mod root;

/// Why the guest powers off.
enum Stop {
    Signal(Signal),
    Request,
}

/// The agent's only signal handler (keep `exec::CAUGHT_SIGNALS` in step).
extern "C" fn ignore_signal(_: libc::c_int) {}

/// Routes SIGTERM to a thread that waits for it. The kernel drops signals to
/// PID 1 whose disposition is the default, so a (no-op) handler is installed
/// too; the signal is blocked in every thread and taken with sigwait.
fn watch_signals(stop: mpsc::Sender<Stop>) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    let action = SigAction::new(
        SigHandler::Handler(ignore_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    if let Err(e) = unsafe { sigaction(Signal::SIGTERM, &action) } {
        log(format_args!("cannot handle SIGTERM: {e}"));
    }
    // Blocked before any other thread starts, so all of them inherit it.
    if let Err(e) = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        log(format_args!("cannot block SIGTERM: {e}"));
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    let _ = stop.send(Stop::Signal(sig));
                }
                Err(e) => {
                    log(format_args!("sigwait failed: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        });
    if let Err(e) = spawned {
        log(format_args!("cannot start the signal thread: {e}"));
    }
}

/// Time spent in each set-up step, reported on the ready log line: on
/// kvm_pvm hosts every system call is emulated, and this says which step
/// pays for it.
struct Steps {
    started: std::time::Instant,
    last: std::time::Instant,
    done: Vec<(&'static str, u128)>,
}

impl Steps {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Steps {
            started: now,
            last: now,
            done: Vec::new(),
        }
    }

    fn step(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((name, (now - self.last).as_millis()));
        self.last = now;
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .done
            .iter()
            .map(|(name, ms)| format!("{name} {ms}"))
            .collect();
        format!(
            "{} ms ({})",
            self.started.elapsed().as_millis(),
            parts.join(", ")
        )
    }
}

fn run() -> ! {
    let mut steps = Steps::new();
    std::env::set_var("PATH", system::DEFAULT_PATH);
    std::env::set_var("HOME", "/root");
    let (stop_tx, stop_rx) = mpsc::channel();
    watch_signals(stop_tx.clone());
    system::mount_early();
    system::ensure_std_fds();
    let cmdline = system::read_cmdline();
    steps.step("mounts");
    match root::disk_device(&cmdline) {
        None => {}
        Some(Ok(device)) => match root::switch_to_disk_root(&device) {
            Ok(()) => log(format_args!("root is an overlay on {device}")),
            Err(e) => log(format_args!(
                "{}; the root stays in memory",
                error_chain(&e)
            )),
        },
        Some(Err(e)) => log(format_args!("{e}; the root stays in memory")),
    }
    steps.step("root");
    system::mount_runtime();
    system::set_hostname(&cmdline);
    system::loopback_up();
    Reaper::get();
    steps.step("runtime");

    let stop_tx = Mutex::new(stop_tx);
    let agent = Agent::new(move || {
        let _ = stop_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Stop::Request);
    });
    match vsock::listen_on(AGENT_PORT) {
        Ok(listener) => {
            let agent = Arc::clone(&agent);
            let spawned = std::thread::Builder::new()
                .name("vsock".into())
                .spawn(move || vsock::accept_loop(listener, agent));
            if let Err(e) = spawned {
                log(format_args!("cannot start the vsock thread: {e}"));
            }
        }
        Err(e) => log(format_args!("{}; serving no requests", error_chain(&e))),
    }
    steps.step("vsock");

    let uptime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            format!(
                ", {:.1} s after kernel start",
                t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
            )
        })
        .unwrap_or_default();
    log(format_args!("set up in {}{uptime}", steps.summary()));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{READY_LINE}");
    let _ = out.flush();
    drop(out);

    match stop_rx.recv() {
        Ok(Stop::Signal(sig)) => log(format_args!("{sig} received")),
        Ok(Stop::Request) => log("shutdown requested"),
        Err(_) => log("shutdown channel closed"),
    }
    system::power_off()
}

fn main() {
    std::panic::set_hook(Box::new(|info| log(format_args!("panic: {info}"))));
    if std::process::id() != 1 {
        log("must run as PID 1 (/init) inside a smol guest");
        std::process::exit(2);
    }
    // A panic on the main thread would end PID 1 and panic the kernel:
    // power off cleanly instead.
    if std::panic::catch_unwind(AssertUnwindSafe(|| run())).is_err() {
        log("fatal error in the agent");
    }
    system::power_off()
}
