//! The machine's shares (`MachineConfig.mounts`) in the guest: each is a
//! virtio-fs device whose back end is a virtiofsd on the host, mounted by
//! its tag. The host asks for them after every boot and restore
//! (`Request::Mount`) and has them unmounted before a snapshot
//! (`Request::Unmount`): FUSE node ids belong to the virtiofsd that
//! handed them out, and a restored machine talks to a new one.
//!
//! Both requests are idempotent: a share mounted already is kept, a
//! target with no share is skipped. The directories a mount had to create
//! are removed again after its unmount (when empty), so a snapshot, a
//! warm one that serves other machines too, holds no trace of them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::protocol::{
    check_mount_target, check_share_tag, AgentError, ErrorKind, Response, ShareMount, MAX_SHARES,
};
use crate::server::{send_error, send_response, Duplex, ServeError};

/// The file system type of a virtio-fs share.
const FSTYPE: &str = "virtiofs";
/// Largest mount table read.
const MAX_MOUNT_TABLE: u64 = 4 << 20;

/// The directories each mount created, outermost first, by target.
static CREATED: Mutex<Vec<(String, Vec<PathBuf>)>> = Mutex::new(Vec::new());

pub fn serve_mount<S: Duplex>(s: &mut S, mounts: &[ShareMount]) -> Result<(), ServeError> {
    match mount_shares(mounts) {
        Ok(()) => send_response(s, &Response::Ok)?,
        Err(e) => send_error(s, &e)?,
    }
    Ok(())
}

pub fn serve_unmount<S: Duplex>(s: &mut S, targets: &[String]) -> Result<(), ServeError> {
    match unmount_shares(targets) {
        Ok(()) => send_response(s, &Response::Ok)?,
        Err(e) => send_error(s, &e)?,
    }
    Ok(())
}

fn invalid(reason: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, reason)
}

/// Checks a whole request before anything is mounted.
fn check_request<'a>(targets: impl Iterator<Item = &'a str>) -> Result<(), AgentError> {
    let mut seen = Vec::new();
    for t in targets {
        check_mount_target(t).map_err(|e| invalid(format!("share target {e}")))?;
        if seen.contains(&t) {
            return Err(invalid(format!("share target {t:?} is given twice")));
        }
        seen.push(t);
    }
    if seen.len() > MAX_SHARES {
        return Err(invalid(format!(
            "{} shares; at most {MAX_SHARES}",
            seen.len()
        )));
    }
    Ok(())
}

fn mount_shares(mounts: &[ShareMount]) -> Result<(), AgentError> {
    check_request(mounts.iter().map(|m| m.target.as_str()))?;
    for m in mounts {
        check_share_tag(&m.tag).map_err(invalid)?;
    }
    let table = MountTable::read()?;
    for m in mounts {
        if table.top(&m.target).is_some_and(|e| e.is_share(&m.tag)) {
            continue;
        }
        let created = create_dirs(Path::new(&m.target))?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if m.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        if let Err(errno) = mount(
            Some(m.tag.as_str()),
            m.target.as_str(),
            Some(FSTYPE),
            flags,
            None::<&str>,
        ) {
            remove_dirs(&created);
            return Err(AgentError::new(
                kind_of(errno),
                format!("mounting share {} on {}: {errno}", m.tag, m.target),
            ));
        }
        let mut list = CREATED.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(t, _)| t != &m.target);
        list.push((m.target.clone(), created));
    }
    Ok(())
}

fn unmount_shares(targets: &[String]) -> Result<(), AgentError> {
    check_request(targets.iter().map(String::as_str))?;
    let table = MountTable::read()?;
    for target in targets {
        match table.top(target) {
            None => {}
            Some(e) if e.fstype != FSTYPE => {
                return Err(AgentError::new(
                    ErrorKind::InUse,
                    format!(
                        "a {} file system is mounted over the share at {target}",
                        e.fstype
                    ),
                ));
            }
            Some(_) => match umount2(target.as_str(), MntFlags::empty()) {
                Ok(()) => {}
                Err(Errno::EBUSY) => {
                    return Err(AgentError::new(
                        ErrorKind::InUse,
                        format!(
                            "the share at {target} is busy: a guest process has a file, or its \
                             working directory, in it"
                        ),
                    ))
                }
                Err(errno) => {
                    return Err(AgentError::new(
                        kind_of(errno),
                        format!("unmounting the share at {target}: {errno}"),
                    ))
                }
            },
        }
        let created = {
            let mut list = CREATED.lock().unwrap_or_else(|p| p.into_inner());
            let at = list.iter().position(|(t, _)| t == target);
            at.map(|i| list.remove(i).1)
        };
        if let Some(dirs) = created {
            remove_dirs(&dirs);
        }
    }
    Ok(())
}

fn kind_of(errno: Errno) -> ErrorKind {
    match errno {
        Errno::ENOENT | Errno::ENODEV => ErrorKind::NotFound,
        Errno::EACCES | Errno::EPERM => ErrorKind::PermissionDenied,
        Errno::ENOTDIR => ErrorKind::NotADirectory,
        Errno::EBUSY => ErrorKind::InUse,
        Errno::ENOSPC => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    }
}

