//! A machine's shares (`MachineConfig.mounts`) on the host: one
//! `virtiofsd` per share and per start, the vhost-user back end of the
//! share's virtio-fs device. The monitor connects to its socket
//! (`fs<i>.sock` in the machine directory) when the VM is built, and the
//! guest agent mounts the device's tag (`smol<i>`) at the target.
//!
//! virtiofsd serves exactly one front end: it ends when the monitor's
//! connection closes (the VM stopped, or this process ended, even by
//! SIGKILL), and [`Virtiofsd`]'s drop kills and reaps it at once. Its
//! sandbox (`--sandbox namespace`) keeps the guest inside the shared
//! directory: a symlink in the share is resolved by the guest, in the
//! guest, never to a host file outside it.
//!
//! Whether it is up is read from `/proc/net/unix` (its socket listening),
//! never by connecting: a probe connection would be the one front end it
//! serves, and it would end with it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::Duration;

use smol_protocol::ShareMount;
use smol_vmm::FsConfig;
use tokio::time::Instant;

use crate::config::MountSpec;
use crate::error::{sanitize, Error, Result};

/// Longest wait for a virtiofsd to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a virtiofsd's log kept per start (what the guest makes
/// it log cannot grow the host); the rest is read and dropped.
const LOG_LIMIT: u64 = 1 << 20;
/// Bytes of the log quoted in an error.
const LOG_TAIL: u64 = 2048;
/// Where Debian's package puts the program (it is not on PATH there).
const LIBEXEC: &str = "/usr/libexec/virtiofsd";
/// `__SO_ACCEPTCON` in `/proc/net/unix`'s flags: a listening socket.
const SO_ACCEPTCON: u32 = 1 << 16;

/// The program: `SMOL_VIRTIOFSD`, else `virtiofsd` on PATH, else
/// `/usr/libexec/virtiofsd`. Looked up before anything of a machine is
/// made, so that a missing one costs nothing.
pub(crate) fn virtiofsd_program() -> Result<PathBuf> {
    let lookup = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    find_program(lookup("SMOL_VIRTIOFSD"), lookup("PATH"))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_program(
    env: Option<std::ffi::OsString>,
    path: Option<std::ffi::OsString>,
) -> Result<PathBuf> {
    if let Some(p) = env.map(PathBuf::from) {
        if is_executable(&p) {
            return Ok(p);
        }
        return Err(Error::Unsupported(format!(
            "mounts (MachineConfig.mounts) need virtiofsd: SMOL_VIRTIOFSD names {}, which is \
             not an executable file",
            p.display()
        )));
    }
    let on_path = path
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("virtiofsd"))
        .find(|p| is_executable(p));
    if let Some(p) = on_path {
        return Ok(p);
    }
    if is_executable(Path::new(LIBEXEC)) {
        return Ok(PathBuf::from(LIBEXEC));
    }
    Err(Error::Unsupported(format!(
        "mounts (MachineConfig.mounts) need virtiofsd, which is not installed: not on PATH nor \
         at {LIBEXEC} (Debian: apt-get install virtiofsd; cargo install virtiofsd; or set \
         SMOL_VIRTIOFSD to the program)"
    )))
}

/// Every source must be a directory on this host.
pub(crate) fn check_sources(mounts: &[MountSpec]) -> Result<()> {
    for m in mounts {
        match std::fs::metadata(&m.source) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::MountSource {
                    path: m.source.clone(),
                    reason: format!("not a directory (to share at {})", m.target),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::MountSource {
                    path: m.source.clone(),
                    reason: format!("no such directory (to share at {})", m.target),
                })
            }
            Err(e) => {
                return Err(Error::MountSource {
                    path: m.source.clone(),
                    reason: format!("cannot be read: {e}"),
                })
            }
        }
    }
    Ok(())
}

