//! Machines that run in the background of the shell.
//!
//! A machine lives as long as the process that runs its monitor. `smol
//! create`, `smol start` and `smol restore DIR` (without a command)
//! therefore hand the machine to a detached `smol __own NAME` process
//! ([`serve`], in a session of its own, so that the shell's Ctrl-C and
//! hang-up are not its own), wait until it says the machine is up
//! ([`launch`]) and return. Every other process drives the machine as a
//! peer.
//!
//! Lifecycle calls need the owner, so it listens on a control socket,
//! `<SMOL_HOME>/owners/<pid>.sock`, for one JSON [`Request`] line per
//! connection and answers one [`Reply`] line: `smol stop` and `smol rm`
//! ask it to let a machine go ([`release`]); `smol fork` and `smol
//! snapshot` ask it to fork or snapshot one ([`ask`]). A clone is owned by
//! its golden's owner, which exits once it holds no machine. SIGTERM or
//! SIGINT lets every machine go: a persistent one is stopped, any other
//! deleted.
//!
//! The owner tells its launcher one line on stdout: `up` once it owns the
//! running machine, `peer PID` when another process PID runs it already.
//! From then on its stdout is /dev/null and its stderr (smol's log) goes to
//! `<SMOL_HOME>/logs/NAME.log`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use smol::{Machine, MachineConfig, MachineState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::progress::spinner;

/// The hidden subcommand the owner process runs (`ps` shows
/// `smol __own NAME`).
pub const OWN_COMMAND: &str = "__own";
/// How long a control request may take: a clean guest shutdown, a fork or
/// a snapshot take seconds on kvm_pvm hosts.
const REQUEST_LIMIT: Duration = Duration::from_secs(180);
/// How often the owner checks that its machines still run (a guest that
/// powered itself off is let go).
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// What the launcher keeps of an owner's stderr before it says `up`.
const MAX_EARLY_LOG: u64 = 64 * 1024;
/// The longest control line read, either way.
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("starting the owner process {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the owner process of machine {name:?} ended ({status}) before the machine was up{}", log_text(.log))]
    Failed {
        name: String,
        status: String,
        log: String,
    },
    #[error("the owner process {pid} of machine {name:?}: {reason}")]
    Control {
        name: String,
        pid: u32,
        reason: String,
    },
    #[error("machine {name:?} is not running in the background (see `smol ls`: {why})")]
    NoOwner { name: String, why: String },
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handling {0}")]
    Signals(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Smol(#[from] smol::Error),
}

fn log_text(log: &str) -> String {
    if log.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{}", log.trim_end())
    }
}

/// How a launch or an owner ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Done,
    /// By Ctrl-C or SIGTERM before the machine was up.
    Interrupted,
}

/// What the launcher asks the owner to bring up.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    /// A new machine of this config (its name set).
    Create(MachineConfig),
    /// The store's machine of that name, started if it is stopped.
    Start(String),
    /// A machine restored from a snapshot directory, named (and made
    /// persistent or not) by the config.
    Restore(PathBuf, MachineConfig),
}

impl Want {
    pub fn name(&self) -> &str {
        match self {
            Want::Create(c) | Want::Restore(_, c) => c.name.as_deref().unwrap_or_default(),
            Want::Start(name) => name,
        }
    }

    /// The owner's command line after [`OWN_COMMAND`].
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![self.name().to_string()];
        match self {
            Want::Start(_) => {}
            Want::Create(c) => {
                let r = &c.resources;
                args.extend([
                    "--create".into(),
                    format!("--cpus={}", r.cpus),
                    format!("--memory={}", r.memory_mb),
                    format!("--disk={}", r.disk_mb),
                ]);
                args.extend(
                    c.ports
                        .iter()
                        .map(|p| format!("--port={}", super::port_arg(p))),
                );
                if r.network {
                    args.push("--network".into());
                }
                if c.forkable {
                    args.push("--forkable".into());
                }
                if c.persistent {
                    args.push("--persistent".into());
                }
            }
            Want::Restore(dir, c) => {
                args.push(format!("--restore={}", dir.display()));
                if c.persistent {
                    args.push("--persistent".into());
                }
            }
        }
        args
    }
}

/// A control request to an owner.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Stop the machine (a persistent one is kept, any other deleted).
    Stop { name: String },
    /// Fork the (forkable) machine into a clone the owner then holds.
    Fork { name: String, clone: String },
    /// Snapshot the machine into `dir`.
    Snapshot { name: String, dir: PathBuf },
}