/// `mkdir -p path`; returns the directories it made, outermost first.
fn create_dirs(path: &Path) -> Result<Vec<PathBuf>, AgentError> {
    let mut missing: Vec<PathBuf> = path
        .ancestors()
        .take_while(|p| std::fs::symlink_metadata(p).is_err())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    let mut created = Vec::new();
    for dir in missing {
        if let Err(e) = std::fs::create_dir(&dir) {
            remove_dirs(&created);
            let kind = match e.kind() {
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                _ => ErrorKind::Io,
            };
            return Err(AgentError::new(
                kind,
                format!("creating the share target {}: {e}", dir.display()),
            ));
        }
        created.push(dir);
    }
    Ok(created)
}

/// Removes what [`create_dirs`] made, innermost first; one that is not
/// empty (a guest process wrote there) stays, and so do its parents.
fn remove_dirs(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
    }
}

/// One line of `/proc/self/mounts`.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    source: String,
    target: String,
    fstype: String,
}

impl MountEntry {
    fn is_share(&self, tag: &str) -> bool {
        self.fstype == FSTYPE && self.source == tag
    }
}

struct MountTable(Vec<MountEntry>);

impl MountTable {
    fn read() -> Result<MountTable, AgentError> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open("/proc/self/mounts")
            .and_then(|f| f.take(MAX_MOUNT_TABLE).read_to_string(&mut text))
            .map_err(|e| AgentError::new(ErrorKind::Io, format!("reading the mount table: {e}")))?;
        Ok(MountTable::parse(&text))
    }

    fn parse(text: &str) -> MountTable {
        MountTable(
            text.lines()
                .filter_map(|l| {
                    let mut f = l.split(' ');
                    Some(MountEntry {
                        source: unescape(f.next()?),
                        target: unescape(f.next()?),
                        fstype: unescape(f.next()?),
                    })
                })
                .collect(),
        )
    }

    /// What is mounted on top at `target` (the table lists mounts in
    /// the order they were made), if anything. The table names the
    /// directory a mount was made on with symlinks resolved.
    fn top(&self, target: &str) -> Option<&MountEntry> {
        let resolved = std::fs::canonicalize(target).ok()?;
        let resolved = resolved.to_str()?;
        self.0.iter().rev().find(|e| e.target == resolved)
    }
}

/// Undoes the table's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], octal) {
            let v =
                u32::from(d[0] - b'0') * 64 + u32::from(d[1] - b'0') * 8 + u32::from(d[2] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Request;
    use crate::server::testing::connect;

    fn share(tag: &str, target: &str) -> ShareMount {
        ShareMount {
            tag: tag.into(),
            target: target.into(),
            read_only: false,
        }
    }

    /// Nothing here mounts: these tests run on the host.
    #[test]
    fn bad_requests_are_refused_before_anything_is_mounted() {
        for (mounts, needle) in [
            (vec![share("smol0", "data")], "absolute"),
            (vec![share("smol0", "/proc/x")], "reserved"),
            (vec![share("smol0", "/mnt/../etc")], "normalised"),
            (vec![share("bad tag", "/mnt")], "share tag"),
            (
                vec![share("smol0", "/mnt"), share("smol1", "/mnt")],
                "twice",
            ),
            (
                (0..=MAX_SHARES)
                    .map(|i| share("smol0", &format!("/m{i}")))
                    .collect(),
                "at most",
            ),
        ] {
            let mut c = connect();
            c.send(&Request::Mount { mounts });
            let e = c.response().unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
            assert!(e.message.contains(needle), "{needle}: {e:?}");
        }
        let mut c = connect();
        c.send(&Request::Unmount {
            targets: vec!["/".into()],
        });
        assert_eq!(c.response().unwrap_err().kind, ErrorKind::InvalidArgument);
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_fine() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("never-made");
        let mut c = connect();
        c.send(&Request::Unmount {
            targets: vec![
                t.path().to_str().unwrap().to_string(),
                missing.to_str().unwrap().to_string(),
            ],
        });
        assert_eq!(c.response().unwrap(), Response::Ok);
        assert!(!missing.exists());
    }

    #[test]
    fn created_directories_go_again_unless_used() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("a/b/c");
        let made = create_dirs(&target).unwrap();
        assert_eq!(
            made,
            vec![t.path().join("a"), t.path().join("a/b"), target.clone()]
        );
        assert!(target.is_dir());
        assert!(create_dirs(&target).unwrap().is_empty(), "all there");
        remove_dirs(&made);
        assert!(!t.path().join("a").exists());

        let made = create_dirs(&target).unwrap();
        std::fs::write(t.path().join("a/kept"), b"x").unwrap();
        remove_dirs(&made);
        assert!(!t.path().join("a/b").exists());
        assert!(t.path().join("a/kept").is_file(), "a used parent stays");
    }

    #[test]
    fn the_mount_table_is_parsed_with_escapes() {
        let table = MountTable::parse(
            "proc /proc proc rw,nosuid 0 0\n\
             smol0 /srv/my\\040share virtiofs rw,nosuid,nodev 0 0\n\
             tmpfs /srv/my\\040share tmpfs rw 0 0\n\
             short\n",
        );
        assert_eq!(table.0.len(), 3);
        assert_eq!(table.0[1].target, "/srv/my share");
        assert!(table.0[1].is_share("smol0"));
        assert!(!table.0[1].is_share("smol1"));
        assert!(!table.0[2].is_share("smol0"));
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("end\\04"), "end\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }
}
