//! The local engine: machines run by this process on its own KVM monitor.
//! [`LocalMachine`] is the [`Backend`] the public handle drives: lifecycle
//! calls go to the machine's actor ([`actor`]), or, for a machine another
//! process runs, to [`peer`]; execs and files open their own vsock
//! connection to the guest agent ([`crate::agent`]).
//!
//! Its parts: the record store ([`store`]), disks ([`disk`]), guest assets
//! ([`assets`]), snapshot directories ([`snapshot`]), warm shapes
//! ([`warm`]), the network's passt ([`net`]) and the shares' virtiofsds
//! ([`fs`]).

pub(crate) mod actor;
pub(crate) mod assets;
pub(crate) mod disk;
pub(crate) mod fs;
pub(crate) mod limits;
pub(crate) mod net;
pub(crate) mod peer;
pub(crate) mod ports;
pub(crate) mod snapshot;
pub(crate) mod store;
pub(crate) mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use smol_protocol::{ExecRequest, Request};
use tokio::sync::{mpsc, oneshot};

use self::actor::{Command, MachineActor, CHANNEL_CAPACITY};
use self::assets::GuestAssets;
use self::disk::create_disk;
use self::store::{MachinePaths, MachineStore, Opened};
use self::warm::WarmShape;
use crate::agent::files;
use crate::agent::images;
use crate::agent::{self, AgentConnection, AgentLink};
use crate::backend::{Backend, Call, Source};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::exec::{ExecOptions, ExecResult, ExecStream, Input};
use crate::files::FileStream;
use crate::image::{ImageInfo, ProgressFn};
use crate::state::{BootTimings, MachineState, PortMapping};

struct Shared {
    name: String,
    dir: PathBuf,
    console_log: PathBuf,
    /// The monitor's vsock socket: execs and files connect to it directly.
    vsock: PathBuf,
    /// Requests and open connections, for `auto_stop_seconds`.
    activity: Arc<limits::Activity>,
    /// The store's root (`SMOL_HOME`), for forks.
    home: PathBuf,
    config: MachineConfig,
}

impl Shared {
    fn new(
        paths: &MachinePaths,
        config: MachineConfig,
        activity: Arc<limits::Activity>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            name: paths
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: paths.dir.clone(),
            console_log: paths.console_log.clone(),
            vsock: paths.vsock.clone(),
            activity,
            home: paths
                .dir
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            config,
        })
    }
}

