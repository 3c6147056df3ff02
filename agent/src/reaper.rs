//! The one place that waits for child processes.
//!
//! As PID 1 the agent inherits every orphan and must reap them, yet a
//! `waitpid(-1)` also collects the children that exec requests are waiting
//! for. So a single reaper thread owns all waiting and hands each status to
//! the waiter registered for that pid; statuses of unregistered pids
//! (orphans) are dropped.
//!
//! A child can exit before the code that forked it gets to register it. To
//! close that window, [`Reaper::spawn`] holds the table lock across the fork
//! and the registration, and the reaper takes the same lock before it
//! dispatches: every status of one of our children finds its waiter, and a
//! stale status can never be handed to a later child that reuses the pid.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::Pid;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(i32),
}

/// Receives the exit status of one child.
pub struct Waiter {
    status: Mutex<Option<ChildExit>>,
    cv: Condvar,
    /// Becomes readable once the status is in; lets a poll loop wake up.
    event: EventFd,
}

impl Waiter {
    fn new() -> nix::Result<Self> {
        Ok(Waiter {
            status: Mutex::new(None),
            cv: Condvar::new(),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        })
    }

    fn deliver(&self, exit: ChildExit) {
        *lock(&self.status) = Some(exit);
        self.cv.notify_all();
        let _ = self.event.write(1);
    }

    /// The status if the child has been reaped.
    pub fn status(&self) -> Option<ChildExit> {
        *lock(&self.status)
    }

    /// Waits up to `timeout` (forever when `None`) for the status.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ChildExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = lock(&self.status);
        loop {
            if let Some(st) = *s {
                return Some(st);
            }
            match deadline {
                None => s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    s = self
                        .cv
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// An fd that polls readable once the status is in.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }
}

struct Table {
    waiters: HashMap<i32, Arc<Waiter>>,
    /// Bumped at every spawn, so the reaper knows a child may exist again.
    generation: u64,
}

/// Owns `waitpid` for the whole process. One per process: [`Reaper::get`].
pub struct Reaper {
    table: Mutex<Table>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these tables inconsistent (plain
    // inserts and removes), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Reaper {
    /// The process-wide reaper; its thread starts on first use.
    pub fn get() -> &'static Reaper {
        static REAPER: OnceLock<&'static Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            let r: &'static Reaper = Box::leak(Box::new(Reaper {
                table: Mutex::new(Table {
                    waiters: HashMap::new(),
                    generation: 0,
                }),
                cv: Condvar::new(),
            }));
            let spawned = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || r.run());
            if let Err(e) = spawned {
                crate::log(format_args!("cannot start the reaper thread: {e}"));
            }
            r
        })
    }

    /// Runs `fork` (which must return the new child's pid) with the table
    /// locked, and registers a waiter for the child before anyone can reap it.
    pub fn spawn<E>(&self, fork: impl FnOnce() -> Result<Pid, E>) -> Result<(Pid, Arc<Waiter>), E>
    where
        E: From<Errno>,
    {
        let waiter = Arc::new(Waiter::new()?);
        let mut t = lock(&self.table);
        let pid = fork()?;
        t.waiters.insert(pid.as_raw(), waiter.clone());
        t.generation += 1;
        drop(t);
        self.cv.notify_all();
        Ok((pid, waiter))
    }

    fn dispatch(&self, pid: i32, exit: ChildExit) {
        let w = lock(&self.table).waiters.remove(&pid);
        if let Some(w) = w {
            w.deliver(exit);
        }
    }

    fn run(&self) {
        loop {
            let generation = lock(&self.table).generation;
            let mut status: libc::c_int = 0;
            // SAFETY: plain syscall with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
            if pid > 0 {
                if libc::WIFEXITED(status) {
                    self.dispatch(pid, ChildExit::Exited(libc::WEXITSTATUS(status)));
                } else if libc::WIFSIGNALED(status) {
                    self.dispatch(pid, ChildExit::Signaled(libc::WTERMSIG(status)));
                }
                continue;
            }
            match Errno::last() {
                Errno::EINTR => {}
                Errno::ECHILD => {
                    // No children: sleep until the next spawn. The timeout
                    // covers orphans of kernel-spawned helpers that get
                    // re-parented to us without a spawn of ours.
                    let t = lock(&self.table);
                    let _ = self.cv.wait_timeout_while(t, Duration::from_secs(2), |t| {
                        t.generation == generation
                    });
                }
                e => {
                    crate::log(format_args!("waitpid failed: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Whether this process has no children left (exited ones not yet reaped
    /// count as children). Does not reap anything.
    pub fn has_no_children() -> bool {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value and
        // waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; WNOWAIT leaves any zombie for the reaper.
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
            )
        };
        r == -1 && Errno::last() == Errno::ECHILD
    }

    /// Waits up to `timeout` until no child is left; true if none is.
    pub fn wait_no_children(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if Self::has_no_children() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Orphans adopted while the reaper slept on "no children" only
            // get reaped once it looks again: wake it.
            lock(&self.table).generation += 1;
            self.cv.notify_all();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{fork, ForkResult};

    fn fork_exit(code: i32) -> Result<Pid, Errno> {
        // SAFETY: the child only calls the async-signal-safe _exit.
        match unsafe { fork() }? {
            // SAFETY: _exit is async-signal-safe and runs no destructors.
            ForkResult::Child => unsafe { libc::_exit(code) },
            ForkResult::Parent { child } => Ok(child),
        }
    }

    #[test]
    fn status_reaches_the_registered_waiter() {
        let r = Reaper::get();
        let (_, w) = r.spawn(|| fork_exit(7)).unwrap();
        assert_eq!(
            w.wait(Some(Duration::from_secs(10))),
            Some(ChildExit::Exited(7))
        );
        // The eventfd is readable now.
        let mut fds = [libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&w.fd()),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: valid array of one pollfd.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
    }

    #[test]
    fn many_children_each_get_their_own_status() {
        let r = Reaper::get();
        let ws: Vec<_> = (0..20)
            .map(|i| (i, r.spawn(|| fork_exit(i)).unwrap().1))
            .collect();
        for (i, w) in ws {
            assert_eq!(
                w.wait(Some(Duration::from_secs(10))),
                Some(ChildExit::Exited(i))
            );
        }
    }

    #[test]
    fn signal_is_reported() {
        let r = Reaper::get();
        // SAFETY: the child only calls async-signal-safe functions.
        let (pid, w) = r
            .spawn(|| match unsafe { fork() }? {
                ForkResult::Child => loop {
                    // SAFETY: pause only waits for a signal.
                    unsafe { libc::pause() };
                },
                ForkResult::Parent { child } => Ok::<_, Errno>(child),
            })
            .unwrap();
        assert_eq!(w.wait(Some(Duration::from_millis(50))), None);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        assert_eq!(
            w.wait(Some(Duration::from_secs(10))),
            Some(ChildExit::Signaled(9))
        );
    }
}
