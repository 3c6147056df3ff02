//! A machine that another live process runs, driven from this one.
//!
//! The owner process keeps the VM, its lock and its lifecycle. Another
//! process that connects gets a [`LocalMachine`](super::LocalMachine) like
//! the owner's, whose execs, streams, files and images go straight to the
//! running guest through the monitor's vsock socket (as the owner's do),
//! but whose commands are answered here instead of by an actor with a VM:
//! the state follows the owner, `start` waits for an owner that is still
//! booting the machine (so two processes that connect at once boot it
//! once), and the other lifecycle calls (stop, delete, snapshot, fork) are
//! [`Error::InUse`] naming the owner, at once. Once the owner lets go,
//! `Machine::connect` takes the machine over.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::actor::{boot_timeout, Command};
use super::store::{observe, MachinePaths};
use crate::error::{Error, Result};
use crate::state::{MachineState, PortMapping};

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
            // Nothing to do while the owner runs it; a boot of the owner's
            // is waited for.
            Command::Start(_, tx) => {
                let _ = tx.send(wait_up(&name, &paths, owner, boot_timeout()).await);
            }
            Command::Restore(_, _, tx) | Command::Stop(tx) | Command::Delete(tx) => {
                let _ = tx.send(Err(in_use()));
            }
            Command::Snapshot(_, tx) => {
                let _ = tx.send(Err(in_use()));
            }
            Command::Ports(tx) => {
                let _ = tx.send(ports(&name, &paths, owner).await);
            }
        }
    }
}

/// Largest ports file read ([`MAX_PORTS`](crate::config::MAX_PORTS)
/// mappings take a few KiB).
const MAX_PORTS_FILE: u64 = 64 * 1024;

/// The owner's forwarded ports, from the file it writes once they listen;
/// none while its guest is not up.
async fn ports(name: &str, paths: &MachinePaths, owner: Option<u32>) -> Result<Vec<PortMapping>> {
    if !matches!(probe(name, paths, owner).await?, Probe::Up) {
        return Ok(Vec::new());
    }
    let path = paths.ports.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = Vec::new();
        match std::fs::File::open(&path) {
            Ok(f) => f.take(MAX_PORTS_FILE).read_to_end(&mut text),
            // A machine with no ports has no file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => Err(e),
        }
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text).map_err(|e| Error::Store {
            path: path.clone(),
            reason: format!("unreadable port mappings: {e}"),
        })
    })
    .await
    .map_err(|e| Error::Internal(format!("ports task: {e}")))?
}

/// How often a peer looks at the owner's files while waiting for its boot.
const BOOT_POLL: Duration = Duration::from_millis(100);

/// Running while the owner that was found still holds the machine and its
/// guest is up ([`observe`]); else stopped (or gone).
async fn state(name: &str, paths: &MachinePaths, owner: Option<u32>) -> Result<MachineState> {
    Ok(match probe(name, paths, owner).await? {
        Probe::Up => MachineState::Running,
        Probe::Booting | Probe::LetGo => MachineState::Stopped,
    })
}

enum Probe {
    Up,
    /// The owner holds the machine; its guest is not up yet.
    Booting,
    /// The owner that was found no longer holds it.
    LetGo,
}

async fn probe(name: &str, paths: &MachinePaths, owner: Option<u32>) -> Result<Probe> {
    let p = paths.clone();
    let ((held, up), exists) = tokio::task::spawn_blocking(move || (observe(&p), p.dir.is_dir()))
        .await
        .map_err(|e| Error::Internal(format!("state probe task: {e}")))?;
    if !exists {
        return Err(Error::NotFound { name: name.into() });
    }
    let same_owner = held.is_some() && (owner.is_none() || held == owner);
    Ok(match (same_owner, up) {
        (true, true) => Probe::Up,
        (true, false) => Probe::Booting,
        (false, _) => Probe::LetGo,
    })
}

/// `Ok` once the owner's guest is up, waiting up to `limit` for a boot of
/// the owner's; [`Error::NotRunning`] if the owner let the machine go
/// first (its boot failed, or it stopped it), [`Error::Timeout`] if its
/// boot outlasted `limit`.
async fn wait_up(
    name: &str,
    paths: &MachinePaths,
    owner: Option<u32>,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match probe(name, paths, owner).await? {
            Probe::Up => return Ok(()),
            Probe::LetGo => {
                return Err(Error::NotRunning {
                    name: name.into(),
                    state: MachineState::Stopped,
                })
            }
            Probe::Booting if Instant::now() >= deadline => {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for process {} to boot machine {name:?}",
                        owner.map_or("?".to_string(), |p| p.to_string())
                    ),
                    after: limit,
                })
            }
            Probe::Booting => tokio::time::sleep(BOOT_POLL).await,
        }
    }
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
    async fn state_follows_the_owner_start_waits_and_lifecycle_is_refused() {
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
        // The owner is booting: a start waits for it, up to a limit.
        let e = wait_up("p", &paths, Some(me), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        std::fs::write(&paths.vsock, b"").unwrap();
        assert_eq!(
            state(&tx).await.unwrap(),
            MachineState::Stopped,
            "a socket but no agent yet"
        );
        let ready = paths.ready.clone();
        let up = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(ready, b"").unwrap();
        });
        let began = Instant::now();
        assert!(ask(&tx, |r| Command::Start(Default::default(), r))
            .await
            .is_ok());
        assert!(
            began.elapsed() >= Duration::from_millis(250),
            "did not wait"
        );
        up.await.unwrap();
        assert_eq!(state(&tx).await.unwrap(), MachineState::Running);
        assert!(ask(&tx, Command::Timings).await.is_none());
        assert_eq!(
            ask(&tx, Command::Ports).await.unwrap(),
            vec![],
            "no ports file"
        );
        let m = PortMapping {
            address: [127, 0, 0, 1].into(),
            host: 40123,
            guest: 80,
        };
        std::fs::write(&paths.ports, serde_json::to_vec(&[m]).unwrap()).unwrap();
        assert_eq!(ask(&tx, Command::Ports).await.unwrap(), vec![m]);
        assert!(is_in_use(ask(&tx, Command::Stop).await, me));
        assert!(is_in_use(ask(&tx, Command::Delete).await, me));
        let snap = ask(&tx, |r| Command::Snapshot(t.path().join("s"), r)).await;
        assert!(matches!(snap, Err(Error::InUse { pid: Some(p), .. }) if p == me));
        assert!(paths.dir.is_dir(), "a refused delete deleted");

        // The owner let go: stopped, whatever its socket file says.
        drop(lock);
        assert_eq!(state(&tx).await.unwrap(), MachineState::Stopped);
        assert_eq!(ask(&tx, Command::Ports).await.unwrap(), vec![], "not up");
        let e = ask(&tx, |r| Command::Start(Default::default(), r))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotRunning { .. }), "{e}");
        std::fs::remove_dir_all(&paths.dir).unwrap();
        assert!(matches!(state(&tx).await, Err(Error::NotFound { .. })));
    }
}