/// One machine of the local engine: its actor's channel and what never
/// changes about it. Clones drive the same machine; the actor cleans up
/// when the last clone is gone.
#[derive(Clone)]
pub(crate) struct LocalMachine {
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

/// Enters a machine's handle in the registry, and drops the entries of
/// machines whose handles are all gone: a service that creates machines
/// for ever keeps only the live ones.
fn register<T>(
    reg: &mut HashMap<PathBuf, (mpsc::WeakSender<T>, Arc<Shared>)>,
    dir: PathBuf,
    tx: &mpsc::Sender<T>,
    shared: Arc<Shared>,
) {
    reg.retain(|_, (weak, _)| weak.strong_count() > 0);
    reg.insert(dir, (tx.downgrade(), shared));
}

impl LocalMachine {
    /// After the first machine of a shape (resources and guest assets) on
    /// this host, `create` restores that machine's booted snapshot instead
    /// of booting: see [`MachineConfig::cold_boot`] to always boot.
    /// `config` is validated by the caller; `home` is the store's root
    /// (`SMOL_HOME` when `None`).
    pub async fn create(mut config: MachineConfig, home: Option<PathBuf>) -> Result<LocalMachine> {
        let begin = Instant::now();
        let image = config.image.clone();
        // Before anything is written: a missing asset, virtiofsd or share
        // fails cleanly.
        let assets = GuestAssets::locate()?;
        config.mounts = check_mounts(&config.mounts)?;
        let warm = match config.cold_boot {
            true => None,
            false => Some(WarmShape::new(
                &assets::cache_dir(),
                &assets,
                &config.resources,
                config.mounts.len(),
            )?),
        };
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
        let machine = LocalMachine::spawn(
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
                images::pull_image(&machine, &image, None).await?;
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
            let (d, config) = (staging.clone(), self.shared.config.clone());
            blocking(move || snapshot::write_record(&d, &config)).await?;
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

    /// Saves the running machine into `dir` (see `Machine::snapshot`).
    async fn snapshot(&self, dir: &Path) -> Result<crate::SnapshotTimings> {
        let dir = dir.to_path_buf();
        let existed = dir.exists();
        snapshot::prepare_dir(&dir)?;
        let made = async {
            let t = self.ask(|tx| Command::Snapshot(dir.clone(), tx)).await??;
            let (d, config) = (dir.clone(), self.shared.config.clone());
            blocking(move || snapshot::write_record(&d, &config)).await?;
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

    /// A new machine from the snapshot in `dir` (see `Machine::restore`);
    /// `config` is validated by the caller.
    pub async fn restore(
        dir: &Path,
        config: MachineConfig,
        home: Option<PathBuf>,
    ) -> Result<LocalMachine> {
        let begin = Instant::now();
        let dir = dir.to_path_buf();
        let d = dir.clone();
        let (saved, vm) = blocking(move || snapshot::load(&d)).await?;
        // The snapshot's ports unless the config names its own (a second
        // restore of a snapshot with fixed host ports needs other ones).
        let ports = match config.ports.is_empty() {
            true => saved.config.ports.clone(),
            false => config.ports,
        };
        // Likewise the shares, as many as the snapshot's devices.
        let mounts = match config.mounts.is_empty() {
            true => saved.config.mounts.clone(),
            false if config.mounts.len() != saved.config.mounts.len() => {
                return Err(Error::InvalidConfig {
                    field: "mounts",
                    reason: format!(
                        "{} mounts, but the snapshot's machine has {} (a restore keeps its \
                         devices: give as many, or none to share the snapshot's directories)",
                        config.mounts.len(),
                        saved.config.mounts.len()
                    ),
                });
            }
            false => config.mounts,
        };
        let config = MachineConfig {
            name: config.name,
            persistent: config.persistent,
            forkable: config.forkable,
            ports,
            mounts: check_mounts(&mounts)?,
            ..saved.config
        };
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
        LocalMachine::start_restored(record, paths, lock, dir, begin, undo).await
    }

    /// The end of `restore` and `fork`: the actor of a reserved machine
    /// whose disk is in place, restored from `dir`; on failure nothing of
    /// it remains.
    async fn start_restored(
        record: store::MachineRecord,
        paths: MachinePaths,
        lock: store::MachineLock,
        dir: PathBuf,
        begin: Instant,
        mut undo: CreateUndo,
    ) -> Result<LocalMachine> {
        let machine = LocalMachine::spawn(
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

    /// A live clone named `name` (validated by the caller).
    async fn fork(&self, name: &str) -> Result<LocalMachine> {
        let begin = Instant::now();
        if !self.shared.config.forkable {
            return Err(Error::NotForkable {
                name: self.name().to_string(),
            });
        }
        let config = MachineConfig {
            name: Some(name.to_string()),
            // The origin keeps its host ports: the clone's listen on free
            // ones, to the same guest ports (see its `ports()`).
            ports: self
                .shared
                .config
                .ports
                .iter()
                .map(|p| crate::config::PortSpec { host: 0, ..*p })
                .collect(),
            // The same host directories, through virtiofsds of its own.
            mounts: check_mounts(&self.shared.config.mounts)?,
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
            store::write_record(&rec_path, &record)?;
            std::fs::rename(b.join(snapshot::disk_file()), &disk).map_err(|e| {
                Error::io(format!("moving the fork's disk to {}", disk.display()), e)
            })?;
            Ok(record)
        })
        .await?;
        LocalMachine::start_restored(record, paths, lock, base, begin, undo).await
    }

    /// Re-opens a persistent machine from the store (not booted); one
    /// already open in this process yields another handle to it, one that
    /// another live process runs a peer handle ([`peer`]).
    pub async fn connect(name: &str, home: Option<PathBuf>) -> Result<Arc<dyn Backend>> {
        let store = blocking(move || MachineStore::open(home.as_deref())).await?;
        let paths = store.paths(name);
        if let Some(m) = LocalMachine::from_registry(&paths.dir) {
            return Ok(Arc::new(m));
        }
        let n = name.to_string();
        let (record, paths, lock) = match blocking(move || store.open_machine(&n)).await? {
            Opened::Own(record, paths, lock) => (record, paths, lock),
            Opened::Peer {
                record,
                paths,
                owner,
            } => return Ok(Arc::new(LocalMachine::spawn_peer(record, paths, owner))),
        };
        // Another task may have opened it meanwhile: use theirs.
        if let Some(m) = LocalMachine::from_registry(&paths.dir) {
            return Ok(Arc::new(m));
        }
        Ok(Arc::new(LocalMachine::spawn(
            MachineActor::new(record, paths.clone(), lock, MachineState::Stopped),
            &paths,
        )))
    }

    /// The store's machines (see `Machine::list`).
    pub async fn list(home: Option<PathBuf>) -> Result<Vec<crate::state::MachineInfo>> {
        blocking(move || MachineStore::open(home.as_deref())?.list()).await
    }

    fn from_registry(dir: &Path) -> Option<LocalMachine> {
        let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        let (weak, shared) = reg.get(dir)?;
        Some(LocalMachine {
            tx: weak.upgrade()?,
            shared: shared.clone(),
        })
    }

    fn spawn(actor: MachineActor, paths: &MachinePaths) -> LocalMachine {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let activity = limits::Activity::new();
        let actor = actor.watching(activity.clone());
        let shared = Shared::new(paths, actor.config().clone(), activity);
        register(
            &mut registry().lock().unwrap_or_else(|p| p.into_inner()),
            paths.dir.clone(),
            &tx,
            shared.clone(),
        );
        tokio::spawn(actor.run(rx));
        LocalMachine { shared, tx }
    }

    /// A handle on a machine the live process `owner` runs ([`peer`]). Not
    /// in the registry: once the owner lets go, the next `connect` of this
    /// process takes the machine over instead of finding this handle.
    fn spawn_peer(record: store::MachineRecord, paths: MachinePaths, owner: Option<u32>) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let shared = Shared::new(&paths, record.config, limits::Activity::new());
        tokio::spawn(peer::serve(rx, record.name, paths, owner));
        LocalMachine { shared, tx }
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn delete(&self) -> Result<()> {
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

    /// A connection to the agent with `first` sent in its opening. Straight
    /// to the monitor's socket, with no word to the actor: a machine that is
    /// not running has no socket, and `explain` says why.
    async fn agent(&self, first: &Request) -> Result<AgentConnection> {
        let busy = self.shared.activity.open();
        match AgentConnection::open_with(&self.shared.vsock, self.name(), first).await {
            Ok(c) => Ok(c.hold(busy)),
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

    async fn state(&self) -> Result<MachineState> {
        self.ask(Command::State).await?
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        self.shared.activity.touch();
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
    record: &mut store::MachineRecord,
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
        store::write_record(&rec_path, &rec)?;
        snapshot::copy_disk(&dir, &disk)
    })
    .await
}

/// With mounts: virtiofsd is there and every source is a directory; the
/// mounts come back with their sources absolute.
fn check_mounts(mounts: &[crate::config::MountSpec]) -> Result<Vec<crate::config::MountSpec>> {
    if mounts.is_empty() {
        return Ok(Vec::new());
    }
    fs::virtiofsd_program()?;
    fs::resolve_sources(mounts)
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

impl AgentLink for LocalMachine {
    async fn request(&self, first: &Request) -> Result<AgentConnection> {
        self.agent(first).await
    }

    async fn explain(&self, e: Error) -> Error {
        LocalMachine::explain(self, e).await
    }

    fn label(&self) -> &str {
        self.name()
    }

    /// `<home>/images`, next to `<home>/machines/<name>`.
    fn images_root(&self) -> PathBuf {
        self.shared.home.join("images")
    }
}

impl Backend for LocalMachine {
    fn name(&self) -> &str {
        LocalMachine::name(self)
    }

    fn config(&self) -> &MachineConfig {
        &self.shared.config
    }

    fn dir(&self) -> Option<&Path> {
        Some(&self.shared.dir)
    }

    fn console_log_path(&self) -> Option<&Path> {
        Some(&self.shared.console_log)
    }

    fn state(&self) -> Call<'_, MachineState> {
        LocalMachine::state(self).boxed()
    }

    fn boot_timings(&self) -> Call<'_, Option<BootTimings>> {
        self.ask(Command::Timings).boxed()
    }

    fn start(&self) -> Call<'_, ()> {
        async { self.ask(|tx| Command::Start(Duration::ZERO, tx)).await? }.boxed()
    }

    fn stop(&self) -> Call<'_, ()> {
        async { self.ask(Command::Stop).await? }.boxed()
    }

    fn delete(&self) -> Call<'_, ()> {
        LocalMachine::delete(self).boxed()
    }

    fn ports(&self) -> Call<'_, Vec<PortMapping>> {
        async { self.ask(Command::Ports).await? }.boxed()
    }

    fn url(&self) -> Call<'_, Option<String>> {
        async { Ok(None) }.boxed()
    }

    fn exec(
        &self,
        req: ExecRequest,
        max_output: u64,
        stdin: Option<Input>,
    ) -> Call<'_, ExecResult> {
        agent::exec::exec(self, req, max_output, stdin).boxed()
    }

