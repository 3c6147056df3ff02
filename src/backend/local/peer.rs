//! A machine that another live process runs, driven from this one.
//!
//! The owner process keeps the VM, its lock and its lifecycle. Another
//! process that connects gets a [`LocalMachine`](super::LocalMachine) like
//! the owner's, whose execs, streams, files and images go straight to the
//! running guest through the monitor's vsock socket (as the owner's do),
//! but whose commands are answered here instead of by an actor with a VM:
//! the state follows the owner, and lifecycle calls (start of a stopped
//! machine, stop, delete, snapshot, fork) are [`Error::InUse`] naming the
//! owner, at once. Once the owner lets go, `Machine::connect` takes the
//! machine over.

use tokio::sync::mpsc;

use super::actor::Command;
use super::store::{holder, MachinePaths};
use crate::error::{Error, Result};
use crate::state::MachineState;

/// Answers `rx`'s commands for the machine `name` at `paths`, which the
/// process `owner` (from its lock file, when it names one) runs.
pub(crate) async fn serve(
    mut rx: mpsc::Receiver<Command>,
    name: String,
    paths: MachinePaths,
    owner: Option<u32>,
) {
    let in_use = || Error::InUse {
        name: name.clone(),
        pid: owner,
    };
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::State(tx) => {
                let _ = tx.send(state(&name, &paths, owner).await);
            }
            Command::Timings(tx) => {
                let _ = tx.send(None);
            }
            // Nothing to do while the owner runs it.
            Command::Start(_, tx) => {
                let r = match state(&name, &paths, owner).await {
                    Ok(MachineState::Running) => Ok(()),
                    Ok(_) => Err(in_use()),
                    Err(e) => Err(e),
                };
                let _ = tx.send(r);
            }
            Command::Restore(_, _, tx) | Command::Stop(tx) | Command::Delete(tx) => {
                let _ = tx.send(Err(in_use()));
            }
            Command::Snapshot(_, tx) => {
                let _ = tx.send(Err(in_use()));
            }
        }
    }
}

/// Running while the owner that was found still holds the machine and its
/// monitor's socket is there; else stopped (or gone).
async fn state(name: &str, paths: &MachinePaths, owner: Option<u32>) -> Result<MachineState> {
    let (lock, vsock, dir) = (paths.lock.clone(), paths.vsock.clone(), paths.dir.clone());
    let (held, socket, exists) =
        tokio::task::spawn_blocking(move || (holder(&lock), vsock.exists(), dir.is_dir()))
            .await
            .map_err(|e| Error::Internal(format!("state probe task: {e}")))?;
    if !exists {
        return Err(Error::NotFound { name: name.into() });
    }
    let same_owner = held.is_some() && (owner.is_none() || held == owner);
    Ok(if same_owner && socket {
        MachineState::Running
    } else {
        MachineState::Stopped
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::store::MachineStore;
    use crate::config::MachineConfig;
    use tokio::sync::oneshot;

    async fn ask<T>(
        tx: &mpsc::Sender<Command>,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> T {
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply)).await.unwrap();
        rx.await.unwrap()
    }

    fn is_in_use(r: Result<()>, pid: u32) -> bool {
        matches!(r, Err(Error::InUse { name, pid: Some(p) }) if name == "p" && p == pid)
    }

    #[tokio::test]
    async fn state_follows_the_owner_and_lifecycle_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let store = MachineStore::open(Some(t.path())).unwrap();
        // The lock held here stands for the owner's: its file names our pid.
        let (_record, paths, lock) = store
            .reserve(&MachineConfig::default().name("p").persistent(true))
            .unwrap();
        let me = std::process::id();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve(rx, "p".into(), paths.clone(), Some(me)));

        let state = |tx| async move { ask(tx, Command::State).await };
        assert_eq!(
            state(&tx).await.unwrap(),
            MachineState::Stopped,
            "no socket yet"
        );
        assert!(is_in_use(
            ask(&tx, |r| Command::Start(Default::default(), r)).await,
            me
        ));
        std::fs::write(&paths.vsock, b"").unwrap();
        assert_eq!(state(&tx).await.unwrap(), MachineState::Running);
        assert!(ask(&tx, |r| Command::Start(Default::default(), r))
            .await
            .is_ok());
        assert!(ask(&tx, Command::Timings).await.is_none());
        assert!(is_in_use(ask(&tx, Command::Stop).await, me));
        assert!(is_in_use(ask(&tx, Command::Delete).await, me));
        let snap = ask(&tx, |r| Command::Snapshot(t.path().join("s"), r)).await;
        assert!(matches!(snap, Err(Error::InUse { pid: Some(p), .. }) if p == me));
        assert!(paths.dir.is_dir(), "a refused delete deleted");

        // The owner let go: stopped, whatever its socket file says.
        drop(lock);
        assert_eq!(state(&tx).await.unwrap(), MachineState::Stopped);
        std::fs::remove_dir_all(&paths.dir).unwrap();
        assert!(matches!(state(&tx).await, Err(Error::NotFound { .. })));
    }
}
