//! The local machine store: `$SMOL_HOME/machines/<name>/`, one directory per
//! machine holding its record (`machine.json`), console log, vsock socket
//! and disk.
//!
//! Two `flock`s keep processes apart: `machines/.lock` while a machine is
//! being reserved or opened (names, guest CIDs), and `<name>/lock` for as
//! long as a process has the machine open. A directory whose lock nobody
//! holds and whose record says it is not persistent is left over from a
//! process that died: it is swept away. A record that cannot be read (an
//! I/O error, bad JSON, a version this smol does not know) is never a
//! reason to delete anything: it is reported and left as it is.
//!
//! Records are written crash-safely: a temporary file, fsync, rename, then
//! fsync of the directory.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::{generate_name, validate_name, MachineConfig};
use crate::error::{Error, Result};

/// Bumped when the record format changes incompatibly.
pub(crate) const RECORD_VERSION: u32 = 1;
/// The first guest CID (0-2 are reserved by vsock).
const FIRST_CID: u32 = 3;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long `open` waits for an actor of this process that is shutting down
/// to release the machine.
const OWN_LOCK_WAIT: Duration = Duration::from_secs(10);

/// What the store remembers of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MachineRecord {
    pub version: u32,
    pub name: String,
    pub guest_cid: u32,
    pub created_unix: u64,
    pub config: MachineConfig,
}

/// The files of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MachinePaths {
    pub dir: PathBuf,
    pub record: PathBuf,
    pub lock: PathBuf,
    pub console_log: PathBuf,
    pub vsock: PathBuf,
    /// Present while the owner's guest agent answers (written after its
    /// first Hello, removed when the VM goes): the socket alone appears
    /// as soon as the monitor starts, long before a boot is over.
    pub ready: PathBuf,
    /// The owner's forwarded ports while they listen (JSON
    /// `[PortMapping]`), for other processes' `ports()`.
    pub ports: PathBuf,
    /// The machine's passt's log (`resources.network`).
    pub passt_log: PathBuf,
    pub disk: PathBuf,
}

impl MachinePaths {
    fn new(dir: PathBuf) -> Self {
        MachinePaths {
            record: dir.join("machine.json"),
            lock: dir.join("lock"),
            console_log: dir.join("console.log"),
            vsock: dir.join("vsock.sock"),
            ready: dir.join("ready"),
            ports: dir.join("ports.json"),
            passt_log: dir.join("passt.log"),
            disk: dir.join("disk.img"),
            dir,
        }
    }
}

/// Held for as long as this process has the machine open.
#[derive(Debug)]
pub(crate) struct MachineLock {
    _lock: Flock<File>,
}

impl MachineLock {
    /// Takes the machine's lock without waiting; `Err(Some(pid))` /
    /// `Err(None)` when another open file holds it.
    fn try_take(path: &Path) -> Result<std::result::Result<Self, Option<u32>>> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                let _ = lock.set_len(0);
                let _ = lock.write_all_at(std::process::id().to_string().as_bytes(), 0);
                Ok(Ok(MachineLock { _lock: lock }))
            }
            Err((_, Errno::EWOULDBLOCK)) => Ok(Err(holder.trim().parse().ok())),
            Err((_, errno)) => Err(Error::io(
                format!("locking {}", path.display()),
                errno.into(),
            )),
        }
    }
}

/// The pid written in a machine's lock file while a process holds the
/// lock; `None` when nobody does. Probes with a shared lock, so nothing
/// is written.
pub(crate) fn holder(path: &Path) -> Option<u32> {
    let mut file = File::open(path).ok()?;
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Free: released when the probe is dropped.
        Ok(_probe) => None,
        Err((_, Errno::EWOULDBLOCK)) => text.trim().parse().ok().or(Some(0)),
        Err(_) => None,
    }
}