    fn exec_stream(&self, req: ExecRequest, stdin: Option<Input>) -> Call<'_, ExecStream> {
        agent::exec::exec_stream(self, req, stdin).boxed()
    }

    fn spawn(&self, req: ExecRequest, stdin: Option<Input>) -> Call<'_, crate::Process> {
        agent::exec::spawn(self, req, stdin).boxed()
    }

    fn write_file<'a>(
        &'a self,
        path: &'a str,
        mode: Option<u32>,
        src: Source<'a>,
    ) -> Call<'a, u64> {
        files::write_file(self, path, mode, src).boxed()
    }

    fn read_file<'a>(&'a self, path: &'a str) -> Call<'a, Bytes> {
        files::read_file(self, path).boxed()
    }

    fn read_file_stream<'a>(&'a self, path: &'a str) -> Call<'a, FileStream> {
        files::read_file_stream(self, path).boxed()
    }

    fn pull_image<'a>(
        &'a self,
        reference: &'a str,
        progress: Option<ProgressFn>,
    ) -> Call<'a, ImageInfo> {
        images::pull_image(self, reference, progress).boxed()
    }

    fn list_images(&self) -> Call<'_, Vec<ImageInfo>> {
        images::list_images(self).boxed()
    }

    fn run<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecResult> {
        images::run_collect(self, image, argv, options).boxed()
    }

    fn run_stream<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecStream> {
        images::run_stream(self, image, argv, options).boxed()
    }

    fn snapshot<'a>(&'a self, dir: &'a Path) -> Call<'a, crate::SnapshotTimings> {
        LocalMachine::snapshot(self, dir).boxed()
    }

    fn fork<'a>(&'a self, name: &'a str) -> Call<'a, Arc<dyn Backend>> {
        async move {
            let clone = LocalMachine::fork(self, name).await?;
            Ok(Arc::new(clone) as Arc<dyn Backend>)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15: the entries of machines whose handles are all dropped go.
    #[test]
    fn the_registry_keeps_only_machines_with_handles() {
        let home = tempfile::tempdir().unwrap();
        let store = MachineStore::open(Some(home.path())).unwrap();
        let shared = |name: &str| {
            Shared::new(
                &store.paths(name),
                MachineConfig::default(),
                limits::Activity::new(),
            )
        };
        let mut reg = HashMap::new();
        let (kept, _rx1) = mpsc::channel::<()>(1);
        register(&mut reg, "/m/kept".into(), &kept, shared("kept"));
        let (gone, _rx2) = mpsc::channel::<()>(1);
        register(&mut reg, "/m/gone".into(), &gone, shared("gone"));
        assert_eq!(reg.len(), 2);
        drop(gone);
        let (next, _rx3) = mpsc::channel::<()>(1);
        register(&mut reg, "/m/next".into(), &next, shared("next"));
        let mut dirs: Vec<_> = reg.keys().cloned().collect();
        dirs.sort();
        assert_eq!(dirs, [PathBuf::from("/m/kept"), PathBuf::from("/m/next")]);
    }
}
