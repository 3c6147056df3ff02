//! Shared helpers of the integration tests that boot real guests.
//!
//! Guests boot slowly on kvm_pvm hosts (~20 s), so a test boots one machine
//! and runs many named checks on it; each check is reported as it ends
//! (straight to stderr, past the test harness's capture) and the test fails
//! at the end listing every failed check.

#![allow(dead_code)]

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Prints a line to the terminal even when the harness captures output.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Fails a check with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

pub type CheckResult = Result<(), String>;

/// A check failing with a message that starts with this is reported as
/// SKIPPED, not passed: a defect of the kvm_pvm host that the check saw and
/// that is known not to be ours. Only ever returned on kvm_pvm hosts.
pub const HOST_DEFECT: &str = "kvm_pvm host defect: ";

/// A check failing with a message that starts with this is reported as
/// SKIPPED, not passed: what it needs is missing on this host (a tool that
/// `cargo xtask test` installs), so it could not run.
pub const CANNOT_RUN_HERE: &str = "cannot run on this host: ";

/// Adds context to any error, turning it into a check failure message.
pub trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::error::Error> Ctx<T> for Result<T, E> {
    /// The error with its causes, which name what went wrong deep down.
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| {
            let mut text = format!("{what}: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        })
    }
}

/// Named checks run in sequence; failures are collected, not fatal.
pub struct Checks {
    suite: &'static str,
    /// Homes whose machines' consoles a check that times out prints.
    watched: Vec<PathBuf>,
    passed: Vec<String>,
    skipped: Vec<String>,
    failed: Vec<String>,
}

impl Checks {
    pub fn new(suite: &'static str) -> Self {
        Checks {
            suite,
            watched: Vec::new(),
            passed: Vec::new(),
            skipped: Vec::new(),
            failed: Vec::new(),
        }
    }

    pub async fn run<F: Future<Output = CheckResult>>(&mut self, name: &str, check: F) -> bool {
        let t = Instant::now();
        let r = match tokio::time::timeout(CHECK_LIMIT, check).await {
            Ok(r) => r,
            Err(_) => {
                print_consoles(self.suite, &self.watched);
                Err(format!(
                    "did not finish within {CHECK_LIMIT:?} (the consoles of the watched machines are printed above)"
                ))
            }
        };
        let took = t.elapsed();
        match r {
            Ok(()) => {
                report!("[{}] ok     {name} ({took:.2?})", self.suite);
                self.passed.push(name.to_string());
                true
            }
            Err(e) if e.starts_with(HOST_DEFECT) || e.starts_with(CANNOT_RUN_HERE) => {
                report!("[{}] SKIPPED {name} ({took:.2?}): {e}", self.suite);
                self.skipped.push(name.to_string());
                false
            }
            Err(e) => {
                report!("[{}] FAILED {name} ({took:.2?}): {e}", self.suite);
                self.failed.push(format!("{name}: {e}"));
                false
            }
        }
    }

    /// A check that times out prints the consoles of the machines in `home`.
    pub fn watch(&mut self, home: &Path) {
        self.watched.push(home.to_path_buf());
    }

    pub fn failures(&self) -> usize {
        self.failed.len()
    }

    /// Panics with every failure if any check failed.
    pub fn finish(self) {
        report!(
            "[{}] {} checks passed, {} skipped, {} failed",
            self.suite,
            self.passed.len(),
            self.skipped.len(),
            self.failed.len()
        );
        if !self.failed.is_empty() {
            panic!(
                "{} failed checks:\n  {}",
                self.failed.len(),
                self.failed.join("\n  ")
            );
        }
    }
}

/// Longest a single check may take: a guest that stops answering fails
/// its check instead of stalling the run (an exec takes seconds here).
pub const CHECK_LIMIT: Duration = Duration::from_secs(600);

/// Longest a whole guest test may take before its [`Watchdog`] ends it.
pub const TEST_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The console tails of every machine under `<home>/machines`.
pub fn print_consoles(suite: &str, homes: &[PathBuf]) {
    for home in homes {
        let dirs = std::fs::read_dir(home.join("machines"))
            .into_iter()
            .flatten()
            .flatten();
        for d in dirs {
            let log = d.path().join("console.log");
            if log.exists() {
                report!(
                    "[{suite}] console of {}:\n{}",
                    d.file_name().to_string_lossy(),
                    console_tail(&log, 40)
                );
            }
        }
    }
}

/// Ends the test process if it still runs after its limit, printing the
/// consoles of the machines under its homes first: a guest call that never
/// returns fails the run with what the guests printed, instead of holding
/// CI until its own deadline. Disarmed when dropped.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

pub fn watchdog(suite: &'static str, homes: &[&Path], limit: Duration) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let homes: Vec<PathBuf> = homes.iter().map(|h| h.to_path_buf()).collect();
    let flag = done.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if flag.load(Ordering::SeqCst) {
            return;
        }
        report!("[{suite}] WATCHDOG: the test is still running after {limit:?}; ending it");
        print_consoles(suite, &homes);
        // Helpers (registries, servers) must not outlive the test.
        for pid in children() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::process::exit(101);
    });
    Watchdog { done }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// A multi-threaded runtime whose idle blocking threads end quickly, so
/// thread counts settle soon after a machine is gone.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(Duration::from_millis(300))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic pseudo-random bytes (xorshift), cheap for large sizes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Threads and open fds of this process.
pub fn threads_and_fds() -> (usize, usize) {
    (count_dir("/proc/self/task"), count_dir("/proc/self/fd"))
}

/// Child processes of this process (all threads).
pub fn children() -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(c.split_whitespace().map(str::to_string));
        }
    }
    out
}

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a console log.
pub fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Nothing of a machine directory remains.
pub fn gone(dir: &Path) -> bool {
    !dir.exists()
}

/// Flushes stderr (reports are unbuffered, this is for symmetry).
pub fn flush() {
    let _ = std::io::stderr().flush();
}

/// Runs `script` with `sh -c` on `m`; its trimmed stdout, or an error
/// naming the script, the machine, the exit code and stderr.
pub async fn sh(m: &smol::Machine, script: &str) -> Result<String, String> {
    let r = m
        .exec(["sh", "-c", script])
        .await
        .ctx(&format!("exec on {}", m.name()))?;
    if r.exit_code != 0 {
        return Err(format!(
            "{script:?} on {} exited {}: {}",
            m.name(),
            r.exit_code,
            r.stderr_lossy()
        ));
    }
    Ok(r.stdout_lossy().trim().to_string())
}
