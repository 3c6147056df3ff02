//! [`Machine`]: the cloneable handle users hold. Each call becomes a message
//! to the machine's actor (lifecycle) or its own vsock connection to the
//! guest agent (exec, files).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot};

use crate::actor::{Command, MachineActor, CHANNEL_CAPACITY};
use crate::agent_conn::AgentConnection;
use crate::assets::GuestAssets;
use crate::config::{ConnectOptions, MachineConfig};
use crate::disk::create_disk;
use crate::error::{Error, Result};
use crate::exec::{ExecOptions, ExecResult, ExecStream, RunningExec};
use crate::files::{check_mode, check_path, download, upload, FileStream};
use crate::snapshot;
use crate::store::{MachinePaths, MachineStore};
use crate::warm::WarmShape;

/// The monitor's own set-up phases (re-exported from `smol_vmm`).
pub use smol_vmm::BootTimings as VmSetupTimings;

/// Where a machine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// Recorded, never booted yet.
    Created,
    Running,
    Stopped,
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MachineState::Created => "created",
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
        })
    }
}

/// How long the last boot of a machine took, phase by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootTimings {
    /// Record, directory and disk (format included); zero for `start`.
    pub prepare: Duration,
    /// Building the VM on the host (`Vm::start`), up to its first run.
    pub vm_setup: Duration,
    /// From the VM running to the agent answering its first Hello.
    pub agent_ready: Duration,
    /// The whole `create` or `start`.
    pub total: Duration,
    /// The monitor's breakdown of `vm_setup`.
    pub vmm: VmSetupTimings,
    /// Restored from a snapshot (a warm create, `restore` or `fork`)
    /// rather than booted.
    pub restored: bool,
}

struct Shared {
    name: String,
    dir: PathBuf,
    console_log: PathBuf,
    /// The store's root (`SMOL_HOME`), for forks.
    home: PathBuf,
    config: MachineConfig,
}

/// A handle to a microVM. Clone it freely (all clones drive the same
/// machine); it is `Send + Sync`. When the last clone (and the last stream
/// made from it) is dropped, a non-persistent machine is stopped and deleted,
/// a persistent one is shut down and kept.
///
/// ```no_run
/// # async fn demo() -> smol::Result<()> {
/// use smol::{Machine, MachineConfig};
/// let m = Machine::create(MachineConfig::default()).await?;
/// let r = m.exec(["uname", "-a"]).await?;
/// println!("{}", r.stdout_lossy());
/// m.delete().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Machine {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
}

/// Machines open in this process, by directory: `connect` hands out the
/// live handle instead of opening a second actor.
type Registry = Mutex<HashMap<PathBuf, (mpsc::WeakSender<Command>, Arc<Shared>)>>;

fn registry() -> &'static Registry {
    static OPEN: OnceLock<Registry> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

impl Machine {
    /// Creates and boots a machine with the default engine (local, or the
    /// cloud when `SMOL_CLOUD_TOKEN` is set). Returns once the guest agent
    /// answers.
    pub async fn create(config: MachineConfig) -> Result<Machine> {
        Machine::create_with(config, ConnectOptions::from_env()).await
    }