impl Request {
    fn name(&self) -> &str {
        match self {
            Request::Stop { name }
            | Request::Fork { name, .. }
            | Request::Snapshot { name, .. } => name,
        }
    }
}

/// An owner's answer: what happened, or why not.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done(String),
    Failed(String),
}

/// Starts a detached owner for `want` and waits until it says the machine
/// is up (or that another process runs it); Ctrl-C ends the owner too.
pub async fn launch(want: Want) -> Result<Ended, OwnerError> {
    let name = want.name().to_string();
    let t = Instant::now();
    let exe = std::env::current_exe().map_err(|source| OwnerError::Spawn {
        exe: PathBuf::from("smol"),
        source,
    })?;
    let mut child = tokio::process::Command::new(&exe)
        .arg(OWN_COMMAND)
        .args(want.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| OwnerError::Spawn {
            exe: exe.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or_default();
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("both were piped");
    };
    // Its log until it says `up` (it redirects it then, which ends this).
    let early_log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = err.take(MAX_EARLY_LOG).read_to_string(&mut text).await;
        text
    });
    let bar = spinner(format!("starting machine {name} (owner: pid {pid})"));
    let mut lines = tokio::io::BufReader::new(out.take(MAX_LINE)).lines();
    let word = tokio::select! {
        w = lines.next_line() => w.ok().flatten(),
        _ = tokio::signal::ctrl_c() => {
            bar.finish_and_clear();
            let _ = terminate(pid);
            let _ = child.wait().await;
            eprintln!("smol: interrupted; machine {name} is not started");
            return Ok(Ended::Interrupted);
        }
    };
    bar.finish_and_clear();
    match word.as_deref() {
        Some("up") => {
            eprintln!(
                "machine {name} up in {:.1?}, owned by pid {pid} (`smol stop {name}` stops it)",
                t.elapsed()
            );
            if let Ok(m) = Machine::connect(&name).await {
                super::print_ports(&m).await;
            }
            Ok(Ended::Done)
        }
        Some(w) if w.starts_with("peer ") => {
            eprintln!(
                "machine {name} is running already, owned by pid {}",
                &w["peer ".len()..]
            );
            Ok(Ended::Done)
        }
        _ => {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown: {e}"),
            };
            Err(OwnerError::Failed {
                name,
                status,
                log: early_log.await.unwrap_or_default(),
            })
        }
    }
}

/// The machines an owner holds, by name.
type Held = Arc<Mutex<HashMap<String, Machine>>>;

/// The owner process (`smol __own`): brings `want` up, says so, then
/// serves control requests and holds its machines until SIGTERM or SIGINT,
/// or until it holds none.
pub async fn serve(want: Want) -> Result<Ended, OwnerError> {
    // Out of the launcher's session: the terminal's signals are not ours.
    let _ = nix::unistd::setsid();
    let (mut term, mut int) = (terminate_signal()?, interrupt_signal()?);
    let name = want.name().to_string();
    let up = async {
        match want {
            Want::Create(config) => Machine::create(config).await,
            Want::Restore(dir, config) => Machine::restore(dir, config).await,
            Want::Start(name) => {
                let m = Machine::connect(&name).await?;
                m.start().await?;
                Ok(m)
            }
        }
    };
    // A cancelled create or start leaves nothing running.
    let m = tokio::select! {
        m = up => m?,
        _ = term.recv() => return Ok(Ended::Interrupted),
        _ = int.recv() => return Ok(Ended::Interrupted),
    };
    let me = std::process::id();
    let owner = owner_of(&name).await?;
    if owner != Some(me) {
        println!("peer {}", owner.map_or("?".into(), |p| p.to_string()));
        return Ok(Ended::Done);
    }
    let socket = control_socket(me);
    let listener = bind(&socket)?;
    let held: Held = Arc::new(Mutex::new(HashMap::from([(name.clone(), m)])));
    detach_output(&name)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            conn = listener.accept() => {
                if let Ok((conn, _)) = conn {
                    tokio::spawn(answer(conn, held.clone()));
                }
            }
            _ = tokio::time::sleep(WATCH_EVERY) => {
                let machines: Vec<Machine> = lock(&held).values().cloned().collect();
                for m in machines {
                    if !matches!(m.state().await, Ok(MachineState::Running)) {
                        tracing::info!(machine = %m.name(), "the machine stopped by itself");
                        let_go(&held, m.name()).await;
                    }
                }
                if lock(&held).is_empty() {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    let names: Vec<String> = lock(&held).keys().cloned().collect();
    for name in names {
        let_go(&held, &name).await;
    }
    Ok(Ended::Done)
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<String, Machine>> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops a persistent machine, deletes any other, and forgets it.
async fn let_go(held: &Held, name: &str) -> Reply {
    let Some(m) = lock(held).remove(name) else {
        return Reply::Failed(format!("this owner does not hold machine {name:?}"));
    };
    let r = if m.config().persistent {
        m.stop().await.map(|()| "stopped")
    } else {
        m.delete()
            .await
            .map(|()| "stopped and deleted (it was not persistent)")
    };
    match r {
        Ok(what) => Reply::Done(format!("machine {name} {what}")),
        Err(e) => {
            tracing::warn!(machine = %name, "letting the machine go: {e}");
            Reply::Failed(e.to_string())
        }
    }
}

/// Serves one control connection: a request line, a reply line.
async fn answer(conn: UnixStream, held: Held) {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_LINE));
    let reply = match tokio::time::timeout(REQUEST_LIMIT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => carry_out(request, &held).await,
            Err(e) => Reply::Failed(format!("a request this owner cannot read: {e}")),
        },
        Ok(Err(e)) => Reply::Failed(format!("reading the request: {e}")),
        Err(_) => Reply::Failed(format!("no request within {REQUEST_LIMIT:?}")),
    };
    if let Ok(mut text) = serde_json::to_string(&reply) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
}