/// The process that has the machine at `paths` open, if one does, and
/// whether its guest is up (its agent answered and the monitor's socket is
/// there). A marker left by a killed owner counts for nothing: the lock is
/// free then.
pub(crate) fn observe(paths: &MachinePaths) -> (Option<u32>, bool) {
    let owner = holder(&paths.lock);
    let up = owner.is_some() && paths.ready.exists() && paths.vsock.exists();
    (owner, up)
}

/// A machine [`MachineStore::open_machine`] opened.
#[derive(Debug)]
pub(crate) enum Opened {
    /// This process owns it now (it holds the lock).
    Own(MachineRecord, MachinePaths, MachineLock),
    /// Another live process owns it (`owner`, when its lock file names
    /// it): this one may use the running guest, not change its lifecycle.
    Peer {
        record: MachineRecord,
        paths: MachinePaths,
        owner: Option<u32>,
    },
}

/// Held while reserving or opening a machine.
struct StoreLock {
    _lock: Flock<File>,
}

#[derive(Debug, Clone)]
pub(crate) struct MachineStore {
    machines: PathBuf,
}

impl MachineStore {
    /// Opens (creating if needed) the store under `home`, else `SMOL_HOME`,
    /// else `$XDG_DATA_HOME/smol`, else `~/.local/share/smol`.
    pub fn open(home: Option<&Path>) -> Result<Self> {
        let root = match home {
            Some(h) => h.to_path_buf(),
            None => crate::image::smol_home(),
        };
        let machines = root.join("machines");
        fs::create_dir_all(&machines)
            .map_err(|e| Error::io(format!("creating {}", machines.display()), e))?;
        Ok(MachineStore { machines })
    }

    pub fn paths(&self, name: &str) -> MachinePaths {
        MachinePaths::new(self.machines.join(name))
    }