    /// After the first machine of a shape (resources and guest assets) on
    /// this host, `create` restores that machine's booted snapshot instead
    /// of booting: see [`MachineConfig::cold_boot`] to always boot.
    pub async fn create_with(config: MachineConfig, options: ConnectOptions) -> Result<Machine> {
        options.require_local()?;
        let begin = Instant::now();
        config.validate()?;
        let image = config.image.clone();
        // Before anything is written: a missing asset fails cleanly.
        let assets = GuestAssets::locate()?;
        let warm = match config.cold_boot {
            true => None,
            false => Some(WarmShape::new(
                &crate::assets::cache_dir(),
                &assets,
                &config.resources,
            )?),
        };
        let home = options.home.clone();
        let (mut record, paths, lock) = blocking(move || {
            let store = MachineStore::open(home.as_deref())?;
            store.reserve(&config)
        })
        .await?;
        // Until create returns, a failure or a cancelled future undoes it all.
        let mut undo = CreateUndo {
            dir: Some(paths.dir.clone()),
            machine: None,
        };
        // The shape's lock is held until its snapshot exists: concurrent
        // creates of a new shape wait here and then restore.
        let mut shape_lock = match &warm {
            Some(w) => Some(w.lock().await?),
            None => None,
        };
        let from_snapshot = match &warm {
            Some(w) => match blocking_load(w.dir.clone()).await {
                Ok(cid) => Some((w.dir.clone(), cid)),
                Err(_) => None,
            },
            None => None,
        };
        if let Some((dir, cid)) = &from_snapshot {
            shape_lock = None;
            place_snapshot(&mut record, *cid, &paths, dir).await?;
        } else {
            create_disk(&paths.disk, record.config.resources.disk_mb).await?;
        }
        let machine = Machine::spawn(
            MachineActor::new(record, paths.clone(), lock, MachineState::Created),
            &paths,
        );
        undo.machine = Some(machine.tx.clone());
        let prepare = begin.elapsed();
        let ready = async {
            match &from_snapshot {
                Some((dir, _)) => {
                    let restored = machine
                        .ask(|tx| Command::Restore(dir.clone(), prepare, tx))
                        .await?;
                    if let Err(e @ Error::Snapshot { .. }) = &restored {
                        // A warm snapshot this host cannot restore: drop it
                        // and boot; the next create of the shape makes it anew.
                        tracing::warn!(machine = %machine.name(), "warm create failed ({e}); booting instead");
                        if let Some(w) = &warm {
                            let _guard = w.lock().await?;
                            w.discard();
                        }
                        let disk = paths.disk.clone();
                        let _ = std::fs::remove_file(&disk);
                        create_disk(&disk, machine.shared.config.resources.disk_mb).await?;
                        machine.ask(|tx| Command::Start(prepare, tx)).await??;
                    } else {
                        restored?;
                    }
                }
                None => {
                    machine.ask(|tx| Command::Start(prepare, tx)).await??;
                    if let (Some(w), Some(_)) = (&warm, &shape_lock) {
                        machine.make_warm_snapshot(w).await;
                    }
                }
            }
            drop(shape_lock);
            // MachineConfig.image: the machine comes up with the image in it.
            if let Some(image) = image {
                machine.pull_image(&image).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = ready.await {
            // Gone before we return: a machine that failed to come up
            // leaves nothing behind.
            let _ = machine.ask(Command::Delete).await;
            undo.disarm();
            return Err(e);
        }
        undo.disarm();
        Ok(machine)
    }

    /// Snapshots this freshly booted machine as its shape's warm snapshot.
    /// A failure only costs later creates their speed: it is logged.
    async fn make_warm_snapshot(&self, shape: &WarmShape) {
        let staging = shape.staging();
        let _ = std::fs::remove_dir_all(&staging);
        let made = async {
            snapshot::prepare_dir(&staging)?;
            let t = self
                .ask(|tx| Command::Snapshot(staging.clone(), tx))
                .await??;
            snapshot::write_record(&staging, &self.shared.config)?;
            shape.publish(&staging)?;
            Ok::<_, Error>(t)
        };
        match made.await {
            Ok(t) => tracing::info!(
                machine = %self.name(),
                dir = %shape.dir.display(),
                total = ?t.total,
                memory_bytes = t.memory_bytes,
                "warm snapshot made for this machine shape"
            ),
            Err(e) => {
                tracing::warn!(machine = %self.name(), "cannot make the warm snapshot: {e}");
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
    }

    /// Saves the running machine into `dir` (created if missing; it must be
    /// empty): memory, vCPU and device state, its disk, its config. The
    /// machine runs on. See [`Machine::restore`].
    pub async fn snapshot(&self, dir: impl AsRef<Path>) -> Result<crate::SnapshotTimings> {
        let dir = dir.as_ref().to_path_buf();
        let existed = dir.exists();
        snapshot::prepare_dir(&dir)?;
        let made = async {
            let t = self.ask(|tx| Command::Snapshot(dir.clone(), tx)).await??;
            snapshot::write_record(&dir, &self.shared.config)?;
            Ok::<_, Error>(t)
        };
        match made.await {
            Ok(t) => Ok(t),
            Err(e) => {
                // Nothing half-written stays: the directory was empty.
                if existed {
                    if let Ok(entries) = std::fs::read_dir(&dir) {
                        for e in entries.flatten() {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                } else {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(self.explain(e).await)
            }
        }
    }

    /// A new machine from the snapshot in `dir`, running where the snapshot
    /// stopped. Its name, persistence and forkability come from `config`;
    /// resources and image from the snapshot. One snapshot can be restored
    /// any number of times; it is never changed.
    pub async fn restore(dir: impl AsRef<Path>, config: MachineConfig) -> Result<Machine> {
        Machine::restore_with(dir, config, ConnectOptions::from_env()).await
    }

    pub async fn restore_with(
        dir: impl AsRef<Path>,
        config: MachineConfig,
        options: ConnectOptions,
    ) -> Result<Machine> {
        options.require_local()?;
        let begin = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        config.validate()?;
        let d = dir.clone();
        let (saved, vm) = blocking(move || snapshot::load(&d)).await?;
        let config = MachineConfig {
            name: config.name,
            persistent: config.persistent,
            forkable: config.forkable,
            ..saved.config
        };
        let home = options.home.clone();
        let (mut record, paths, lock) = blocking(move || {
            let store = MachineStore::open(home.as_deref())?;
            store.reserve(&config)
        })
        .await?;
        let undo = CreateUndo {
            dir: Some(paths.dir.clone()),
            machine: None,
        };
        place_snapshot(&mut record, vm.vsock_cid, &paths, &dir).await?;
        Machine::start_restored(record, paths, lock, dir, begin, undo).await
    }

    /// The end of `restore` and `fork`: the actor of a reserved machine
    /// whose disk is in place, restored from `dir`; on failure nothing of
    /// it remains.
    async fn start_restored(
        record: crate::store::MachineRecord,
        paths: MachinePaths,
        lock: crate::store::MachineLock,
        dir: PathBuf,
        begin: Instant,
        mut undo: CreateUndo,
    ) -> Result<Machine> {
        let machine = Machine::spawn(
            MachineActor::new(record, paths.clone(), lock, MachineState::Created),
            &paths,
        );
        undo.machine = Some(machine.tx.clone());
        let prepare = begin.elapsed();
        if let Err(e) = machine.ask(|tx| Command::Restore(dir, prepare, tx)).await? {
            let _ = machine.ask(Command::Delete).await;
            undo.disarm();
            return Err(e);
        }
        undo.disarm();
        Ok(machine)
    }

    /// A live clone of this running machine, named `name`: the same
    /// processes, memory and disk at this instant, independent afterwards
    /// (neither sees the other's later writes), with fresh entropy, the
    /// host's clock and its own hostname. Its vsock connections open at the
    /// fork are reset in the clone; this machine's carry on. Needs a machine
    /// created with [`MachineConfig::forkable`].
    pub async fn fork(&self, name: &str) -> Result<Machine> {
        let begin = Instant::now();
        if !self.shared.config.forkable {
            return Err(Error::NotForkable {
                name: self.name().to_string(),
            });
        }
        crate::config::validate_name(name)?;
        let config = MachineConfig {
            name: Some(name.to_string()),
            ..self.shared.config.clone()
        };
        let home = self.shared.home.clone();
        let (mut record, paths, lock) = blocking(move || {
            let store = MachineStore::open(Some(&home))?;
            store.reserve(&config)
        })
        .await?;
        let undo = CreateUndo {
            dir: Some(paths.dir.clone()),
            machine: None,
        };
        // The clone's base snapshot lives in its own directory and goes
        // with it; its disk is moved into place, not copied again.
        let base = snapshot::fork_base(&paths.dir);
        snapshot::prepare_dir(&base)?;
        if let Err(e) = self.ask(|tx| Command::Snapshot(base.clone(), tx)).await? {
            return Err(self.explain(e).await);
        }
        let (b, disk, rec_path) = (base.clone(), paths.disk.clone(), paths.record.clone());
        record = blocking(move || {
            let vm =
                smol_vmm::snapshot::VmSnapshot::load(&b).map_err(|source| Error::Snapshot {
                    path: b.clone(),
                    source,
                })?;
            if let Some(cid) = vm.vsock_cid {
                record.guest_cid = cid;
            }
            crate::store::write_record(&rec_path, &record)?;
            std::fs::rename(b.join(snapshot::disk_file()), &disk).map_err(|e| {
                Error::io(format!("moving the fork's disk to {}", disk.display()), e)
            })?;
            Ok(record)
        })
        .await?;
        Machine::start_restored(record, paths, lock, base, begin, undo).await
    }

    /// Re-opens a persistent machine from the store (it is not booted:
    /// call [`Machine::start`]). A machine already open in this process
    /// yields another handle to it.
    pub async fn connect(name: &str) -> Result<Machine> {
        Machine::connect_with(name, ConnectOptions::from_env()).await
    }

    pub async fn connect_with(name: &str, options: ConnectOptions) -> Result<Machine> {
        options.require_local()?;
        crate::config::validate_name(name)?;
        let home = options.home.clone();
        let store = blocking(move || MachineStore::open(home.as_deref())).await?;
        let paths = store.paths(name);
        if let Some(m) = Machine::from_registry(&paths.dir) {
            return Ok(m);
        }
        let n = name.to_string();
        let (record, paths, lock) = blocking(move || store.open_machine(&n)).await?;
        // Another task may have opened it meanwhile: use theirs.
        if let Some(m) = Machine::from_registry(&paths.dir) {
            return Ok(m);
        }
        Ok(Machine::spawn(
            MachineActor::new(record, paths.clone(), lock, MachineState::Stopped),
            &paths,
        ))
    }

    fn from_registry(dir: &Path) -> Option<Machine> {
        let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        let (weak, shared) = reg.get(dir)?;
        Some(Machine {
            tx: weak.upgrade()?,
            shared: shared.clone(),
        })
    }

    fn spawn(actor: MachineActor, paths: &MachinePaths) -> Machine {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let name = paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            name,
            dir: paths.dir.clone(),
            console_log: paths.console_log.clone(),
            home: paths
                .dir
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            config: actor.config().clone(),
        });
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(paths.dir.clone(), (tx.downgrade(), shared.clone()));
        tokio::spawn(actor.run(rx));
        Machine { shared, tx }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The machine's directory in the store (record, disk, socket, log).
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The guest's serial console of the current (or last) boot.
    pub fn console_log_path(&self) -> &Path {
        &self.shared.console_log
    }

    pub async fn state(&self) -> Result<MachineState> {
        self.ask(Command::State).await?
    }

    /// Phases of the last `create` or `start`, once it has booted.
    pub async fn boot_timings(&self) -> Result<Option<BootTimings>> {
        self.ask(Command::Timings).await
    }

    /// Boots a stopped machine again (same disk). Running: no-op.
    pub async fn start(&self) -> Result<()> {
        self.ask(|tx| Command::Start(Duration::ZERO, tx)).await?
    }

    /// Asks the guest to power off cleanly, waits for it, and stops the VM
    /// from the host if it does not. Stopped: no-op.
    pub async fn stop(&self) -> Result<()> {
        self.ask(Command::Stop).await?
    }

    /// Stops the machine and removes everything of it (directory, disk,
    /// socket, record), persistent or not. Other handles then get
    /// [`Error::NotFound`].
    pub async fn delete(&self) -> Result<()> {
        self.ask(Command::Delete).await??;
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        if reg
            .get(&self.shared.dir)
            .is_some_and(|(w, _)| w.upgrade().is_some_and(|tx| tx.same_channel(&self.tx)))
        {
            reg.remove(&self.shared.dir);
        }
        Ok(())
    }

    /// Runs `argv` (no shell) and collects its output.
    pub async fn exec<I, S>(&self, argv: I) -> Result<ExecResult>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.exec_with(argv, ExecOptions::default()).await
    }

    /// [`Machine::exec`] with a timeout, environment and working directory.
    /// A timeout gives `Ok` with `timed_out` set (see [`crate::exec`]).
    pub async fn exec_with<I, S>(&self, argv: I, options: ExecOptions) -> Result<ExecResult>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let req = options.request(argv)?;
        let conn = self.agent().await?;
        let run = async { RunningExec::start(conn, req).await?.collect().await };
        match run.await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Runs `argv` and streams its output as it is produced.
    pub async fn exec_stream<I, S>(&self, argv: I) -> Result<ExecStream>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.exec_stream_with(argv, ExecOptions::default()).await
    }

    pub async fn exec_stream_with<I, S>(&self, argv: I, options: ExecOptions) -> Result<ExecStream>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let req = options.request(argv)?;
        let conn = self.agent().await?;
        match RunningExec::start(conn, req).await {
            Ok(running) => Ok(running.into_stream(self.clone())),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Writes `data` to `path` in the guest, atomically, with `mode` (else
    /// 0644, the agent's default).
    pub async fn write_file(
        &self,
        path: impl AsRef<str>,
        data: impl Into<Bytes>,
        mode: Option<u32>,
    ) -> Result<()> {
        let data: Bytes = data.into();
        self.write_file_from(path, &data[..], mode)
            .await
            .map(|_| ())
    }

    /// Streams `src` into `path` in the guest, one chunk at a time (bounded
    /// memory whatever the size); returns the bytes written.
    pub async fn write_file_from<R>(
        &self,
        path: impl AsRef<str>,
        src: R,
        mode: Option<u32>,
    ) -> Result<u64>
    where
        R: AsyncRead + Unpin + Send,
    {
        let path = path.as_ref();
        check_path(path)?;
        check_mode(mode)?;
        let conn = self.agent().await?;
        match upload(conn, path, mode, src).await {
            Ok(n) => Ok(n),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Reads the whole file at `path` in the guest.
    pub async fn read_file(&self, path: impl AsRef<str>) -> Result<Bytes> {
        let s = self.read_file_stream(path).await?;
        match s.bytes().await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Reads `path` as a stream of chunks (or an `AsyncRead` with
    /// [`FileStream::into_reader`]); a missing file fails here.
    pub async fn read_file_stream(&self, path: impl AsRef<str>) -> Result<FileStream> {
        let path = path.as_ref();
        check_path(path)?;
        let conn = self.agent().await?;
        match download(conn, path).await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// A fresh connection to the agent of the running machine.
    pub(crate) async fn agent(&self) -> Result<AgentConnection> {
        let uds = self.ask(Command::Session).await??;
        match AgentConnection::open(&uds, self.name()).await {
            Ok(c) => Ok(c),
            Err(e) => Err(self.explain(Error::Protocol(e.to_string())).await),
        }
    }

    /// A connection that broke usually means the machine went away: say so.
    pub(crate) async fn explain(&self, e: Error) -> Error {
        if !matches!(e, Error::Io { .. } | Error::Protocol(_)) {
            return e;
        }
        match self.state().await {
            Ok(state) if state != MachineState::Running => Error::NotRunning {
                name: self.name().to_string(),
                state,
            },
            Err(gone @ Error::NotFound { .. }) => gone,
            _ => e,
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| {
            Error::Internal(format!("the actor of machine {:?} ended", self.name()))
        })?;
        rx.await.map_err(|_| {
            Error::Internal(format!(
                "the actor of machine {:?} dropped a request",
                self.name()
            ))
        })
    }
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.shared.name)
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// What to remove if `create` does not complete (an error or a dropped
/// future): the directory before the actor exists, else the machine (the
/// actor deletes it once its boot attempt is over).
struct CreateUndo {
    dir: Option<PathBuf>,
    machine: Option<mpsc::Sender<Command>>,
}

impl CreateUndo {
    fn disarm(&mut self) {
        self.dir = None;
        self.machine = None;
    }
}

impl Drop for CreateUndo {
    fn drop(&mut self) {
        if let Some(tx) = self.machine.take() {
            let (reply, _) = oneshot::channel();
            let _ = tx.try_send(Command::Delete(reply));
        } else if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Makes a reserved machine the snapshot's in `dir`: its record takes the
/// snapshot's vsock CID (the restored guest keeps its own), and its disk is
/// a copy of the snapshot's.
async fn place_snapshot(
    record: &mut crate::store::MachineRecord,
    cid: Option<u32>,
    paths: &MachinePaths,
    dir: &Path,
) -> Result<()> {
    if let Some(cid) = cid {
        record.guest_cid = cid;
    }
    let (dir, disk, rec, rec_path) = (
        dir.to_path_buf(),
        paths.disk.clone(),
        record.clone(),
        paths.record.clone(),
    );
    blocking(move || {
        crate::store::write_record(&rec_path, &rec)?;
        snapshot::copy_disk(&dir, &disk)
    })
    .await
}

/// Loads the snapshot in `dir` (a warm one) and returns its vsock CID.
async fn blocking_load(dir: PathBuf) -> Result<Option<u32>> {
    let (_, vm) = blocking(move || snapshot::load(&dir)).await?;
    Ok(vm.vsock_cid)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn handle_is_send_sync_clone() {
        assert_send_sync::<Machine>();
        fn stream_is_send<T: Send>() {}
        stream_is_send::<ExecStream>();
        stream_is_send::<FileStream>();
    }

    #[test]
    fn state_names() {
        assert_eq!(MachineState::Running.to_string(), "running");
        assert_eq!(
            serde_json::to_string(&MachineState::Stopped).unwrap(),
            "\"stopped\""
        );
    }

    #[tokio::test]
    async fn cloud_is_refused_clearly() {
        let e = Machine::create_with(MachineConfig::default(), ConnectOptions::cloud("k"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        let e = Machine::connect_with("x", ConnectOptions::cloud("k"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }

    #[tokio::test]
    async fn connect_unknown_machine() {
        let t = tempfile::tempdir().unwrap();
        let e = Machine::connect_with("ghost", ConnectOptions::local().home(t.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::NotFound { name } if name == "ghost"),
            "{e}"
        );
        let e = Machine::connect_with("Bad Name", ConnectOptions::local().home(t.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { field: "name", .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn invalid_config_creates_nothing() {
        let t = tempfile::tempdir().unwrap();
        let e = Machine::create_with(
            MachineConfig::default().cpus(0),
            ConnectOptions::local().home(t.path()),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    field: "resources.cpus",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