/// The mounts with their sources checked and made absolute (symlinks
/// resolved): the record is read later from other working directories.
pub(crate) fn resolve_sources(mounts: &[MountSpec]) -> Result<Vec<MountSpec>> {
    check_sources(mounts)?;
    mounts
        .iter()
        .map(|m| {
            let source = std::fs::canonicalize(&m.source).map_err(|e| Error::MountSource {
                path: m.source.clone(),
                reason: format!("cannot be resolved: {e}"),
            })?;
            Ok(MountSpec {
                source,
                ..m.clone()
            })
        })
        .collect()
}

/// The mount tag of the machine's `index`th share.
pub(crate) fn share_tag(index: usize) -> String {
    format!("smol{index}")
}

/// What the agent is asked to mount.
pub(crate) fn share_mounts(mounts: &[MountSpec]) -> Vec<ShareMount> {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| ShareMount {
            tag: share_tag(i),
            target: m.target.clone(),
            read_only: m.read_only,
        })
        .collect()
}

/// A machine's virtiofsds, one per share, for one start.
pub(crate) struct Shares {
    daemons: Vec<Virtiofsd>,
}

impl Shares {
    /// Starts a virtiofsd per mount, with its socket and log in `dir`,
    /// and returns them with the monitor's devices. On an error the ones
    /// started are ended again.
    pub async fn start(mounts: &[MountSpec], dir: &Path) -> Result<(Shares, Vec<FsConfig>)> {
        let program = virtiofsd_program()?;
        check_sources(mounts)?;
        let mut daemons = Vec::with_capacity(mounts.len());
        let mut devices = Vec::with_capacity(mounts.len());
        for (i, m) in mounts.iter().enumerate() {
            let socket = dir.join(format!("fs{i}.sock"));
            let log = dir.join(format!("fs{i}.log"));
            let d = Virtiofsd::spawn(&program, &m.source, &socket, m.read_only, &log).await?;
            daemons.push(d);
            devices.push(FsConfig::new(share_tag(i), socket));
        }
        Ok((Shares { daemons }, devices))
    }

    /// The shares whose virtiofsd ended since the last call (it should
    /// not while the machine runs): their host directories and logs.
    pub fn ended(&mut self) -> Vec<(PathBuf, PathBuf, std::process::ExitStatus)> {
        self.daemons
            .iter_mut()
            .filter_map(|d| {
                let status = d.exited()?;
                (!std::mem::replace(&mut d.reported, true))
                    .then(|| (d.source.clone(), d.log.clone(), status))
            })
            .collect()
    }
}

/// A running virtiofsd, killed and reaped when dropped (its socket and
/// pid file go with it).
pub(crate) struct Virtiofsd {
    child: Child,
    source: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// Copies its stderr into the log, up to [`LOG_LIMIT`].
    logger: Option<std::thread::JoinHandle<()>>,
    /// Its end was logged already.
    reported: bool,
}

impl Virtiofsd {
    /// Starts `binary` sharing `source` on `socket`, logging to `log`, and
    /// waits until it listens (at most [`LISTEN_TIMEOUT`]).
    pub async fn spawn(
        binary: &Path,
        source: &Path,
        socket: &Path,
        read_only: bool,
        log: &Path,
    ) -> Result<Virtiofsd> {
        // Left by a virtiofsd of an earlier start that was killed.
        for stale in [socket.to_path_buf(), pid_file(socket)] {
            match std::fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", stale.display()), e)),
            }
        }
        let log_file =
            File::create(log).map_err(|e| Error::io(format!("creating {}", log.display()), e))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--shared-dir")
            .arg(source)
            .arg("--socket-path")
            .arg(socket)
            // A mount namespace whose root is the shared directory (and
            // pid and network namespaces): nothing outside is reachable.
            .args(["--sandbox", "namespace"])
            .args(["--cache", "auto"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if read_only {
            cmd.arg("--readonly");
        }
        let mut child = cmd.spawn().map_err(|e| Error::Virtiofsd {
            path: source.to_path_buf(),
            reason: format!("cannot start {}: {e}", binary.display()),
        })?;
        let logger = child.stderr.take().and_then(|err| copy_log(err, log_file));
        let mut d = Virtiofsd {
            child,
            source: source.to_path_buf(),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            logger,
            reported: false,
        };
        d.wait_listening().await?;
        Ok(d)
    }

    async fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(status) = self.exited() {
                return Err(self.failed(format!("it ended at start ({status})")).await);
            }
            if listening(&self.socket) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let what = format!(
                    "it did not listen on {} within {LISTEN_TIMEOUT:?}",
                    self.socket.display()
                );
                return Err(self.failed(what).await);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The error of a virtiofsd that did not come up, with its log's end.
    async fn failed(&mut self, what: String) -> Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its stderr closes with it: the log is complete soon after.
        if let Some(logger) = &self.logger {
            let until = Instant::now() + Duration::from_millis(500);
            while !logger.is_finished() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let tail = log_tail(&self.log);
        Error::Virtiofsd {
            path: self.source.clone(),
            reason: match tail.is_empty() {
                true => format!("{what}; its log is empty"),
                false => format!("{what}; its log ends:\n{tail}"),
            },
        }
    }

    /// Whether it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(pid_file(&self.socket));
    }
}

