//! A machine snapshot directory: the monitor's snapshot (`vm.json`,
//! `memory.bin`, `disk0.img`; see `smol_vmm::snapshot`) and `machine.json`,
//! the machine's config as smol knows it (resources, image), with a format
//! version of its own.
//!
//! Taking one ([`Machine::snapshot`](crate::Machine::snapshot)) leaves the
//! machine running. Restoring one ([`Machine::restore`](crate::Machine::restore))
//! copies its disk (a reflink where the filesystem has them) and maps its
//! memory copy-on-write, so one snapshot serves any number of restores and
//! never changes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use smol_vmm::snapshot::{self as vmsnap, VmSnapshot};

use crate::config::MachineConfig;
use crate::error::{Error, Result};

/// smol's file in a snapshot directory.
pub(crate) const MACHINE_FILE: &str = "machine.json";
/// Bumped when [`SnapshotRecord`] changes meaning.
pub(crate) const RECORD_VERSION: u32 = 1;
/// The machine disk inside a snapshot (the monitor's first disk).
pub(crate) fn disk_file() -> String {
    vmsnap::disk_file(0)
}

/// `machine.json` of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub version: u32,
    /// The agent protocol the guest in the snapshot speaks.
    pub protocol: u32,
    /// The machine's config at the snapshot (its name is not reused).
    pub config: MachineConfig,
}

fn snapshot_error(dir: &Path, source: vmsnap::Error) -> Error {
    Error::Snapshot {
        path: dir.to_path_buf(),
        source,
    }
}

/// Creates `dir` if needed; it must be empty (a snapshot never overwrites).
pub(crate) fn prepare_dir(dir: &Path) -> Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => {}
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
    }
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    if entries.next().is_some() {
        return Err(Error::InvalidArgument {
            what: "snapshot directory",
            reason: format!("{} is not empty", dir.display()),
        });
    }
    Ok(())
}

/// Writes `machine.json` after the monitor's part, so that a directory
/// with it is a whole snapshot, after a crash of the host too: the
/// monitor's files are flushed to disk first, the record and the
/// directory after it.
pub(crate) fn write_record(dir: &Path, config: &MachineConfig) -> Result<()> {
    let sync = |path: &Path| {
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(format!("flushing {} to disk", path.display()), e))
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            sync(&entry.path())?;
        }
    }
    let record = SnapshotRecord {
        version: RECORD_VERSION,
        protocol: smol_protocol::PROTOCOL_VERSION,
        config: MachineConfig {
            name: None,
            ..config.clone()
        },
    };
    let text = serde_json::to_vec_pretty(&record).expect("the snapshot record serializes");
    let tmp = dir.join(format!(".{MACHINE_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    sync(&tmp)?;
    std::fs::rename(&tmp, dir.join(MACHINE_FILE))
        .map_err(|e| Error::io(format!("writing {}", dir.join(MACHINE_FILE).display()), e))?;
    sync(dir)
}

/// Reads and checks a snapshot directory: smol's record and the monitor's
/// state (format versions, memory file size), before anything is created.
pub(crate) fn load(dir: &Path) -> Result<(SnapshotRecord, VmSnapshot)> {
    let path = dir.join(MACHINE_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(snapshot_error(
                dir,
                vmsnap::Error::NotFound {
                    path: dir.to_path_buf(),
                },
            ))
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let corrupt = |reason: String| {
        snapshot_error(
            dir,
            vmsnap::Error::Corrupt {
                what: path.display().to_string(),
                reason,
            },
        )
    };
    let record: SnapshotRecord =
        serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(snapshot_error(
            dir,
            vmsnap::Error::Version {
                found: record.version,
                expected: RECORD_VERSION,
            },
        ));
    }
    if record.protocol != smol_protocol::PROTOCOL_VERSION {
        return Err(corrupt(format!(
            "its agent speaks protocol {}, this smol speaks {}",
            record.protocol,
            smol_protocol::PROTOCOL_VERSION
        )));
    }
    record
        .config
        .validate()
        .map_err(|e| corrupt(format!("its machine config: {e}")))?;
    let vm = VmSnapshot::load(dir).map_err(|e| snapshot_error(dir, e))?;
    if vm.memory_mib != record.config.resources.memory_mb || vm.disks.len() != 1 {
        return Err(corrupt(
            "the machine config does not match the vm state".into(),
        ));
    }
    let disk = dir.join(disk_file());
    if !disk.is_file() {
        return Err(corrupt(format!("{} is missing", disk.display())));
    }
    Ok((record, vm))
}

/// Copies the snapshot's disk to `dst` (a reflink where possible).
pub(crate) fn copy_disk(dir: &Path, dst: &Path) -> Result<()> {
    vmsnap::clone_file(&dir.join(disk_file()), dst)
        .map(|_| ())
        .map_err(|e| snapshot_error(dir, e))
}

/// Where a fork keeps the snapshot its clone runs from: inside the clone's
/// own directory, so it goes with the clone.
pub(crate) fn fork_base(clone_dir: &Path) -> PathBuf {
    clone_dir.join("base")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_snapshot_directories_are_named() {
        let t = tempfile::tempdir().unwrap();
        let e = load(t.path()).err().unwrap();
        assert!(
            matches!(
                &e,
                Error::Snapshot {
                    source: vmsnap::Error::NotFound { .. },
                    ..
                }
            ),
            "{e}"
        );
        std::fs::write(t.path().join(MACHINE_FILE), b"{ not json").unwrap();
        let e = load(t.path()).err().unwrap();
        assert!(
            matches!(
                &e,
                Error::Snapshot {
                    source: vmsnap::Error::Corrupt { .. },
                    ..
                }
            ),
            "{e}"
        );
        write_record(t.path(), &MachineConfig::default()).unwrap();
        let mut r: SnapshotRecord =
            serde_json::from_slice(&std::fs::read(t.path().join(MACHINE_FILE)).unwrap()).unwrap();
        r.version = 7;
        std::fs::write(t.path().join(MACHINE_FILE), serde_json::to_vec(&r).unwrap()).unwrap();
        let e = load(t.path()).err().unwrap();
        assert!(
            matches!(
                &e,
                Error::Snapshot {
                    source: vmsnap::Error::Version { found: 7, .. },
                    ..
                }
            ),
            "{e}"
        );
        // smol's record alone is not a snapshot.
        write_record(t.path(), &MachineConfig::default()).unwrap();
        let e = load(t.path()).err().unwrap();
        assert!(
            matches!(
                &e,
                Error::Snapshot {
                    source: vmsnap::Error::NotFound { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn snapshot_directories_must_be_empty() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        prepare_dir(&d).unwrap();
        prepare_dir(&d).unwrap();
        std::fs::write(d.join("x"), b"").unwrap();
        assert!(matches!(
            prepare_dir(&d),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
