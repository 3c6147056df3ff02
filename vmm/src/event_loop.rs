//! The VM's one event-loop thread: an `event_manager::EventManager` running
//! every device subscriber (virtio queue kicks, vsock sockets, block I/O
//! completions) until the VM stops.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::seccomp::{Confirmation, Profile, Spawner};

/// How devices join the loop (the same `Arc` the transport holds).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the event manager: {0}")]
    Manager(String),
    #[error("cannot create the stop eventfd")]
    StopFd(#[source] io::Error),
    #[error("cannot start the event loop thread")]
    Spawn(#[source] io::Error),
}

/// Ends the loop when its eventfd is written.
struct StopOnEvent {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopOnEvent {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the event loop's stop fd");
        }
    }
}

/// An event loop being assembled on the creating thread.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
}

impl EventLoop {
    pub fn new() -> Result<Self, Error> {
        let mut manager =
            EventManager::<Subscriber>::new().map_err(|e| Error::Manager(format!("{e:?}")))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::StopFd)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let sub = StopOnEvent {
            evt: stop.try_clone().map_err(Error::StopFd)?,
            stopped: stopped.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(sub)));
        Ok(EventLoop {
            manager,
            stop,
            stopped,
        })
    }

    /// Adds a subscriber; its `init` registers its fds right away.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Starts the loop thread, under its seccomp filter, from `spawner`.
    pub fn spawn(self, spawner: &Spawner) -> Result<EventLoopHandle, Error> {
        let (handle, filter) = self.spawn_pending(spawner)?;
        filter.wait().map_err(Error::Spawn)?;
        Ok(handle)
    }

    /// [`EventLoop::spawn`], returning before the thread's filter is in
    /// place: the handle stops and joins the thread either way.
    pub fn spawn_pending(
        self,
        spawner: &Spawner,
    ) -> Result<(EventLoopHandle, Confirmation), Error> {
        let EventLoop {
            mut manager,
            stop,
            stopped,
        } = self;
        let pending = spawner
            .spawn_pending("smol-events", Profile::EventLoop, move || {
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        tracing::error!(error = ?e, "event loop failed");
                        break;
                    }
                }
                // Dropping the manager here drops its subscribers' last
                // references on this thread, closing their fds.
            })
            .map_err(Error::Spawn)?;
        Ok((
            EventLoopHandle {
                stop,
                thread: Some(pending.thread),
            },
            pending.filter,
        ))
    }
}

/// The running loop.
pub struct EventLoopHandle {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Stops the loop and joins its thread. Idempotent.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!(error = %e, "cannot signal the event loop to stop");
            }
            if thread.join().is_err() {
                tracing::error!("event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicBool>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            self.seen.store(true, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn serves_subscribers_and_stops() {
        let mut el = EventLoop::new().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicBool::new(false));
        el.add(Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let spawner = Spawner::new().unwrap();
        let mut handle = el.spawn(&spawner).unwrap();
        evt.write(1).unwrap();
        for _ in 0..1000 {
            if seen.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(seen.load(Ordering::SeqCst));
        handle.stop();
        handle.stop();
    }
}
