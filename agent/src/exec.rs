//! Exec requests: run a program (argv straight to execve, no shell) in its
//! own session and process group, stream its output as it is produced, and
//! report how it ended.
//!
//! Output is read with poll in chunks of at most [`DATA_CHUNK`] and written
//! to the host with blocking writes: when the host does not read, we stop
//! reading the pipes and the program blocks on a full pipe (backpressure).
//! A timeout, or the host closing the connection, kills the whole process
//! group. Statuses come from the [`Reaper`], which owns all waiting.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{pipe2, ForkResult, Pid};

use crate::image::container::{Container, CONTAINER_STAGE};
use crate::protocol::{
    read_frame, write_frame, AgentError, ErrorKind, ExecRequest, ExitStatus, Frame, FrameKind,
    Response, TtySize, DATA_CHUNK,
};
use crate::reaper::{ChildExit, Reaper, Waiter};
use crate::server::{send_error, send_response, Duplex, ServeError};
use crate::system::DEFAULT_PATH;

/// After the program exits, output still arriving within this gap is sent;
/// then the exit is reported even if a background child holds the pipes.
const DRAIN_IDLE: Duration = Duration::from_millis(100);

/// The environment every program starts with, before the request's own.
pub fn default_env() -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
    ];
    env.extend(crate::system::inherited_env());
    env
}

fn invalid(msg: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, msg)
}

/// Everything execve needs, built before the fork (the child of a
/// multi-threaded process must not allocate).
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    workdir: CString,
    /// For error messages.
    argv0: String,
    workdir_text: String,
}

fn check_tty_size(size: TtySize) -> Result<(), AgentError> {
    if size.cols == 0 || size.rows == 0 {
        return Err(invalid(format!(
            "a terminal of {}x{} cells (columns and rows must be positive)",
            size.cols, size.rows
        )));
    }
    Ok(())
}