/// virtiofsd's lock file beside its socket.
fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// Copies `err` into `log` on a thread of its own, keeping the first
/// [`LOG_LIMIT`] bytes; the rest is read and dropped, so virtiofsd never
/// blocks on a full pipe. The thread ends with virtiofsd's stderr.
fn copy_log(mut err: ChildStderr, mut log: File) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new()
        .name("virtiofsd-log".into())
        .spawn(move || {
            let mut buf = [0u8; 8192];
            let mut left = LOG_LIMIT;
            loop {
                let n = match err.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                if left == 0 {
                    continue;
                }
                let keep = n.min(usize::try_from(left).unwrap_or(usize::MAX));
                if log.write_all(&buf[..keep]).is_err() {
                    left = 0;
                    continue;
                }
                left -= keep as u64;
                if left == 0 {
                    let _ = log.write_all(b"\n[smol: the log is cut here at 1 MiB]\n");
                }
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("cannot start the thread that keeps virtiofsd's log: {e}");
            None
        }
    }
}

/// The end of a log, safe to print.
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL).read_to_end(&mut buf);
    sanitize(String::from_utf8_lossy(&buf).trim())
}

/// Whether a socket bound at `socket` listens, as `/proc/net/unix` says.
fn listening(socket: &Path) -> bool {
    let Ok(table) = std::fs::read("/proc/net/unix") else {
        return false;
    };
    listening_in(&table, socket.as_os_str().as_bytes())
}

