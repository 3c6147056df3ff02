//! `smol::Error`: the one error type of the public API.
//!
//! Every variant is something a caller may want to match on; each names the
//! bad value (machine name, guest path, config field). Causes are kept as
//! `#[source]`, never repeated in the message.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use smol_protocol::{AgentError, ProtocolError};

use crate::state::MachineState;

/// What kind of error the guest agent reported (see [`Error::Guest`]).
pub use smol_protocol::ErrorKind as GuestErrorKind;

/// `Result<T, smol::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No machine of that name in the store.
    #[error("machine {name:?} not found")]
    NotFound { name: String },
    /// A machine of that name exists already.
    #[error("machine {name:?} already exists")]
    AlreadyExists { name: String },
    /// The machine is open (running) in another process.
    #[error("machine {name:?} is in use by another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { name: String, pid: Option<u32> },
    /// A [`MachineConfig`](crate::MachineConfig) field is out of range.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// An argument of a call (argv, env, path, mode) is unusable.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
    /// The operation needs a running machine.
    #[error("machine {name:?} is not running (it is {state})")]
    NotRunning { name: String, state: MachineState },
    /// A deadline passed: boot, exec, stop.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// The guest did not come up; `console_tail` is the end of its console.
    #[error(
        "machine {name:?} failed to boot: {reason}\n--- console.log (tail) ---\n{console_tail}"
    )]
    Boot {
        name: String,
        reason: String,
        console_tail: String,
    },
    /// The guest path does not exist (or a parent directory is missing).
    #[error("no such file or directory in the guest: {path}")]
    FileNotFound { path: String },
    /// The guest path is a directory where a file was expected.
    #[error("is a directory in the guest: {path}")]
    IsADirectory { path: String },
    /// A component of the guest path is not a directory.
    #[error("not a directory in the guest: {path}")]
    NotADirectory { path: String },
    /// The guest refused access to the path.
    #[error("permission denied in the guest: {path}")]
    PermissionDenied { path: String },
    /// The machine disk is full.
    #[error("no space left in the guest writing {path}")]
    NoSpace { path: String },
    /// Any other error the guest agent reported (missing executable, bad
    /// workdir, bad env name...).
    #[error("guest agent: {message}")]
    Guest {
        kind: GuestErrorKind,
        message: String,
    },
    /// The monitor refused to build the VM.
    #[error("starting the vm of machine {name:?}")]
    Vmm {
        name: String,
        #[source]
        source: smol_vmm::Error,
    },
    /// A host-side I/O failure; `context` says what was being done.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The agent spoke something we do not understand.
    #[error("agent protocol: {0}")]
    Protocol(String),
    /// A guest kernel or initramfs is missing.
    #[error("guest {what} not found at {} ({hint})", path.display())]
    Asset {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    /// Creating or formatting the machine disk failed.
    #[error("machine disk {}: {reason}", path.display())]
    Disk { path: PathBuf, reason: String },
    /// The machine store holds something unreadable.
    #[error("machine store {}: {reason}", path.display())]
    Store { path: PathBuf, reason: String },
    /// Pulling, importing or running an OCI image failed: an unknown image,
    /// a missing tag, a registry refusing, a digest mismatch, a layer that
    /// is not a tar, no space left for it.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// A snapshot directory is missing, truncated, corrupt, of another
    /// format version, for another machine shape, or needs CPU features this
    /// host lacks; or taking one failed.
    #[error("snapshot {}", path.display())]
    Snapshot {
        path: PathBuf,
        #[source]
        source: smol_vmm::snapshot::Error,
    },
    /// `fork` of a machine not created with `forkable: true`.
    #[error("machine {name:?} was not created forkable (MachineConfig.forkable)")]
    NotForkable { name: String },
    /// A collected exec's output passed its bound
    /// ([`ExecOptions::max_output`](crate::ExecOptions::max_output)); the
    /// command was killed.
    #[error("the output of {program:?} passed {limit} bytes (ExecOptions::max_output); the command was killed")]
    OutputTooLarge { program: String, limit: u64 },
    /// A host port of [`MachineConfig::ports`](crate::MachineConfig::ports)
    /// is taken by another listener: the machine was not started.
    #[error("host port {address} is already in use (MachineConfig.ports)")]
    PortInUse { address: String },
    /// A source of [`MachineConfig::mounts`](crate::MachineConfig::mounts)
    /// is missing or not a directory on the host.
    #[error("mount source {}: {reason}", path.display())]
    MountSource { path: PathBuf, reason: String },
    /// The virtiofsd of a share (`path`, its host directory) did not start
    /// or ended; `reason` quotes the end of its log.
    #[error("virtiofsd sharing {}: {reason}", path.display())]
    Virtiofsd { path: PathBuf, reason: String },
    /// Not available (yet) in this engine, e.g. the cloud target.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The remote engine refused the API key (none, wrong or revoked).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The remote engine could not be reached, or answered with an error
    /// this SDK has no variant for; `code` is the server's.
    #[error("remote engine: {message} ({code})")]
    Remote { code: String, message: String },
    /// A bug: a task of ours panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Maps a framing error on the agent connection.
    pub(crate) fn from_protocol(e: ProtocolError, name: &str) -> Self {
        match e {
            ProtocolError::Io(source) => {
                Error::io(format!("talking to the agent of machine {name:?}"), source)
            }
            ProtocolError::Truncated => Error::Protocol(format!(
                "the agent of machine {name:?} closed the connection mid-frame"
            )),
            other => Error::Protocol(other.to_string()),
        }
    }

    /// Maps an error the agent reported; `path` is the guest path of a
    /// file request, so that file errors name it.
    pub(crate) fn from_agent(e: AgentError, path: Option<&str>) -> Self {
        if let Some(path) = path {
            let path = path.to_string();
            match e.kind {
                GuestErrorKind::NotFound => return Error::FileNotFound { path },
                GuestErrorKind::IsADirectory => return Error::IsADirectory { path },
                GuestErrorKind::NotADirectory => return Error::NotADirectory { path },
                GuestErrorKind::PermissionDenied => return Error::PermissionDenied { path },
                GuestErrorKind::NoSpace => return Error::NoSpace { path },
                _ => {}
            }
        }
        Error::Guest {
            kind: e.kind,
            message: sanitize(&e.message),
        }
    }

    /// Whether retrying the same call later might succeed (the machine was
    /// busy booting, a connection dropped).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// Guest-controlled text made safe to print: control characters other than
/// newline and tab become U+FFFD, and the length is capped.
pub(crate) fn sanitize(s: &str) -> String {
    const MAX: usize = 4096;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_the_path() {
        let e = Error::from_agent(
            AgentError::new(GuestErrorKind::NotFound, "enoent"),
            Some("/a/b"),
        );
        assert!(matches!(&e, Error::FileNotFound { path } if path == "/a/b"));
        assert!(e.to_string().contains("/a/b"));
        let e = Error::from_agent(
            AgentError::new(GuestErrorKind::IsADirectory, "x"),
            Some("/tmp"),
        );
        assert!(matches!(e, Error::IsADirectory { .. }));
        let e = Error::from_agent(AgentError::new(GuestErrorKind::NoSpace, "x"), Some("/f"));
        assert!(matches!(e, Error::NoSpace { .. }));
    }

    #[test]
    fn exec_errors_keep_the_kind() {
        let e = Error::from_agent(
            AgentError::new(GuestErrorKind::NotFound, "no such program: nope"),
            None,
        );
        assert!(matches!(
            e,
            Error::Guest {
                kind: GuestErrorKind::NotFound,
                ..
            }
        ));
        assert!(e.to_string().contains("nope"));
    }

    #[test]
    fn sanitize_strips_control_characters() {
        assert_eq!(sanitize("a\x1b[31mb\nc\t"), "a\u{fffd}[31mb\nc\t");
        let long = "x".repeat(10_000);
        assert_eq!(sanitize(&long).chars().count(), 4097);
    }
}
