//! Containers: an exec whose target is an image runs in its own mount, PID,
//! UTS and IPC namespaces, chrooted into an overlay of the image's layers
//! with a per-container upper directory, with /proc, /dev (the guest's,
//! bound) and a fresh /tmp, under the image's user.
//!
//! The exec path is the plain one (`crate::exec`); only the spawn differs:
//! [`Container::clone_child`] replaces `fork` (the child is PID 1 of a new
//! PID namespace, so when it exits the kernel kills whatever it left), and
//! the child calls [`Container::enter`] before its usual set-up and execve.
//!
//! The overlay is mounted by the agent before the clone (so that the
//! workdir and the program can be checked inside the image first) and
//! detached, with the container's directory removed, when the exec ends.
//! The container's own mount namespace keeps its view until its last
//! process is gone.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, ForkResult, Pid, UnlinkatFlags};

use super::{digest_hex, serve, ContainerSpec, ImageError};
use crate::protocol::{AgentError, ErrorKind};

/// Child failure stages reported through exec's status pipe start here;
/// `stage - CONTAINER_STAGE` indexes [`STEPS`].
pub const CONTAINER_STAGE: u32 = 100;
const STEPS: &[&str] = &[
    "make mounts private",
    "mount /proc",
    "bind /dev",
    "mount /tmp",
    "enter the root",
    "set the hostname",
    "set the groups",
    "set the group id",
    "set the user id",
];

/// What a failed container stage was doing.
pub fn stage_what(stage: u32) -> String {
    let step = stage
        .checked_sub(CONTAINER_STAGE)
        .and_then(|i| STEPS.get(i as usize))
        .unwrap_or(&"set up");
    format!("cannot start the container: {step}")
}

/// In a child that failed to enter its container: reports `stage` and
/// `errno` on exec's status pipe (its format: stage u32 LE, errno i32 LE)
/// and exits without running any destructor.
pub fn child_failed(status_fd: i32, stage: u32, errno: i32) -> ! {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&stage.to_le_bytes());
    msg[4..].copy_from_slice(&errno.to_le_bytes());
    // SAFETY: a write of a stack buffer to our own pipe, then _exit; both
    // are async-signal-safe.
    unsafe {
        libc::write(status_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A prepared container: overlay mounted, user resolved, every string the
/// child needs built (the child of a multi-threaded process must not allocate).
pub struct Container {
    dir: PathBuf,
    root: PathBuf,
    root_fd: OwnedFd,
    mounted: bool,
    c_root: CString,
    c_proc: CString,
    c_dev: CString,
    c_tmp: CString,
    hostname: Vec<u8>,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    home: String,
}

fn invalid(msg: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, msg)
}

fn cstring(p: &Path) -> Result<CString, AgentError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| invalid(format!("path with a NUL byte: {}", p.display())))
}

/// Opens `path` inside `root` as if `root` were `/` (symlinks, absolute or
/// relative, and `..` cannot leave it).
fn open_in_root(root: &OwnedFd, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    let rel = path.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    openat2(
        root,
        rel,
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    )
}

fn read_in_root(root: &OwnedFd, path: &str) -> Option<String> {
    let fd = open_in_root(root, path, OFlag::O_RDONLY).ok()?;
    let mut text = String::new();
    fs::File::from(fd)
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// A passwd entry: (name, uid, gid, home).
fn passwd_entries(text: &str) -> Vec<(String, u32, u32, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some((
                f[0].to_string(),
                f[2].parse().ok()?,
                f[3].parse().ok()?,
                f[5].to_string(),
            ))
        })
        .collect()
}

/// A group entry: (name, gid, members).
fn group_entries(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolves `user` (`uid`, `uid:gid`, `name`, `name:group`; empty = root)
/// against the image's /etc/passwd and /etc/group: (uid, gid, groups, home).
pub fn resolve_user(
    user: Option<&str>,
    passwd: &str,
    group: &str,
) -> Result<(u32, u32, Vec<u32>, String), AgentError> {
    let users = passwd_entries(passwd);
    let groups = group_entries(group);
    let spec = user.unwrap_or("").trim();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = if u.is_empty() {
        users.iter().find(|e| e.1 == 0)
    } else if let Ok(uid) = u.parse::<u32>() {
        users.iter().find(|e| e.1 == uid)
    } else {
        Some(users.iter().find(|e| e.0 == u).ok_or_else(|| {
            AgentError::new(
                ErrorKind::NotFound,
                format!("user {u:?} not found in the image's /etc/passwd"),
            )
        })?)
    };
    let uid = match u.parse::<u32>() {
        Ok(uid) => uid,
        Err(_) => entry.map_or(0, |e| e.1),
    };
    let gid = match g {
        Some(g) if !g.is_empty() => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|e| e.0 == g)
                .map(|e| e.1)
                .ok_or_else(|| {
                    AgentError::new(
                        ErrorKind::NotFound,
                        format!("group {g:?} not found in the image's /etc/group"),
                    )
                })?,
        },
        _ => entry.map_or(0, |e| e.2),
    };
    let mut supplementary = vec![gid];
    if let Some(name) = entry.map(|e| e.0.as_str()) {
        for (_, id, members) in &groups {
            if members.iter().any(|m| m == name) && !supplementary.contains(id) {
                supplementary.push(*id);
            }
        }
    }
    let home = entry
        .map(|e| e.3.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok((uid, gid, supplementary, home))
}