/// Sets the window size of the terminal whose master is `master`.
fn set_tty_size(master: &impl AsFd, size: TtySize) -> Result<(), AgentError> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` that lives across the call,
    // on a pty master fd we own.
    let r = unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(errno_error(Errno::last(), "cannot set the terminal size"));
    }
    Ok(())
}

/// A new pseudo-terminal of `size`: its master and its slave, both
/// close-on-exec from the start (other execs fork meanwhile).
fn open_pty(size: TtySize) -> Result<(OwnedFd, OwnedFd), AgentError> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let sys = |e: Errno| errno_error(e, "cannot open a terminal");
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).map_err(sys)?;
    grantpt(&master).map_err(sys)?;
    unlockpt(&master).map_err(sys)?;
    let name = ptsname_r(&master).map_err(sys)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)
        .map_err(|e| io_error(&e, &name))?;
    let master = OwnedFd::from(master);
    set_tty_size(&master, size)?;
    Ok((master, slave.into()))
}

/// Checks the request and resolves the program (inside the container's
/// root when there is one). Errors name the bad value.
fn prepare(req: &ExecRequest, container: Option<&Container>) -> Result<Prepared, AgentError> {
    let Some(argv0) = req.argv.first() else {
        return Err(invalid("argv is empty".into()));
    };
    if argv0.is_empty() {
        return Err(invalid("argv[0] is empty".into()));
    }
    let mut argv = Vec::with_capacity(req.argv.len());
    for (i, a) in req.argv.iter().enumerate() {
        argv.push(
            CString::new(a.as_str())
                .map_err(|_| invalid(format!("argv[{i}] contains a NUL byte: {a:?}")))?,
        );
    }

    let mut env = container.map_or_else(default_env, Container::default_env);
    if let Some(size) = req.tty {
        check_tty_size(size)?;
        if !env.iter().any(|(k, _)| k == "TERM") {
            env.push(("TERM".into(), "xterm-256color".into()));
        }
    }
    for (k, v) in &req.env {
        if k.is_empty() {
            return Err(invalid("empty environment variable name".into()));
        }
        if k.contains('=') || k.contains('\0') {
            return Err(invalid(format!("invalid environment variable name {k:?}")));
        }
        if v.contains('\0') {
            return Err(invalid(format!(
                "environment variable {k} has a NUL byte in its value"
            )));
        }
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    // Checked above: no NUL anywhere.
    let envp = env
        .iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();

    let workdir_text = req.workdir.clone().unwrap_or_else(|| "/".into());
    if workdir_text.is_empty() {
        return Err(invalid("workdir is empty".into()));
    }
    let workdir = CString::new(workdir_text.as_str())
        .map_err(|_| invalid(format!("workdir contains a NUL byte: {workdir_text:?}")))?;
    match container.map(|c| c.check_workdir(&workdir_text)) {
        Some(checked) => checked?,
        None => match std::fs::metadata(&workdir_text) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(AgentError::new(
                    ErrorKind::NotADirectory,
                    format!("workdir is not a directory: {workdir_text}"),
                ))
            }
            Err(e) => return Err(io_error(&e, &format!("workdir {workdir_text}"))),
        },
    }

    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let program = match container {
        Some(c) => PathBuf::from(c.resolve_program(argv0, path_var, &workdir_text)?),
        None => resolve_program(argv0, path_var, Path::new(&workdir_text))?,
    };
    let program = CString::new(program.into_os_string().into_encoded_bytes())
        .map_err(|_| invalid(format!("program path contains a NUL byte: {argv0:?}")))?;

    if req.timeout_ms == Some(0) {
        return Err(invalid("timeout_ms must be positive, got 0".into()));
    }
    Ok(Prepared {
        program,
        argv,
        envp,
        workdir,
        argv0: argv0.clone(),
        workdir_text,
    })
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The guest's busybox. Only a few of its applets are links in the
/// initramfs; the host links the rest on the machine disk. A machine with
/// no such disk (or one made before the host did so) still runs every
/// applet by name: [`resolve_program`] finds it in [`APPLET_LIST`].
pub const BUSYBOX: &str = "/bin/busybox";
/// busybox's applets, one path per line (see the rootfs builder).
pub const APPLET_LIST: &str = "/etc/smol/applets";

/// Whether `name` is an applet of the guest's busybox, per `list`.
fn is_applet(list: &str, name: &str) -> bool {
    list.lines()
        .any(|l| l.trim().rsplit('/').next() == Some(name))
}

/// The file execve should run: `argv0` itself when it has a `/` (relative to
/// `workdir`), else the first executable match on `path_var`, else busybox
/// when `argv0` names one of its applets (busybox runs the applet its
/// `argv[0]` names).
pub fn resolve_program(argv0: &str, path_var: &str, workdir: &Path) -> Result<PathBuf, AgentError> {
    if argv0.contains('/') {
        let p = workdir.join(argv0);
        if std::fs::symlink_metadata(&p).is_err() && std::fs::metadata(&p).is_err() {
            return Err(AgentError::new(
                ErrorKind::NotFound,
                format!("executable not found: {argv0}"),
            ));
        }
        // Other problems (not executable, a directory) come back from execve.
        return Ok(PathBuf::from(argv0));
    }
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = workdir.join(dir).join(argv0);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    let applet = std::fs::read_to_string(APPLET_LIST).is_ok_and(|l| is_applet(&l, argv0));
    if applet && is_executable_file(Path::new(BUSYBOX)) {
        return Ok(PathBuf::from(BUSYBOX));
    }
    Err(AgentError::new(
        ErrorKind::NotFound,
        format!("executable not found in PATH: {argv0}"),
    ))
}

/// Maps an I/O error about `what` to the protocol's error.
pub fn io_error(e: &io::Error, what: &str) -> AgentError {
    errno_error(
        e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO),
        what,
    )
}

pub fn errno_error(e: Errno, what: &str) -> AgentError {
    let (kind, text) = match e {
        Errno::ENOENT => (ErrorKind::NotFound, "not found"),
        Errno::EACCES | Errno::EPERM => (ErrorKind::PermissionDenied, "permission denied"),
        Errno::EROFS => (ErrorKind::PermissionDenied, "read-only filesystem"),
        Errno::ENOTDIR => (ErrorKind::NotADirectory, "not a directory"),
        Errno::EISDIR => (ErrorKind::IsADirectory, "is a directory"),
        Errno::ENOSPC | Errno::EDQUOT => (ErrorKind::NoSpace, "no space left on device"),
        Errno::ENOEXEC => (ErrorKind::InvalidArgument, "exec format error"),
        Errno::EINVAL | Errno::ENAMETOOLONG | Errno::ELOOP => {
            (ErrorKind::InvalidArgument, e.desc())
        }
        _ => (ErrorKind::Io, e.desc()),
    };
    AgentError::new(kind, format!("{what}: {}", text.to_lowercase()))
}

/// Where the child failed, sent back over the close-on-exec error pipe.
#[derive(Clone, Copy)]
#[repr(u32)]
enum ChildStage {
    Setup = 1,
    Chdir = 2,
    Exec = 3,
}

/// The signals the agent installs handlers for (main.rs: SIGTERM); a
/// spawned child resets them before it unblocks signals.
pub const CAUGHT_SIGNALS: &[libc::c_int] = &[libc::SIGTERM];

/// Stack of a [`spawn_vfork`] child: child_exec's frames and the syscalls'.
const VFORK_STACK: usize = 64 * 1024;

/// Starts a child that shares the agent's memory and runs `child` on a stack
/// of its own until it execs or exits: clone(CLONE_VM | CLONE_VFORK), as
/// posix_spawn does. Unlike fork(), nothing of the multi-threaded agent's
/// address space is copied, which is most of an exec's cost where the guest
/// kernel is emulated. The calling thread waits meanwhile; signals are
/// blocked in it so that no handler of ours runs in the child before
/// child_exec resets them.
///
/// # Safety
///
/// `child` must only make async-signal-safe calls that neither allocate nor
/// lock (it shares the heap with the agent's other threads), and should
/// exec or `_exit` (a return ends the child with status 127).
unsafe fn spawn_vfork<F: FnMut()>(child: &mut F) -> Result<Pid, Errno> {
    extern "C" fn trampoline<F: FnMut()>(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&mut F` spawn_vfork passed, alive until the
        // child execs or exits, since the parent waits until then.
        let f = unsafe { &mut *arg.cast::<F>() };
        f();
        // `child` does not return; should it, the child must not run on.
        // SAFETY: _exit ends the child without touching shared state.
        unsafe { libc::_exit(127) }
    }
    let mut stack = vec![0u8; VFORK_STACK];
    // SAFETY: sigset_t is plain data; the mask calls take valid pointers.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // The stack grows down from its 16-byte aligned end.
    let top = (stack.as_mut_ptr() as usize + VFORK_STACK) & !15;
    // SAFETY: `top` is the end of a live buffer the child alone uses; the
    // trampoline gets a pointer to `child`, which outlives the child's use
    // of it (CLONE_VFORK: clone returns once the child execs or exits).
    let pid = unsafe {
        libc::clone(
            trampoline::<F>,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (child as *mut F).cast(),
        )
    };
    let err = Errno::last();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        Err(err)
    } else {
        Ok(Pid::from_raw(pid))
    }
}