    fn lock_store(&self) -> Result<StoreLock> {
        let path = self.machines.join(".lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| Error::io(format!("locking {}", path.display()), errno.into()))?;
        Ok(StoreLock { _lock: lock })
    }

    /// Creates a new machine's directory, lock and record: a unique name
    /// (generated when the config has none) and a unique guest CID.
    pub fn reserve(
        &self,
        config: &MachineConfig,
    ) -> Result<(MachineRecord, MachinePaths, MachineLock)> {
        let _store = self.lock_store()?;
        self.sweep_stale();
        let name = match &config.name {
            Some(n) => {
                validate_name(n)?;
                n.clone()
            }
            None => loop {
                let n = generate_name();
                if !self.paths(&n).dir.exists() {
                    break n;
                }
            },
        };
        let paths = self.paths(&name);
        let sock_len = paths.vsock.as_os_str().len();
        if sock_len > MAX_SOCKET_PATH {
            return Err(Error::InvalidConfig {
                field: "name",
                reason: format!(
                    "the socket path {} is {sock_len} bytes, over the {MAX_SOCKET_PATH} a unix socket allows; use a shorter name or SMOL_HOME",
                    paths.vsock.display()
                ),
            });
        }
        match fs::create_dir(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists { name })
            }
            Err(e) => return Err(Error::io(format!("creating {}", paths.dir.display()), e)),
        }
        let created = (|| {
            set_private(&paths.dir)?;
            let lock = match MachineLock::try_take(&paths.lock)? {
                Ok(l) => l,
                Err(_) => return Err(Error::AlreadyExists { name: name.clone() }),
            };
            let record = MachineRecord {
                version: RECORD_VERSION,
                name: name.clone(),
                guest_cid: self.free_cid(),
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                config: MachineConfig {
                    name: Some(name.clone()),
                    ..config.clone()
                },
            };
            write_record(&paths.record, &record)?;
            Ok((record, lock))
        })();
        match created {
            Ok((record, lock)) => Ok((record, paths, lock)),
            Err(e) => {
                let _ = fs::remove_dir_all(&paths.dir);
                Err(e)
            }
        }
    }

    /// Opens an existing machine: for this process when no other has it
    /// open ([`Opened::Own`]), else as a peer of the live process that has
    /// ([`Opened::Peer`]). A leftover non-persistent machine is swept and
    /// reported as [`Error::NotFound`].
    pub fn open_machine(&self, name: &str) -> Result<Opened> {
        validate_name(name)?;
        let paths = self.paths(name);
        let deadline = Instant::now() + OWN_LOCK_WAIT;
        loop {
            {
                let _store = self.lock_store()?;
                if !paths.dir.is_dir() {
                    return Err(Error::NotFound { name: name.into() });
                }
                match MachineLock::try_take(&paths.lock)? {
                    Ok(lock) => {
                        let record = read_record(&paths.record)?;
                        if !record.config.persistent {
                            drop(lock);
                            let _ = fs::remove_dir_all(&paths.dir);
                            return Err(Error::NotFound { name: name.into() });
                        }
                        // The socket of an owner that was killed: nothing
                        // serves it now that the lock is ours.
                        let _ = fs::remove_file(&paths.vsock);
                        return Ok(Opened::Own(record, paths, lock));
                    }
                    // One of our own actors is shutting down: it lets go soon.
                    Err(Some(pid)) if pid == std::process::id() && Instant::now() < deadline => {}
                    Err(Some(pid)) if pid == std::process::id() => {
                        return Err(Error::InUse {
                            name: name.into(),
                            pid: Some(pid),
                        })
                    }
                    Err(pid) => {
                        let record = read_record(&paths.record)?;
                        return Ok(Opened::Peer {
                            record,
                            paths,
                            owner: pid,
                        });
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every machine of the store, in name order, with the process that has
    /// it open. A non-persistent machine whose process ended (killed, say)
    /// is removed first, as `create` and `connect` would; nothing else is
    /// changed: a machine whose record cannot be read (corrupt, truncated,
    /// a newer smol's) is listed with [`MachineInfo::unreadable`] saying
    /// why, and never removed. No lock is taken for long.
    ///
    /// [`MachineInfo::unreadable`]: crate::state::MachineInfo::unreadable
    pub fn list(&self) -> Result<Vec<crate::state::MachineInfo>> {
        use crate::state::{MachineInfo, MachineState};
        // Held so that the probe of a machine's lock never races a
        // reserve or open taking it.
        let _store = self.lock_store()?;
        self.sweep_stale();
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.machines).into_iter().flatten().flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let paths = MachinePaths::new(dir);
            let (owner_pid, up) = observe(&paths);
            let state = if up {
                MachineState::Running
            } else {
                MachineState::Stopped
            };
            out.push(match read_record(&paths.record) {
                Ok(record) => MachineInfo {
                    name: record.name,
                    state,
                    persistent: record.config.persistent,
                    created_unix: Some(record.created_unix),
                    config: record.config,
                    owner_pid,
                    unreadable: None,
                },
                Err(e) => unreadable_info(&paths, state, owner_pid, e),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every readable record, in name order.
    #[cfg(test)]
    pub fn records(&self) -> Vec<MachineRecord> {
        let mut out: Vec<MachineRecord> = fs::read_dir(&self.machines)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_record(&e.path().join("machine.json")).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The lowest CID no machine directory claims, counting records this
    /// smol cannot fully read (a newer version's) by their `guest_cid`.
    fn free_cid(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> = fs::read_dir(&self.machines)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("machine.json")).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|v| v.get("guest_cid")?.as_u64())
            .filter_map(|c| u32::try_from(c).ok())
            .collect();
        (FIRST_CID..)
            .find(|c| !used.contains(c))
            .unwrap_or(FIRST_CID)
    }

    /// Removes directories of non-persistent machines that no process has
    /// open (their owner died). Called with the store lock held.
    fn sweep_stale(&self) {
        let Ok(entries) = fs::read_dir(&self.machines) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let paths = MachinePaths::new(dir.clone());
            if !is_sweepable(&paths) {
                continue;
            }
            if let Ok(Ok(lock)) = MachineLock::try_take(&paths.lock) {
                tracing::warn!(dir = %dir.display(), "removing a machine left over by a process that ended");
                let _ = fs::remove_dir_all(&dir);
                drop(lock);
            }
        }
    }
}

/// Whether a machine directory nobody holds may be removed: its record says
/// it is not persistent, or it has neither record nor disk (a reservation
/// cut short). Anything else, an unreadable record included, is kept.
fn is_sweepable(paths: &MachinePaths) -> bool {
    match read_record(&paths.record) {
        Ok(r) => !r.config.persistent,
        Err(Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound && !paths.disk.exists() =>
        {
            true
        }
        Err(e) => {
            tracing::debug!(dir = %paths.dir.display(), "keeping a machine whose record cannot be read: {e}");
            false
        }
    }
}

/// What `list` can say of a machine whose record it cannot read: its
/// directory's name, whatever of the record parses as JSON (a newer
/// smol's, say), and why. Counted persistent unless the record says
/// otherwise, since it is kept like one.
fn unreadable_info(
    paths: &MachinePaths,
    state: crate::state::MachineState,
    owner_pid: Option<u32>,
    why: Error,
) -> crate::state::MachineInfo {
    let raw: Option<serde_json::Value> = fs::read(&paths.record)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let field = |f: &dyn Fn(&serde_json::Value) -> Option<&serde_json::Value>| {
        raw.as_ref().and_then(f).cloned()
    };
    tracing::debug!(dir = %paths.dir.display(), "listing: {why}");
    crate::state::MachineInfo {
        name: paths
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        state,
        persistent: field(&|v| v.get("config")?.get("persistent"))
            .and_then(|p| p.as_bool())
            .unwrap_or(true),
        created_unix: field(&|v| v.get("created_unix")).and_then(|c| c.as_u64()),
        config: MachineConfig::default(),
        owner_pid,
        unreadable: Some(why.to_string()),
    }
}

fn set_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("restricting {}", dir.display()), e))
}

/// Writes the record crash-safely: a temporary file, fsync, rename over the
/// old record, fsync of the directory. A crash leaves the old record or the
/// new one, never a torn one.
pub(crate) fn write_record(path: &Path, record: &MachineRecord) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(record).map_err(|e| Error::Store {
        path: path.to_path_buf(),
        reason: format!("encoding the record: {e}"),
    })?;
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(&json)?;
        f.sync_all()
    });
    written.map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("renaming {} into place", tmp.display()), e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    }
    Ok(())
}