async fn carry_out(request: Request, held: &Held) -> Reply {
    let Some(m) = lock(held).get(request.name()).cloned() else {
        return Reply::Failed(format!(
            "this owner does not hold machine {:?}",
            request.name()
        ));
    };
    match request {
        Request::Stop { name } => let_go(held, &name).await,
        Request::Fork { name, clone } => match m.fork(&clone).await {
            Ok(c) => {
                lock(held).insert(clone.clone(), c);
                Reply::Done(format!("machine {clone} forked from {name}"))
            }
            Err(e) => Reply::Failed(e.to_string()),
        },
        Request::Snapshot { name, dir } => match m.snapshot(&dir).await {
            Ok(t) => Reply::Done(format!(
                "snapshot of {name} in {} ({} bytes of memory) in {:.1?}",
                dir.display(),
                t.memory_bytes,
                t.total
            )),
            Err(e) => Reply::Failed(e.to_string()),
        },
    }
}

/// `<SMOL_HOME>/owners/<pid>.sock`.
fn control_socket(pid: u32) -> PathBuf {
    smol::image::smol_home()
        .join("owners")
        .join(format!("{pid}.sock"))
}

/// Binds the control socket in a directory only this user can enter,
/// replacing one a killed owner of the same pid left.
fn bind(path: &Path) -> Result<UnixListener, OwnerError> {
    use std::os::unix::fs::PermissionsExt;
    let file_err = |what| {
        move |source| OwnerError::File {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(file_err("creating the directory of"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(file_err("restricting the directory of"))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err("removing a stale")(e)),
    }
    UnixListener::bind(path).map_err(file_err("binding"))
}

/// Says `up` to the launcher, then points stdout at /dev/null and stderr
/// at the machine's owner log, so that nothing waits on a launcher gone.
fn detach_output(name: &str) -> Result<(), OwnerError> {
    use std::io::Write;
    println!("up");
    let _ = std::io::stdout().flush();
    let path = smol::image::smol_home()
        .join("logs")
        .join(format!("{name}.log"));
    let log_err = |source| OwnerError::File {
        what: "redirecting the owner's output to",
        path: path.clone(),
        source,
    };
    let open = |path: &Path, append: bool| {
        std::fs::OpenOptions::new()
            .create(append)
            .append(append)
            .write(true)
            .open(path)
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(log_err)?;
    }
    let null = open(Path::new("/dev/null"), false).map_err(log_err)?;
    nix::unistd::dup2_stdout(&null).map_err(|e| log_err(e.into()))?;
    let log = open(&path, true).map_err(log_err)?;
    nix::unistd::dup2_stderr(&log).map_err(|e| log_err(e.into()))?;
    Ok(())
}

/// If a background owner runs `name`, asks it to let the machine go and
/// waits until it has; whether there was one. A machine some other process
/// runs is left alone (its `stop` is then refused, naming that process).
pub async fn release(name: &str) -> Result<bool, OwnerError> {
    match background_owner(name).await? {
        Ok(pid) => {
            let bar = spinner(format!("stopping machine {name} (owner: pid {pid})"));
            let r = async {
                ask_pid(pid, Request::Stop { name: name.into() }).await?;
                // The owner's handle lets the lock go just after it replied.
                let deadline = Instant::now() + Duration::from_secs(10);
                while owner_of(name).await? == Some(pid) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(true)
            }
            .await;
            bar.finish_and_clear();
            r
        }
        Err(_) => Ok(false),
    }
}

/// Has the background owner of the machine named in `request` carry it
/// out; what it says it did.
pub async fn ask(request: Request) -> Result<String, OwnerError> {
    let name = request.name().to_string();
    match background_owner(&name).await? {
        Ok(pid) => ask_pid(pid, request).await,
        Err(why) => Err(OwnerError::NoOwner { name, why }),
    }
}

async fn ask_pid(pid: u32, request: Request) -> Result<String, OwnerError> {
    let name = request.name().to_string();
    let control = |reason: String| OwnerError::Control {
        name: name.clone(),
        pid,
        reason,
    };
    let talk = async {
        let mut conn = UnixStream::connect(control_socket(pid))
            .await
            .map_err(|e| format!("connecting to its control socket: {e}"))?;
        let mut line = serde_json::to_string(&request).map_err(|e| e.to_string())?;
        line.push('\n');
        conn.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut reply = String::new();
        tokio::io::BufReader::new(conn.take(MAX_LINE))
            .read_line(&mut reply)
            .await
            .map_err(|e| format!("reading its reply: {e}"))?;
        serde_json::from_str::<Reply>(&reply).map_err(|e| format!("its reply {reply:?}: {e}"))
    };
    match tokio::time::timeout(REQUEST_LIMIT, talk).await {
        Ok(Ok(Reply::Done(what))) => Ok(what),
        Ok(Ok(Reply::Failed(why))) => Err(control(why)),
        Ok(Err(why)) => Err(control(why)),
        Err(_) => Err(control(format!("no reply within {REQUEST_LIMIT:?}"))),
    }
}

/// Whether this process owns `name` (it booted it, rather than driving
/// another process's machine).
pub async fn owned_here(name: &str) -> Result<bool, smol::Error> {
    Ok(owner_of(name).await? == Some(std::process::id()))
}

/// The `smol __own` process that runs `name`, or why there is none.
async fn background_owner(name: &str) -> Result<Result<u32, String>, smol::Error> {
    Ok(match owner_of(name).await? {
        None => Err("no process runs it".into()),
        Some(pid) if is_background_owner(pid) => Ok(pid),
        Some(pid) => Err(format!("process {pid} runs it")),
    })
}

/// The process that has `name` open, per the store.
async fn owner_of(name: &str) -> Result<Option<u32>, smol::Error> {
    Ok(Machine::list()
        .await?
        .into_iter()
        .find(|m| m.name == name)
        .and_then(|m| m.owner_pid))
}

/// Whether `pid` is a `smol __own` process.
fn is_background_owner(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(OWN_COMMAND.as_bytes()))
}

fn terminate(pid: u32) -> Result<(), nix::Error> {
    let pid = i32::try_from(pid).map_err(|_| nix::Error::ESRCH)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
}

fn terminate_signal() -> Result<tokio::signal::unix::Signal, OwnerError> {
    signal(SignalKind::terminate()).map_err(|e| OwnerError::Signals("SIGTERM", e))
}

fn interrupt_signal() -> Result<tokio::signal::unix::Signal, OwnerError> {
    signal(SignalKind::interrupt()).map_err(|e| OwnerError::Signals("SIGINT", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_are_one_json_line_each() {
        for r in [
            Request::Stop { name: "a".into() },
            Request::Fork {
                name: "a".into(),
                clone: "b".into(),
            },
            Request::Snapshot {
                name: "a".into(),
                dir: "/x y".into(),
            },
        ] {
            let text = serde_json::to_string(&r).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        }
        let text = serde_json::to_string(&Reply::Failed("no\nway".into())).unwrap();
        assert!(!text.contains('\n'), "{text}");
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }
}