impl Container {
    /// Mounts the overlay of `spec.image` and prepares the child's set-up.
    pub fn create(spec: &ContainerSpec) -> Result<Container, AgentError> {
        let store = serve::store()?;
        let record = store.find(&spec.image).map_err(serve::agent_error)?;
        let mut lowers = Vec::new();
        for l in record.layers.iter().rev() {
            let dir = store.layer_dir(&l.digest).map_err(serve::agent_error)?;
            if !dir.is_dir() {
                return Err(serve::agent_error(ImageError::LayerMissing(
                    l.digest.clone(),
                )));
            }
            lowers.push(dir);
        }
        let id = format!(
            "{}-{}",
            &digest_hex(&record.digest).map_err(serve::agent_error)?[..12],
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = store
            .root()
            .join("containers")
            .join(format!("{id}-{}", std::process::id()));
        let root = dir.join("root");
        let upper = dir.join("upper");
        let work = dir.join("work");
        let empty = dir.join("empty");
        let _ = fs::remove_dir_all(&dir);
        for d in [&root, &upper, &work, &empty] {
            fs::create_dir_all(d)
                .map_err(|e| serve::agent_error(ImageError::io("create", d, e)))?;
        }
        // Dropping `c` from here on unmounts and removes what was made.
        let mut c = Container {
            root_fd: nix::fcntl::open(
                &root,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| crate::exec::errno_error(e, "container root"))?,
            c_root: cstring(&root)?,
            c_proc: cstring(&root.join("proc"))?,
            c_dev: cstring(&root.join("dev"))?,
            c_tmp: cstring(&root.join("tmp"))?,
            dir,
            root,
            mounted: false,
            hostname: Vec::new(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: "/".into(),
        };
        if lowers.is_empty() {
            lowers.push(empty);
        }
        let lower = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        if opts.len() >= 4000 {
            return Err(AgentError::new(
                ErrorKind::Unsupported,
                format!(
                    "image {} has too many layers ({}) for one overlay mount",
                    record.digest,
                    lowers.len()
                ),
            ));
        }
        mount(
            Some("overlay"),
            &c.root,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| crate::exec::errno_error(e, "cannot mount the container's overlay"))?;
        c.mounted = true;
        c.root_fd = nix::fcntl::open(
            &c.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| crate::exec::errno_error(e, "container root"))?;
        for d in ["proc", "dev", "tmp"] {
            c.ensure_dir(d)?;
        }
        let passwd = read_in_root(&c.root_fd, "/etc/passwd").unwrap_or_default();
        let group = read_in_root(&c.root_fd, "/etc/group").unwrap_or_default();
        let (uid, gid, groups, home) = resolve_user(spec.user.as_deref(), &passwd, &group)?;
        c.uid = uid;
        c.gid = gid;
        c.groups = groups;
        c.home = home;
        let hostname = spec
            .hostname
            .clone()
            .unwrap_or_else(|| id[..12].to_string());
        if hostname.is_empty() || hostname.len() > 64 || hostname.contains('\0') {
            return Err(invalid(format!("invalid container hostname {hostname:?}")));
        }
        c.hostname = hostname.into_bytes();
        Ok(c)
    }

    /// Makes `name` at the top of the root a real directory (an image may
    /// ship a symlink there, which a mount would follow out of the root).
    fn ensure_dir(&self, name: &str) -> Result<(), AgentError> {
        let err = |e: Errno| crate::exec::errno_error(e, &format!("container /{name}"));
        match fstatat(&self.root_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                return Ok(())
            }
            Ok(_) => unlinkat(&self.root_fd, name, UnlinkatFlags::NoRemoveDir).map_err(err)?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(err(e)),
        }
        mkdirat(&self.root_fd, name, Mode::from_bits_truncate(0o755)).map_err(err)
    }

    /// The environment before the request's own (which carries the image's Env).
    pub fn default_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PATH".into(), super::DEFAULT_PATH.into()),
            ("HOME".into(), self.home.clone()),
            (
                "HOSTNAME".into(),
                String::from_utf8_lossy(&self.hostname).into_owned(),
            ),
        ];
        env.extend(crate::system::inherited_env());
        env
    }

    /// The workdir must be a directory inside the image.
    pub fn check_workdir(&self, workdir: &str) -> Result<(), AgentError> {
        let fd = open_in_root(&self.root_fd, workdir, OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(
            |e| match e {
                Errno::ENOTDIR => AgentError::new(
                    ErrorKind::NotADirectory,
                    format!("workdir is not a directory: {workdir}"),
                ),
                e => crate::exec::errno_error(e, &format!("workdir {workdir}")),
            },
        )?;
        drop(fd);
        Ok(())
    }

    /// The program execve runs (a path inside the container): `argv0` when
    /// it has a `/`, else the first executable match on `path_var`.
    pub fn resolve_program(
        &self,
        argv0: &str,
        path_var: &str,
        workdir: &str,
    ) -> Result<String, AgentError> {
        let is_exec = |p: &str| {
            open_in_root(&self.root_fd, p, OFlag::O_PATH)
                .ok()
                .and_then(|fd| fstat(fd.as_fd()).ok())
                .is_some_and(|st| {
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
                        && st.st_mode & 0o111 != 0
                })
        };
        let in_workdir = |p: &str| {
            if p.starts_with('/') {
                p.to_string()
            } else {
                format!("{}/{p}", workdir.trim_end_matches('/'))
            }
        };
        if argv0.contains('/') {
            let p = in_workdir(argv0);
            if open_in_root(&self.root_fd, &p, OFlag::O_PATH).is_err() {
                return Err(AgentError::new(
                    ErrorKind::NotFound,
                    format!("executable not found in the image: {argv0}"),
                ));
            }
            return Ok(argv0.to_string());
        }
        for dir in path_var.split(':') {
            let candidate = in_workdir(&format!(
                "{}/{argv0}",
                if dir.is_empty() { "." } else { dir }
            ));
            if is_exec(&candidate) {
                return Ok(candidate);
            }
        }
        Err(AgentError::new(
            ErrorKind::NotFound,
            format!("executable not found in the image's PATH: {argv0}"),
        ))
    }

    /// Like `fork`, but the child starts in new mount, PID, UTS and IPC
    /// namespaces (it is PID 1 of its PID namespace).
    ///
    /// # Safety
    /// As for `fork` in a multi-threaded process: the child may only make
    /// async-signal-safe calls (no allocation, no locks) until it execs.
    pub unsafe fn clone_child(&self) -> Result<ForkResult, Errno> {
        let flags = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::SIGCHLD;
        // SAFETY: the raw clone syscall without a new stack behaves like
        // fork (the child continues on a copy of this stack); the caller
        // upholds fork's rules in the child.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        match r {
            r if r < 0 => Err(Errno::last()),
            0 => Ok(ForkResult::Child),
            pid => Ok(ForkResult::Parent {
                child: Pid::from_raw(pid as i32),
            }),
        }
    }

    /// In the child: mounts /proc, /dev and /tmp, enters the root, sets the
    /// hostname and drops to the image's user. Only raw syscalls on data
    /// prepared before the clone; on failure, the failed step's stage and
    /// errno, for exec's status pipe.
    pub fn enter(&self) -> Result<(), (u32, i32)> {
        let step = |i: u32, r: libc::c_long| {
            if r < 0 {
                Err((CONTAINER_STAGE + i, Errno::last_raw()))
            } else {
                Ok(())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string owned by `self`
        // (or a static C string literal) that outlives the calls; the id
        // calls go straight to the kernel because glibc's wrappers would try
        // to signal threads that do not exist in this child.
        unsafe {
            step(
                0,
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
                .into(),
            )?;
            step(
                1,
                libc::mount(
                    c"proc".as_ptr(),
                    self.c_proc.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                )
                .into(),
            )?;
            step(
                2,
                libc::mount(
                    c"/dev".as_ptr(),
                    self.c_dev.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
                .into(),
            )?;
            step(
                3,
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.c_tmp.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=1777".as_ptr().cast(),
                )
                .into(),
            )?;
            step(4, libc::chdir(self.c_root.as_ptr()).into())?;
            step(4, libc::chroot(c".".as_ptr()).into())?;
            step(4, libc::chdir(c"/".as_ptr()).into())?;
            step(
                5,
                libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()).into(),
            )?;
            step(
                6,
                libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()),
            )?;
            step(
                7,
                libc::syscall(libc::SYS_setresgid, self.gid, self.gid, self.gid),
            )?;
            step(
                8,
                libc::syscall(libc::SYS_setresuid, self.uid, self.uid, self.uid),
            )?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.root, MntFlags::MNT_DETACH) {
                crate::log(format_args!("cannot unmount {}: {e}", self.root.display()));
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            crate::log(format_args!("cannot remove {}: {e}", self.dir.display()));
        }
    }
}

#[cfg(test)]
mod tests;