/// Reads a record; the version is checked first, so that a newer smol's
/// record is named as such whatever else it holds.
pub(crate) fn read_record(path: &Path) -> Result<MachineRecord> {
    let bytes = fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let bad = |reason: String| Error::Store {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable record: {e}")))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(RECORD_VERSION) => {}
        Some(v) => {
            return Err(bad(format!(
                "record version {v} (this smol reads {RECORD_VERSION})"
            )))
        }
        None => return Err(bad("unreadable record: no version".into())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("unreadable record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MachineStore) {
        let t = tempfile::tempdir().unwrap();
        let s = MachineStore::open(Some(t.path())).unwrap();
        (t, s)
    }

    #[test]
    fn reserve_names_cids_and_records() {
        let (_t, s) = store();
        let (a, pa, _la) = s
            .reserve(&MachineConfig::default().name("a").persistent(true))
            .unwrap();
        assert_eq!(a.guest_cid, 3);
        assert_eq!(read_record(&pa.record).unwrap(), a);
        let (b, _pb, _lb) = s.reserve(&MachineConfig::default()).unwrap();
        assert!(b.name.starts_with("smol-"));
        assert_eq!(b.config.name.as_deref(), Some(b.name.as_str()));
        assert_eq!(b.guest_cid, 4);
        let e = s.reserve(&MachineConfig::default().name("a")).unwrap_err();
        assert!(
            matches!(&e, Error::AlreadyExists { name } if name == "a"),
            "{e}"
        );
        assert_eq!(s.records().len(), 2);
    }

    #[test]
    fn open_and_in_use() {
        let (_t, s) = store();
        assert!(matches!(
            s.open_machine("nope"),
            Err(Error::NotFound { .. })
        ));
        let (_r, _p, lock) = s
            .reserve(&MachineConfig::default().name("p").persistent(true))
            .unwrap();
        drop(lock);
        let Ok(Opened::Own(r, _p, lock)) = s.open_machine("p") else {
            panic!("not opened for this process");
        };
        assert_eq!(r.name, "p");
        // A second opener in another process would get InUse; within the
        // process the holder's pid is ours, so this waits, then gives up.
        let s2 = s.clone();
        let h = std::thread::spawn(move || {
            s2.open_machine("p")
                .map(|o| assert!(matches!(o, Opened::Own(..))))
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(lock);
        h.join().unwrap().unwrap();
    }

    #[test]
    fn stale_non_persistent_machines_are_swept() {
        let (_t, s) = store();
        let (_r, p, lock) = s.reserve(&MachineConfig::default().name("gone")).unwrap();
        // Still locked: kept, and its name is taken.
        assert!(matches!(
            s.reserve(&MachineConfig::default().name("gone")),
            Err(Error::AlreadyExists { .. })
        ));
        drop(lock);
        let (_r2, p2, _l2) = s.reserve(&MachineConfig::default().name("other")).unwrap();
        assert!(!p.dir.exists(), "stale machine not swept");
        assert!(p2.dir.exists());
        // A persistent one whose owner is gone stays.
        let (_r3, p3, l3) = s
            .reserve(&MachineConfig::default().name("kept").persistent(true))
            .unwrap();
        drop(l3);
        s.reserve(&MachineConfig::default().name("x")).unwrap();
        assert!(p3.dir.exists());
    }

    #[test]
    fn list_sweeps_only_the_dead_and_names_the_owner() {
        let (_t, s) = store();
        let (_ra, pa, la) = s.reserve(&MachineConfig::default().name("a")).unwrap();
        let (_rb, pb, lb) = s
            .reserve(&MachineConfig::default().name("b").persistent(true))
            .unwrap();
        drop(lb);
        std::fs::write(&pa.vsock, b"").unwrap();
        std::fs::write(&pa.ready, b"").unwrap();
        let (_rc, pc, lc) = s
            .reserve(&MachineConfig::default().name("c").persistent(true))
            .unwrap();
        fs::write(&pc.record, b"{torn").unwrap();
        drop(lc);
        // Non-persistent, its process gone (the last reserve: a reserve
        // sweeps too): removed by the list.
        let (_rd, pd, ld) = s.reserve(&MachineConfig::default().name("dead")).unwrap();
        drop(ld);
        assert!(pd.dir.exists());
        let before = fs::read(&pb.lock).unwrap();
        let l = s.list().unwrap();
        let names: Vec<&str> = l.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "{l:?}");
        assert!(l[..2].iter().all(|i| i.unreadable.is_none()));
        let why = l[2].unreadable.as_deref().unwrap_or_default();
        assert!(why.contains("unreadable record"), "{why}");
        assert!(
            l[2].persistent,
            "a record that cannot be read counts as kept"
        );
        assert!(!pd.dir.exists(), "the dead non-persistent machine stays");
        assert_eq!(l[0].owner_pid, Some(std::process::id()));
        assert_eq!(l[0].state, crate::state::MachineState::Running);
        assert!(!l[0].persistent);
        assert_eq!(l[1].owner_pid, None);
        assert_eq!(l[1].state, crate::state::MachineState::Stopped);
        assert!(l[1].persistent && l[1].created_unix.is_some());
        // Nothing written or removed, and the lock is still ours.
        assert_eq!(fs::read(&pb.lock).unwrap(), before);
        assert!(pc.dir.exists());
        assert!(matches!(
            s.reserve(&MachineConfig::default().name("a")),
            Err(Error::AlreadyExists { .. })
        ));
        drop(la);
    }

    /// Issue 12: a record that cannot be read is never swept, whatever the
    /// reason; a reservation cut short (no record, no disk) is.
    #[test]
    fn unreadable_records_are_kept() {
        let (_t, s) = store();
        let mut kept = Vec::new();
        for (name, bytes) in [
            ("torn", &b"{\"version\": 1, \"na"[..]),
            (
                "newer",
                &br#"{"version": 99, "name": "newer", "guest_cid": 3}"#[..],
            ),
            ("empty", &b""[..]),
        ] {
            let (_r, p, lock) = s
                .reserve(&MachineConfig::default().name(name).persistent(true))
                .unwrap();
            fs::write(&p.disk, b"precious").unwrap();
            fs::write(&p.record, bytes).unwrap();
            drop(lock);
            kept.push(p);
        }
        // A record that is a directory cannot be read either.
        let (_r, p, lock) = s
            .reserve(&MachineConfig::default().name("dir").persistent(true))
            .unwrap();
        fs::remove_file(&p.record).unwrap();
        fs::create_dir(&p.record).unwrap();
        fs::write(&p.disk, b"precious").unwrap();
        drop(lock);
        kept.push(p);
        // A reservation cut short: a directory and its lock, nothing else.
        let (_r, cut, lock) = s.reserve(&MachineConfig::default().name("cut")).unwrap();
        fs::remove_file(&cut.record).unwrap();
        drop(lock);

        let (r, _p, _l) = s.reserve(&MachineConfig::default().name("next")).unwrap();
        for p in &kept {
            assert_eq!(
                fs::read(&p.disk).unwrap(),
                b"precious",
                "{}",
                p.dir.display()
            );
        }
        assert!(!cut.dir.exists(), "the cut-short reservation stays");
        // Each is listed as what it is, and a list changes nothing.
        let l = s.list().unwrap();
        let listed: Vec<(&str, bool)> = l
            .iter()
            .map(|i| (i.name.as_str(), i.unreadable.is_some()))
            .collect();
        assert_eq!(
            listed,
            [
                ("dir", true),
                ("empty", true),
                ("newer", true),
                ("next", false),
                ("torn", true)
            ],
            "{l:?}"
        );
        let newer = &l[2];
        let why = newer.unreadable.as_deref().unwrap_or_default();
        assert!(why.contains("record version 99"), "{why}");
        assert!(newer.persistent && newer.owner_pid.is_none());
        assert_eq!(newer.state, crate::state::MachineState::Stopped);
        // The newer record's CID (3) is not handed out again.
        assert_ne!(r.guest_cid, 3);
        let e = s.open_machine("torn").unwrap_err();
        assert!(matches!(e, Error::Store { .. }), "{e}");
        assert!(kept[0].disk.exists());
    }

    #[test]
    fn bad_records_are_named_errors() {
        let (t, _s) = store();
        let p = t.path().join("r.json");
        fs::write(&p, b"{nope").unwrap();
        assert!(matches!(read_record(&p), Err(Error::Store { .. })));
        let mut r = MachineRecord {
            version: 99,
            name: "a".into(),
            guest_cid: 3,
            created_unix: 0,
            config: MachineConfig::default(),
        };
        fs::write(&p, serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(read_record(&p)
            .unwrap_err()
            .to_string()
            .contains("version 99"));
        r.version = RECORD_VERSION;
        write_record(&p, &r).unwrap();
        assert_eq!(read_record(&p).unwrap(), r);
    }

    #[test]
    fn socket_path_too_long() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("d".repeat(60));
        let s = MachineStore::open(Some(&deep)).unwrap();
        let e = s
            .reserve(&MachineConfig::default().name("n".repeat(60)))
            .unwrap_err();
        assert!(e.to_string().contains("unix socket"), "{e}");
        assert!(s.records().is_empty());
    }
}