/// `/proc/net/unix` lines: `Num RefCount Protocol Flags Type St Inode Path`,
/// the path last (it may hold spaces).
fn listening_in(table: &[u8], want: &[u8]) -> bool {
    table.split(|b| *b == b'\n').skip(1).any(|line| {
        let mut rest = line;
        let mut flags = None;
        for i in 0..7 {
            let start = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
            rest = &rest[start..];
            let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
            if i == 3 {
                flags = std::str::from_utf8(&rest[..end])
                    .ok()
                    .and_then(|f| u32::from_str_radix(f, 16).ok());
            }
            rest = &rest[end..];
        }
        let path = rest.strip_prefix(b" ").unwrap_or(rest);
        flags.is_some_and(|f| f & SO_ACCEPTCON != 0) && path == want
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_found_or_named() {
        let t = tempfile::tempdir().unwrap();
        let exe = t.path().join("virtiofsd");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = find_program(Some(exe.clone().into()), None).unwrap();
        assert_eq!(found, exe);
        let found = find_program(None, Some(t.path().as_os_str().to_owned())).unwrap();
        assert_eq!(found, exe);
        let e = find_program(Some(t.path().join("nope").into()), None).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("SMOL_VIRTIOFSD"), "{e}");
        // Not executable: not it.
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(find_program(Some(exe.into()), None).is_err());
        if !Path::new(LIBEXEC).exists() {
            let e = find_program(None, Some(t.path().as_os_str().to_owned())).unwrap_err();
            assert!(e.to_string().contains("not installed"), "{e}");
        }
    }

    #[test]
    fn sources_must_be_directories() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let missing = t.path().join("missing");
        check_sources(&[MountSpec::new(t.path(), "/data")]).unwrap();
        for (source, needle) in [(&file, "not a directory"), (&missing, "no such directory")] {
            let e = check_sources(&[MountSpec::new(source, "/data")]).unwrap_err();
            assert!(
                matches!(&e, Error::MountSource { path, .. } if path == source),
                "{e}"
            );
            let text = e.to_string();
            assert!(
                text.contains(needle) && text.contains(&source.display().to_string()),
                "{text}"
            );
        }
        // Made absolute, symlinks resolved.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        let resolved = resolve_sources(&[MountSpec::new(&link, "/data").read_only()]).unwrap();
        assert_eq!(resolved[0].source, t.path().canonicalize().unwrap());
        assert!(resolved[0].read_only);
    }

    #[test]
    fn tags_are_numbered() {
        let m = share_mounts(&[
            MountSpec::new("/a", "/x"),
            MountSpec::new("/b", "/y").read_only(),
        ]);
        assert_eq!(m[0].tag, "smol0");
        assert_eq!(m[1].tag, "smol1");
        assert!(m[1].read_only && !m[0].read_only);
        for t in &m {
            smol_protocol::check_share_tag(&t.tag).unwrap();
        }
    }

    #[test]
    fn a_listening_socket_is_read_from_the_table() {
        let table = b"Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 62793 /m/a b/fs0.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 62794 /m/x/fs0.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 62795\n";
        assert!(listening_in(table, b"/m/a b/fs0.sock"));
        assert!(
            !listening_in(table, b"/m/x/fs0.sock"),
            "connected, not listening"
        );
        assert!(!listening_in(table, b"/m/a"));
        assert!(!listening_in(b"", b"/m/a b/fs0.sock"));

        // And the real table: a listener of ours shows.
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.sock");
        assert!(!listening(&p));
        let _l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(listening(&p));
    }

    #[test]
    fn the_log_is_bounded() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("fs0.log");
        let mut child = Command::new("sh")
            .args([
                "-c",
                "head -c 3000000 /dev/zero | tr '\\0' x >&2; echo done",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let h = copy_log(child.stderr.take().unwrap(), File::create(&log).unwrap()).unwrap();
        assert!(child.wait().unwrap().success(), "never blocked on the pipe");
        h.join().unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        assert!(len > LOG_LIMIT && len < LOG_LIMIT + 100, "{len}");
        assert!(log_tail(&log).ends_with("at 1 MiB]"));
    }

    /// With the real virtiofsd (`SMOL_VIRTIOFSD`, as `cargo xtask test`
    /// sets it): it listens, and the drop leaves no process and no file.
    /// (A missing source is the SDK's own check, `check_sources`, before
    /// any virtiofsd: whether virtiofsd itself refuses one before or after
    /// it listens is a race.)
    #[tokio::test]
    async fn a_real_virtiofsd_starts_and_ends() {
        let Ok(program) = virtiofsd_program() else {
            eprintln!("skipped: no virtiofsd (set SMOL_VIRTIOFSD)");
            return;
        };
        let t = tempfile::tempdir().unwrap();
        let share = t.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let socket = t.path().join("fs0.sock");
        let log = t.path().join("fs0.log");
        std::fs::write(pid_file(&socket), b"stale").unwrap();
        let mut d = Virtiofsd::spawn(&program, &share, &socket, true, &log)
            .await
            .unwrap();
        assert!(listening(&socket));
        assert!(d.exited().is_none());
        let pid = d.child.id();
        drop(d);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
        assert!(!socket.exists() && !pid_file(&socket).exists());
    }
}