/// Runs in the child (of spawn_vfork, or of a container's clone): only
/// async-signal-safe calls, no allocation.
fn child_exec(
    p: &Prepared,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    fds: [i32; 3],
    err_fd: i32,
    ctty: bool,
) -> ! {
    let fail = |stage: ChildStage| -> ! {
        let errno = Errno::last_raw();
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(stage as u32).to_le_bytes());
        msg[4..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: writing a stack buffer to our own pipe, then exiting
        // without running any destructor or atexit handler.
        unsafe {
            libc::write(err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: all of these are async-signal-safe syscalls on values prepared
    // before the fork; none allocates or takes a lock.
    unsafe {
        // The agent's handlers must not run here (the child may share its
        // memory): back to the defaults before any signal is unblocked.
        for &sig in CAUGHT_SIGNALS {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        // The agent blocks SIGTERM and ignores SIGPIPE; programs expect neither.
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::setsid() < 0 {
            fail(ChildStage::Setup);
        }
        for (target, fd) in fds.iter().enumerate() {
            // The agent keeps 0..=2 open, so pipe fds are never 0..=2 and
            // dup2 always clears close-on-exec on the copy.
            if libc::dup2(*fd, target as i32) < 0 {
                fail(ChildStage::Setup);
            }
        }
        // On a terminal: it becomes this new session's controlling one,
        // so that ^C and the window size reach the program's group.
        if ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(ChildStage::Setup);
        }
        if libc::chdir(p.workdir.as_ptr()) < 0 {
            fail(ChildStage::Chdir);
        }
        libc::execve(p.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    fail(ChildStage::Exec)
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A started program.
struct Running {
    pid: Pid,
    waiter: Arc<Waiter>,
    stdout: File,
    stderr: File,
    /// Write end of the program's stdin when the host feeds it.
    stdin: Option<File>,
    /// The terminal's master, when it runs on one.
    tty: Option<OwnedFd>,
}

/// Forks (or clones into a container's namespaces) and execs; returns once
/// execve succeeded (or failed, as an error).
fn start(
    p: &Prepared,
    want_stdin: bool,
    container: Option<&Container>,
    tty: Option<TtySize>,
) -> Result<Running, AgentError> {
    let sys = |e: Errno| errno_error(e, "cannot start the program");
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| io_error(&e, "a terminal fd"));
    // On a terminal, its slave is stdin, stdout and stderr, and its master
    // is what the host reads (as stdout) and writes; stderr is a pipe that
    // nobody writes.
    let (out_r, out_w, err_r, err_w, in_r, in_w, master);
    if let Some(size) = tty {
        let (m, slave) = open_pty(size)?;
        if !want_stdin {
            // No input: the program's first read on the terminal ends.
            let _ = File::from(dup(&m)?).write_all(&[VEOF_CHAR]);
        }
        let (never_written, w) = pipe2(OFlag::O_CLOEXEC).map_err(sys)?;
        drop(w);
        err_r = never_written;
        out_r = dup(&m)?;
        in_w = if want_stdin { Some(dup(&m)?) } else { None };
        out_w = dup(&slave)?;
        err_w = dup(&slave)?;
        in_r = slave;
        master = Some(m);
    } else {
        (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys)?;
        (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys)?;
        (in_r, in_w) = if want_stdin {
            let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(sys)?;
            (r, Some(w))
        } else {
            let null = File::open("/dev/null").map_err(|e| io_error(&e, "/dev/null"))?;
            (null.into(), None)
        };
        master = None;
    }
    let (status_r, status_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys)?;
    let argv = null_terminated(&p.argv);
    let envp = null_terminated(&p.envp);
    let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let status_fd = status_w.as_raw_fd();

    let (pid, waiter) = Reaper::get()
        .spawn(|| {
            // SAFETY: the child runs only Container::enter and child_exec,
            // which are async-signal-safe; child_exec never returns.
            let Some(c) = container else {
                let mut child = || child_exec(p, &argv, &envp, fds, status_fd, tty.is_some());
                // SAFETY: the child runs only child_exec (async-signal-safe,
                // no allocation, never returns) on its own stack.
                return unsafe { spawn_vfork(&mut child) };
            };
            let forked = unsafe { c.clone_child() }?;
            match forked {
                ForkResult::Child => {
                    if let Some(Err((stage, errno))) = container.map(Container::enter) {
                        crate::image::container::child_failed(status_fd, stage, errno)
                    }
                    child_exec(p, &argv, &envp, fds, status_fd, tty.is_some())
                }
                ForkResult::Parent { child } => Ok::<Pid, Errno>(child),
            }
        })
        .map_err(sys)?;
    drop((in_r, out_w, err_w, status_w));

    // EOF on the status pipe means execve closed it: the program runs.
    let mut msg = [0u8; 8];
    let mut status_file = File::from(status_r);
    let mut got = 0;
    while got < msg.len() {
        match status_file.read(&mut msg[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(&e, "cannot start the program")),
        }
    }
    if got == 0 {
        return Ok(Running {
            pid,
            waiter,
            stdout: File::from(out_r),
            stderr: File::from(err_r),
            stdin: in_w.map(File::from),
            tty: master,
        });
    }
    // The child reported a failure and exits with 127; the reaper collects it.
    let stage = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
    let errno = Errno::from_raw(i32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]));
    Err(match stage {
        s if s == ChildStage::Chdir as u32 => {
            errno_error(errno, &format!("workdir {}", p.workdir_text))
        }
        s if s == ChildStage::Exec as u32 => {
            errno_error(errno, &format!("cannot execute {}", p.argv0))
        }
        s if s >= CONTAINER_STAGE => errno_error(errno, &crate::image::container::stage_what(s)),
        _ => errno_error(errno, "cannot set up the program"),
    })
}

/// Shared between the output loop, the timeout watchdog and the reader of
/// the host's frames.
struct Control {
    pgid: Pid,
    /// The terminal's master, for `Resize`, when the program runs on one.
    tty: Option<OwnedFd>,
    finished: Mutex<bool>,
    cv: Condvar,
    timed_out: AtomicBool,
    /// Set once the exit status has been collected; later kills would hit
    /// whatever reuses the pid.
    reaped: AtomicBool,
    /// The host asked that the command outlive its connection (`Detach`).
    detached: AtomicBool,
}

impl Control {
    fn kill_group(&self) {
        if !self.reaped.load(Ordering::SeqCst) {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }

    fn detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }

    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// The commands running now, by pid: the ones a `Signal` may reach.
static RUNNING: Mutex<BTreeMap<u32, Arc<Control>>> = Mutex::new(BTreeMap::new());

/// A command's entry in [`RUNNING`], removed when dropped.
struct Registered(u32);

impl Registered {
    fn new(pid: u32, ctl: &Arc<Control>) -> Registered {
        running().insert(pid, ctl.clone());
        Registered(pid)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        running().remove(&self.0);
    }
}

fn running() -> std::sync::MutexGuard<'static, BTreeMap<u32, Arc<Control>>> {
    RUNNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// ^D, the default end-of-file character of a terminal.
const VEOF_CHAR: u8 = 4;

/// Resizes the terminal of the running command `pid` (a `Resize` request).
pub fn resize(pid: u32, size: TtySize) -> Result<(), AgentError> {
    check_tty_size(size)?;
    with_running(pid, |ctl| match &ctl.tty {
        Some(master) => set_tty_size(master, size),
        None => Err(invalid(format!(
            "the command with pid {pid} has no terminal"
        ))),
    })
}

/// Lets the running command `pid` outlive its exec connection (a `Detach`
/// request).
pub fn detach(pid: u32) -> Result<(), AgentError> {
    with_running(pid, |ctl| {
        ctl.detached.store(true, Ordering::SeqCst);
        Ok(())
    })
}

/// Sends `signal` to the running command `pid` (a `Signal` request).
pub fn signal(pid: u32, signal: i32) -> Result<(), AgentError> {
    let sig = Signal::try_from(signal).map_err(|_| invalid(format!("{signal} is not a signal")))?;
    with_running(pid, |ctl| {
        nix::sys::signal::kill(ctl.pgid, sig)
            .map_err(|e| AgentError::new(ErrorKind::Io, format!("signal {sig} to pid {pid}: {e}")))
    })
}

/// `f` on the record of the running command `pid`, with the registry
/// locked (so that it is not reaped meanwhile); NotFound when there is no
/// such command.
fn with_running(
    pid: u32,
    f: impl FnOnce(&Control) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let running = running();
    match running.get(&pid) {
        Some(ctl) if !ctl.reaped.load(Ordering::SeqCst) => f(ctl),
        _ => Err(AgentError::new(
            ErrorKind::NotFound,
            format!("no command runs with pid {pid} (it ended, or the agent did not start it)"),
        )),
    }
}

/// Kills the process group when `timeout` passes before the program ends.
fn watchdog(ctl: Arc<Control>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut done = ctl.finished.lock().unwrap_or_else(|e| e.into_inner());
    while !*done {
        let now = Instant::now();
        if now >= deadline {
            ctl.timed_out.store(true, Ordering::SeqCst);
            ctl.kill_group();
            return;
        }
        done = ctl
            .cv
            .wait_timeout(done, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Reads the host's frames during an exec: Stdin data to the program, Eof
/// closes its stdin; the host closing the connection cancels the exec.
fn host_reader<S: Duplex>(mut conn: S, mut stdin: Option<File>, ctl: Arc<Control>, tty: bool) {
    loop {
        match read_frame(&mut conn) {
            Ok(Some(Frame {
                kind: FrameKind::Stdin,
                payload,
            })) => {
                if let Some(w) = stdin.as_mut() {
                    if w.write_all(&payload).is_err() {
                        // The program closed its stdin; drop the rest.
                        stdin = None;
                    }
                }
            }
            Ok(Some(Frame {
                kind: FrameKind::Eof,
                ..
            })) => {
                // A terminal stays open: its end-of-file is the EOF
                // character, which a reading program sees as the end.
                if let (true, Some(w)) = (tty, stdin.as_mut()) {
                    let _ = w.write_all(&[VEOF_CHAR]);
                }
                stdin = None;
            }
            Ok(Some(_)) => {} // nothing else is meaningful mid-exec
            Ok(None) | Err(_) => {
                // A detached command sees the end of its input instead.
                let finished = *ctl.finished.lock().unwrap_or_else(|e| e.into_inner());
                if !finished && !ctl.detached() {
                    ctl.kill_group();
                }
                return;
            }
        }
    }
}

/// Serves an `Exec` request on `conn` (the request frame already read).
pub fn serve<S: Duplex>(conn: &mut S, req: ExecRequest) -> Result<(), ServeError> {
    // Unmounted and removed when this exec is over (dropped at the end).
    let container = match req.container.as_ref().map(Container::create) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            send_error(conn, &e)?;
            return Ok(());
        }
        None => None,
    };
    let prepared = match prepare(&req, container.as_ref()) {
        Ok(p) => p,
        Err(e) => {
            send_error(conn, &e)?;
            return Ok(());
        }
    };
    let running = match start(&prepared, req.stdin, container.as_ref(), req.tty) {
        Ok(r) => r,
        Err(e) => {
            send_error(conn, &e)?;
            return Ok(());
        }
    };
    let Running {
        pid,
        waiter,
        stdout,
        stderr,
        stdin,
        tty,
    } = running;
    let ctl = Arc::new(Control {
        pgid: pid,
        tty,
        finished: Mutex::new(false),
        cv: Condvar::new(),
        timed_out: AtomicBool::new(false),
        reaped: AtomicBool::new(false),
        detached: AtomicBool::new(false),
    });
    let registered = Registered::new(pid.as_raw() as u32, &ctl);
    if let Some(ms) = req.timeout_ms {
        let c = ctl.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("exec-timeout".into())
            .spawn(move || watchdog(c, Duration::from_millis(ms)))
        {
            ctl.kill_group();
            return Err(e.into());
        }
    }
    // With stdin to feed, a thread reads the host's frames; without, the
    // output loop itself watches the connection for the host going away
    // (a thread less per exec: costly where the guest kernel is emulated).
    let watch_host = stdin.is_none();
    let on_tty = req.tty.is_some();
    if !watch_host {
        let reader = conn.try_clone().and_then(|r| {
            let c = ctl.clone();
            std::thread::Builder::new()
                .name("exec-input".into())
                .spawn(move || host_reader(r, stdin, c, on_tty))
        });
        if let Err(e) = reader {
            ctl.kill_group();
            return Err(e.into());
        }
    }

    let result = send_response(
        conn,
        &Response::Started {
            pid: pid.as_raw() as u32,
        },
    )
    .map_err(ServeError::from)
    .and_then(|()| pump_output(conn, &stdout, &stderr, &waiter, watch_host, &ctl));
    if result.is_err() {
        // The host is gone: nobody will read the output.
        ctl.kill_group();
    }
    let exit = waiter.wait(None);
    drop(registered);
    ctl.reaped.store(true, Ordering::SeqCst);
    ctl.finish();
    if !result? {
        // Detached, and the host left: nobody to tell the exit.
        return Ok(());
    }
    let status = match exit {
        Some(ChildExit::Exited(code)) => ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
        },
        Some(ChildExit::Signaled(sig)) => ExitStatus {
            code: None,
            signal: Some(sig),
            timed_out: false,
        },
        None => ExitStatus {
            code: None,
            signal: None,
            timed_out: false,
        },
    };
    let status = ExitStatus {
        timed_out: ctl.timed_out.load(Ordering::SeqCst),
        ..status
    };
    let f = Frame::json(FrameKind::Exit, &status);
    write_frame(conn, f.kind, &f.payload)?;
    conn.flush()?;
    // Ends the reader thread (it holds a clone of the connection).
    conn.shutdown_both();
    Ok(())
}

/// Sends stdout and stderr as they come until both are closed and the
/// program has exited (or has exited and the pipes stay quiet). With
/// `watch_host`, the host closing the connection ends it with an error
/// (bytes the host sends meanwhile mean nothing and are dropped).
fn pump_output<S: Duplex>(
    conn: &mut S,
    stdout: &File,
    stderr: &File,
    waiter: &Waiter,
    mut watch_host: bool,
    ctl: &Control,
) -> Result<bool, ServeError> {
    let mut buf = vec![0u8; DATA_CHUNK];
    // The host still reads; once a detached command's host has left, its
    // output is read and discarded (a full pipe would stop it).
    let mut host = true;
    let mut open = [true, true];
    let pipes = [(stdout, FrameKind::Stdout), (stderr, FrameKind::Stderr)];
    let mut exited = waiter.status().is_some();
    loop {
        if exited && !open[0] && !open[1] {
            return Ok(host);
        }
        let mut fds = [
            libc::pollfd {
                fd: if open[0] { stdout.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if open[1] { stderr.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if exited { -1 } else { waiter.fd().as_raw_fd() },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if watch_host {
                    conn.as_fd().as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let timeout = if exited {
            DRAIN_IDLE.as_millis() as i32
        } else {
            -1
        };
        // SAFETY: a valid array of pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return Err(io::Error::last_os_error().into());
        }
        if n == 0 {
            // Exited and quiet: a background child may hold the pipes open.
            return Ok(host);
        }
        if fds[2].revents != 0 {
            exited = true;
        }
        if fds[3].revents != 0 {
            let mut scratch = [0u8; 256];
            match conn.read(&mut scratch) {
                Ok(0) | Err(_) if ctl.detached() => {
                    host = false;
                    watch_host = false;
                }
                Ok(0) => return Err(host_gone()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        for (i, (pipe, kind)) in pipes.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            let mut reader: &File = pipe;
            match reader.read(&mut buf) {
                Ok(0) => open[i] = false,
                Ok(k) if host => {
                    if let Err(e) = write_frame(conn, *kind, &buf[..k]) {
                        if !ctl.detached() {
                            return Err(e.into());
                        }
                        host = false;
                        watch_host = false;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => open[i] = false,
            }
        }
    }
}

fn host_gone() -> ServeError {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the host closed the connection",
    )
    .into()
}

#[cfg(test)]
mod tests;
