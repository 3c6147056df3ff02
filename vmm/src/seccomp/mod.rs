//! Per-thread seccomp filters, as Firecracker has them: every thread the
//! monitor starts for a VM (vCPUs, the event loop, disk I/O, the console
//! writer, the vhost-user watchdog, PIT tuning) runs under a BPF filter that
//! allows only the syscalls that thread needs ([`profiles`]). A guest that
//! takes over device emulation on one of them cannot open a file, start a
//! process, make an internet socket or issue an ioctl outside its list.
//!
//! A refused call fails with `EPERM` rather than killing the process: the
//! monitor runs inside the user's own process, whose other work must not
//! die because of one VM. `SMOL_SECCOMP=log` allows and logs the calls a
//! profile lacks (the kernel's audit records of type 1326, in `dmesg`), and
//! `SMOL_SECCOMP=off` installs no filter.
//!
//! Filters are inherited by threads a filtered thread starts, so a filtered
//! thread never starts one itself: [`spawn`] hands the start to the VM's
//! [`Spawner`], a thread with no filter of its own that runs no guest-driven
//! code, and the new thread gets only its own profile.

mod profiles;
mod spawner;

use std::cell::RefCell;
use std::io;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use spawner::Spawner;
use spawner::SpawnerHandle;

/// Which monitor thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Vcpu,
    EventLoop,
    BlockIo,
    Console,
    VhostWatch,
    PitTuning,
}

impl Profile {
    const ALL: [Profile; 6] = [
        Profile::Vcpu,
        Profile::EventLoop,
        Profile::BlockIo,
        Profile::Console,
        Profile::VhostWatch,
        Profile::PitTuning,
    ];

    fn index(self) -> usize {
        Profile::ALL
            .iter()
            .position(|p| *p == self)
            .unwrap_or_default()
    }
}

/// What a filter does with a call its profile lacks (`SMOL_SECCOMP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Refuse it with `EPERM` (the default).
    Enforce,
    /// Allow it and have the kernel log it.
    Log,
    /// Install no filter.
    Off,
}

impl Mode {
    /// The mode `SMOL_SECCOMP` asks for, read once per process.
    pub fn from_env() -> Mode {
        // libFuzzer writes a crash's input from the crashing thread, which
        // a filter would keep from opening the file.
        if cfg!(fuzzing) {
            return Mode::Off;
        }
        static MODE: OnceLock<Mode> = OnceLock::new();
        *MODE.get_or_init(|| {
            let value = std::env::var("SMOL_SECCOMP").unwrap_or_default();
            match value.as_str() {
                "" | "enforce" | "on" | "1" => Mode::Enforce,
                "log" => Mode::Log,
                "off" | "0" => Mode::Off,
                other => {
                    tracing::warn!(
                        "SMOL_SECCOMP={other:?} is not one of enforce, log or off; enforcing"
                    );
                    Mode::Enforce
                }
            }
        })
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp profile {profile:?}: {reason}")]
    Compile { profile: Profile, reason: String },
    #[error("cannot install the seccomp filter of {profile:?}: {reason}")]
    Install { profile: Profile, reason: String },
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::other(e)
    }
}

/// The compiled filter of `profile` in `mode` (`None` when off), built once
/// per process.
fn program(profile: Profile, mode: Mode) -> Result<Option<&'static BpfProgram>, Error> {
    type Compiled = OnceLock<Result<BpfProgram, String>>;
    static ENFORCE: [Compiled; 6] = [const { OnceLock::new() }; 6];
    static LOG: [Compiled; 6] = [const { OnceLock::new() }; 6];
    let (slots, mismatch) = match mode {
        Mode::Off => return Ok(None),
        Mode::Enforce => (&ENFORCE, SeccompAction::Errno(libc::EPERM as u32)),
        Mode::Log => (&LOG, SeccompAction::Log),
    };
    let compiled = slots[profile.index()].get_or_init(|| {
        let rules =
            profiles::rules(profile, crate::vcpu::kick_signal()).map_err(|e| e.to_string())?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch())
            .map_err(|e| e.to_string())?;
        BpfProgram::try_from(filter).map_err(|e| e.to_string())
    });
    match compiled {
        Ok(program) => Ok(Some(program)),
        Err(reason) => Err(Error::Compile {
            profile,
            reason: reason.clone(),
        }),
    }
}

