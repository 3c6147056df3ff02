//! The thread that starts a VM's threads for its filtered ones.
//!
//! A seccomp filter passes to the threads its thread starts, so a disk's
//! I/O thread started by the vCPU that activated the disk would run under
//! the vCPU's filter and its own. Instead the vCPU sends the start here:
//! this thread has no filter and runs nothing but these starts.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Pending, Profile};

/// How long a filtered thread waits for its start before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

enum Job {
    Start(Box<dyn FnOnce() + Send>),
    Quit,
}

/// A VM's spawner thread; stopped and joined when dropped.
pub struct Spawner {
    pub(super) handle: SpawnerHandle,
    thread: Option<JoinHandle<()>>,
}

/// What a filtered thread holds to reach its VM's spawner.
#[derive(Clone)]
pub(super) struct SpawnerHandle(mpsc::Sender<Job>);

impl Spawner {
    /// Starts the spawner; call it from a thread with no filter.
    pub fn new() -> io::Result<Spawner> {
        if let Some(profile) = super::current() {
            return Err(io::Error::other(format!(
                "a spawner cannot start on a thread filtered as {profile:?}"
            )));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("smol-spawner".into())
            .spawn(move || {
                while let Ok(Job::Start(start)) = rx.recv() {
                    start();
                }
            })?;
        Ok(Spawner {
            handle: SpawnerHandle(tx),
            thread: Some(thread),
        })
    }

    /// Starts thread `name` under `profile` from the calling (unfiltered)
    /// thread; the threads it starts in turn go through this spawner.
    pub fn spawn<F, T>(&self, name: &str, profile: Profile, f: F) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.spawn_pending(name, profile, f)?.confirm()
    }

    /// [`Spawner::spawn`], returning before the thread's filter is in
    /// place: confirm it with [`Pending::confirm`].
    pub fn spawn_pending<F, T>(&self, name: &str, profile: Profile, f: F) -> io::Result<Pending<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        super::start_pending(name, profile, f, Some(self.handle.clone()))
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Threads still holding a handle (a disk's I/O thread) get an error
        // if they ask for a start after this.
        let _ = self.handle.0.send(Job::Quit);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the spawner thread panicked");
            }
        }
    }
}

impl SpawnerHandle {
    /// Has the spawner start the thread, and waits for it.
    pub(super) fn spawn<F, T>(
        &self,
        name: &str,
        profile: Profile,
        f: F,
    ) -> io::Result<JoinHandle<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let name = name.to_string();
        let delegate = self.clone();
        let job_name = name.clone();
        let job = Job::Start(Box::new(move || {
            let _ = tx.send(super::start(&job_name, profile, f, Some(delegate)));
        }));
        let stopped = || io::Error::other(format!("thread {name}: the VM is stopping"));
        self.0.send(job).map_err(|_| stopped())?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(started) => started,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("thread {name}: not started within {START_TIMEOUT:?}"),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
        }
    }
}