#[cfg(target_arch = "x86_64")]
fn arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn arch() -> TargetArch {
    TargetArch::aarch64
}

/// Puts the calling thread under `profile` in `mode`. Irreversible.
pub fn install(profile: Profile, mode: Mode) -> Result<(), Error> {
    let Some(program) = program(profile, mode)? else {
        return Ok(());
    };
    // glibc gives a thread its malloc arena on its first allocation, and
    // sizes the arena pool from /sys/devices/system/cpu/online: allocate
    // once now, while that read is still allowed.
    drop(std::hint::black_box(Vec::<u64>::with_capacity(4)));
    seccompiler::apply_filter(program).map_err(|e| Error::Install {
        profile,
        reason: e.to_string(),
    })?;
    FILTERED.with(|f| *f.borrow_mut() = Some(profile));
    Ok(())
}

thread_local! {
    /// The filter this thread runs under, if any.
    static FILTERED: RefCell<Option<Profile>> = const { RefCell::new(None) };
    /// Where this thread sends the threads it starts: its VM's spawner.
    static DELEGATE: RefCell<Option<SpawnerHandle>> = const { RefCell::new(None) };
}

/// The filter the calling thread runs under, if any.
pub fn current() -> Option<Profile> {
    FILTERED.with(|f| *f.borrow())
}

/// The payload a thread whose filter failed unwinds with: silently (no
/// panic hook), since [`spawn`] already returned the error.
struct FilterFailed;

/// Starts thread `name` under `profile` running `f`.
///
/// On a thread of a VM this goes through the VM's [`Spawner`]; anywhere
/// else (the thread that builds a VM, a test) it starts the thread here.
/// Returns once the filter is in place, or with the error that kept it out.
pub fn spawn<F, T>(name: &str, profile: Profile, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match DELEGATE.with(|d| d.borrow().clone()) {
        Some(spawner) => spawner.spawn(name, profile, f),
        None if current().is_some() => Err(io::Error::other(format!(
            "thread {name}: a filtered thread with no spawner cannot start threads"
        ))),
        None => start(name, profile, f, None),
    }
}

/// Starts the thread from the calling one; its own spawns go to `delegate`.
fn start<F, T>(
    name: &str,
    profile: Profile,
    f: F,
    delegate: Option<SpawnerHandle>,
) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    start_pending(name, profile, f, delegate)?.confirm()
}

/// [`start`], returning before the filter is in place: a VM starts all its
/// threads, then waits for their filters together.
fn start_pending<F, T>(
    name: &str,
    profile: Profile,
    f: F,
    delegate: Option<SpawnerHandle>,
) -> io::Result<Pending<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mode = Mode::from_env();
    let (tx, rx) = mpsc::sync_channel::<Result<(), Error>>(1);
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            DELEGATE.with(|d| *d.borrow_mut() = delegate);
            let installed = install(profile, mode);
            let ok = installed.is_ok();
            let _ = tx.send(installed);
            if !ok {
                std::panic::resume_unwind(Box::new(FilterFailed));
            }
            f()
        })?;
    Ok(Pending {
        thread,
        filter: Confirmation {
            installed: rx,
            name: name.to_string(),
        },
    })
}

/// A thread started whose filter may not be in place yet; it runs nothing
/// of its own before it is.
pub struct Pending<T> {
    pub thread: JoinHandle<T>,
    pub filter: Confirmation,
}

impl<T> Pending<T> {
    /// Waits until the thread runs under its filter ([`Confirmation::wait`]).
    pub fn confirm(self) -> io::Result<JoinHandle<T>> {
        self.filter.wait()?;
        Ok(self.thread)
    }
}

/// The word of a [`Pending`] thread that its filter is in place.
pub struct Confirmation {
    installed: mpsc::Receiver<Result<(), Error>>,
    name: String,
}

impl Confirmation {
    /// Waits until the thread runs under its filter, or returns the error
    /// that kept the filter out (the thread then ends without running).
    pub fn wait(self) -> io::Result<()> {
        match self.installed.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(io::Error::other(format!(
                "thread {} ended before its seccomp filter was in place",
                self.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
