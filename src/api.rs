//! The HTTP API of `smol serve`, as JSON bodies: what the server answers and
//! the remote backend reads. Everything is under `/v1`; requests carry
//! `Authorization: Bearer <key>`.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `POST /v1/machines` | [`CreateMachine`] | [`MachineBody`] |
//! | `GET /v1/machines` | | `[MachineBody]` |
//! | `GET /v1/machines/{id}` | | [`MachineBody`] |
//! | `DELETE /v1/machines/{id}` | | 204 |
//! | `POST /v1/machines/{id}/start`, `/stop` | | [`MachineBody`] |
//! | `POST /v1/machines/{id}/exec` | [`ExecBody`] | [`ExecResultBody`] |
//! | `POST /v1/machines/{id}/exec/stream` | [`ExecBody`] | NDJSON of [`StreamEvent`] |
//! | `PUT /v1/machines/{id}/files?path=&mode=` | the bytes | [`WrittenBody`] |
//! | `GET /v1/machines/{id}/files?path=` | | the bytes; `x-smol-size`, `x-smol-mode` |
//! | `POST /v1/machines/{id}/fork` | [`ForkBody`] | [`MachineBody`] of the clone |
//! | `POST /v1/machines/{id}/images/pull` | [`PullBody`] | NDJSON of [`PullLine`] |
//! | `GET /v1/machines/{id}/images` | | `[ImageInfo]` |
//! | `POST /v1/machines/{id}/run` | [`RunBody`] | [`ExecResultBody`] |
//! | `POST /v1/machines/{id}/run/stream` | [`RunBody`] | NDJSON of [`StreamEvent`] |
//!
//! A failure is an HTTP status with an [`ErrorBody`], whose `code` maps back
//! to the same [`Error`] variant the local engine gives.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::MachineConfig;
use crate::error::{Error, GuestErrorKind};
use crate::exec::{ExecEvent, ExecOptions, ExecResult};
use crate::image::{ImageInfo, PullEvent};
use crate::state::MachineState;

/// Header of a file download: the file's size when the agent opened it.
pub const SIZE_HEADER: &str = "x-smol-size";
/// Header of a file download: its permission bits (octal).
pub const MODE_HEADER: &str = "x-smol-mode";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateMachine {
    pub config: MachineConfig,
}

/// A machine as the server describes it. `id` is what `Machine::connect`
/// accepts (the machine's name on the server).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineBody {
    pub id: String,
    pub state: MachineState,
    pub config: MachineConfig,
}

/// The most stdin an exec takes through the remote engine: it travels in
/// the request's JSON, base64-encoded.
pub const MAX_REMOTE_STDIN: usize = 8 << 20;

/// The largest exec or run request body the server reads: the stdin at
/// its bound, base64-encoded, and room for the rest.
pub const MAX_EXEC_BODY: usize = MAX_REMOTE_STDIN / 3 * 4 + (1 << 20);

/// An exec: argv (no shell), environment, working directory, timeout, the
/// most output a collected exec keeps (the server's default bound,
/// [`DEFAULT_MAX_OUTPUT`](crate::exec::DEFAULT_MAX_OUTPUT), when absent), and
/// its stdin in base64 (at most [`MAX_REMOTE_STDIN`] bytes; `/dev/null` when
/// absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecBody {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Run on a terminal of this size ([`ExecOptions::tty`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tty: Option<crate::exec::TtySize>,
}

impl ExecBody {
    /// The body of an exec; stdin past [`MAX_REMOTE_STDIN`] is refused.
    pub fn new(argv: Vec<String>, options: &ExecOptions) -> Result<ExecBody, Error> {
        if options.stdin_reader.is_some() {
            return Err(crate::exec::no_streamed_stdin("the remote engine"));
        }
        Ok(ExecBody {
            argv,
            env: options.env.clone(),
            workdir: options.workdir.clone(),
            timeout_ms: options
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
            max_output: options.max_output,
            stdin: encode_stdin(options.stdin.as_ref())?,
            tty: options.tty,
        })
    }

    /// The options the body asks for; stdin that is not base64, or is
    /// past [`MAX_REMOTE_STDIN`], is a named error.
    pub fn options(&self) -> Result<ExecOptions, Error> {
        let stdin = match &self.stdin {
            None => None,
            Some(s) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| Error::InvalidArgument {
                        what: "stdin",
                        reason: format!("not base64: {e}"),
                    })?;
                check_stdin(bytes.len())?;
                Some(Bytes::from(bytes))
            }
        };
        Ok(ExecOptions {
            timeout: self.timeout_ms.map(Duration::from_millis),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            max_output: self.max_output,
            stdin,
            stdin_reader: None,
            tty: self.tty,
        })
    }
}

/// Stdin as an [`ExecBody`] carries it.
pub fn encode_stdin(stdin: Option<&Bytes>) -> Result<Option<String>, Error> {
    match stdin {
        None => Ok(None),
        Some(b) => {
            check_stdin(b.len())?;
            Ok(Some(b64(b)))
        }
    }
}

fn check_stdin(len: usize) -> Result<(), Error> {
    if len > MAX_REMOTE_STDIN {
        return Err(Error::InvalidArgument {
            what: "stdin",
            reason: format!(
                "{len} bytes; the remote engine takes at most {MAX_REMOTE_STDIN} per exec"
            ),
        });
    }
    Ok(())
}

/// A finished exec; output in base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResultBody {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

impl From<&ExecResult> for ExecResultBody {
    fn from(r: &ExecResult) -> Self {
        ExecResultBody {
            exit_code: r.exit_code,
            stdout: b64(&r.stdout),
            stderr: b64(&r.stderr),
            signal: r.signal,
            timed_out: r.timed_out,
        }
    }
}

impl ExecResultBody {
    pub fn into_result(self) -> Result<ExecResult, Error> {
        Ok(ExecResult {
            exit_code: self.exit_code,
            stdout: unb64(&self.stdout)?,
            stderr: unb64(&self.stderr)?,
            signal: self.signal,
            timed_out: self.timed_out,
        })
    }
}

/// One line of a streamed exec, live as the guest produces it: `started`
/// first, then output, then `exit` (or `error`, which ends the stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum StreamEvent {
    Started {
        pid: u32,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        code: i32,
    },
    /// The agent reported a failure after the start (or its timeout).
    Error {
        message: String,
    },
    /// The exec itself failed mid-stream (the machine went away).
    Failed {
        error: ErrorBody,
    },
}

impl StreamEvent {
    pub fn from_event(ev: &ExecEvent) -> StreamEvent {
        match ev {
            ExecEvent::Stdout(b) => StreamEvent::Stdout { data: b64(b) },
            ExecEvent::Stderr(b) => StreamEvent::Stderr { data: b64(b) },
            ExecEvent::Exit(code) => StreamEvent::Exit { code: *code },
            ExecEvent::Error(message) => StreamEvent::Error {
                message: message.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForkBody {
    pub name: String,
}

/// A registry reference (the server's own files are not pullable).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullBody {
    pub reference: String,
}

/// One line of a pull: progress events as they happen, then `done` with
/// the image (or `failed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "line", rename_all = "lowercase")]
pub enum PullLine {
    Progress { event: PullEvent },
    Done { image: ImageInfo },
    Failed { error: ErrorBody },
}

/// `run`: an exec in a container of `image` (a registry reference, or the
/// digest of an image the machine has).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunBody {
    pub image: String,
    #[serde(flatten)]
    pub exec: ExecBody,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrittenBody {
    pub size: u64,
}

/// What went wrong, by a stable `code` and the fields that name the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// The machine, guest path or config field the error is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// For `not_running`: the machine's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MachineState>,
    /// For `guest`: what kind of error the guest agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestErrorKind>,
}

impl ErrorBody {
    fn new(code: &str, e: &Error, subject: Option<&str>) -> ErrorBody {
        ErrorBody {
            code: code.into(),
            message: crate::error::sanitize(&smol_protocol::error_chain(e)),
            subject: subject.map(str::to_string),
            state: None,
            guest: None,
        }
    }

    /// The body and HTTP status of a local error.
    pub fn of(e: &Error) -> (u16, ErrorBody) {
        let (status, body) = match e {
            Error::NotFound { name } => (404, ErrorBody::new("not_found", e, Some(name))),
            Error::AlreadyExists { name } => (409, ErrorBody::new("already_exists", e, Some(name))),
            Error::InUse { name, .. } => (409, ErrorBody::new("in_use", e, Some(name))),
            Error::InvalidConfig { field, .. } => {
                (400, ErrorBody::new("invalid_config", e, Some(field)))
            }
            Error::InvalidArgument { what, .. } => {
                (400, ErrorBody::new("invalid_argument", e, Some(what)))
            }
            Error::NotRunning { name, state } => {
                let mut b = ErrorBody::new("not_running", e, Some(name));
                b.state = Some(*state);
                (409, b)
            }
            Error::Timeout { .. } => (504, ErrorBody::new("timeout", e, None)),
            Error::FileNotFound { path } => (404, ErrorBody::new("file_not_found", e, Some(path))),
            Error::IsADirectory { path } => (409, ErrorBody::new("is_a_directory", e, Some(path))),
            Error::NotADirectory { path } => {
                (409, ErrorBody::new("not_a_directory", e, Some(path)))
            }
            Error::PermissionDenied { path } => {
                (403, ErrorBody::new("permission_denied", e, Some(path)))
            }
            Error::NoSpace { path } => (507, ErrorBody::new("no_space", e, Some(path))),
            Error::NotForkable { name } => (409, ErrorBody::new("not_forkable", e, Some(name))),
            Error::OutputTooLarge { program, .. } => {
                (422, ErrorBody::new("output_too_large", e, Some(program)))
            }
            Error::PortInUse { address } => (409, ErrorBody::new("port_in_use", e, Some(address))),
            Error::MountSource { path, .. } => (
                400,
                ErrorBody::new("mount_source", e, Some(&path.to_string_lossy())),
            ),
            Error::Unsupported(_) => (501, ErrorBody::new("unsupported", e, None)),
            Error::Unauthorized(_) => (401, ErrorBody::new("unauthorized", e, None)),
            Error::Guest { kind, .. } => {
                let mut b = ErrorBody::new("guest", e, None);
                b.guest = Some(*kind);
                (422, b)
            }
            Error::Image(_) => (422, ErrorBody::new("image", e, None)),
            _ => (500, ErrorBody::new("internal", e, None)),
        };
        (status, body)
    }

    /// The local [`Error`] of a server's answer. Field names come back as
    /// the SDK's own static names; one this SDK does not know is "remote".
    pub fn into_error(self) -> Error {
        let subject = self.subject.clone().unwrap_or_default();
        let message = self.message;
        match self.code.as_str() {
            "not_found" => Error::NotFound { name: subject },
            "already_exists" => Error::AlreadyExists { name: subject },
            "in_use" => Error::InUse {
                name: subject,
                pid: None,
            },
            "invalid_config" => Error::InvalidConfig {
                field: static_name(&subject),
                reason: message,
            },
            "invalid_argument" => Error::InvalidArgument {
                what: static_name(&subject),
                reason: message,
            },
            "not_running" => Error::NotRunning {
                name: subject,
                state: self.state.unwrap_or(MachineState::Stopped),
            },
            "timeout" => Error::Timeout {
                what: message,
                after: Duration::ZERO,
            },
            "file_not_found" => Error::FileNotFound { path: subject },
            "is_a_directory" => Error::IsADirectory { path: subject },
            "not_a_directory" => Error::NotADirectory { path: subject },
            "permission_denied" => Error::PermissionDenied { path: subject },
            "no_space" => Error::NoSpace { path: subject },
            "not_forkable" => Error::NotForkable { name: subject },
            // The limit is the client's own; it puts it back.
            "output_too_large" => Error::OutputTooLarge {
                program: subject,
                limit: 0,
            },
            "port_in_use" => Error::PortInUse { address: subject },
            "mount_source" => Error::MountSource {
                path: subject.into(),
                reason: message,
            },
            "unsupported" => Error::Unsupported(message),
            "unauthorized" => Error::Unauthorized(message),
            "guest" => Error::Guest {
                kind: self.guest.unwrap_or(GuestErrorKind::Io),
                message,
            },
            _ => Error::Remote {
                code: self.code,
                message,
            },
        }
    }
}

/// The SDK's names of config fields and call arguments, so that a remote
/// error carries the same `&'static str` as a local one.
const KNOWN_NAMES: &[&str] = &[
    "name",
    "image",
    "mounts",
    "ports",
    "resources.cpus",
    "resources.memory_mb",
    "resources.disk_mb",
    "resources.network",
    "egress_allow",
    "auto_stop_seconds",
    "ttl_seconds",
    "argv",
    "env",
    "workdir",
    "timeout",
    "path",
    "mode",
    "body",
    "endpoint",
    "id",
];

fn static_name(s: &str) -> &'static str {
    KNOWN_NAMES
        .iter()
        .find(|n| **n == s)
        .copied()
        .unwrap_or("remote")
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn unb64(s: &str) -> Result<Bytes, Error> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(Bytes::from)
        .map_err(|e| Error::Remote {
            code: "bad_answer".into(),
            message: format!("output that is not base64: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        let cases = [
            Error::NotFound { name: "m".into() },
            Error::InvalidConfig {
                field: "resources.cpus",
                reason: "0".into(),
            },
            Error::InvalidArgument {
                what: "argv",
                reason: "empty".into(),
            },
            Error::NotRunning {
                name: "m".into(),
                state: MachineState::Stopped,
            },
            Error::FileNotFound { path: "/x".into() },
            Error::NotForkable { name: "m".into() },
            Error::MountSource {
                path: "/srv/x".into(),
                reason: "does not exist".into(),
            },
            Error::Unauthorized("no key".into()),
        ];
        for e in cases {
            let (status, body) = ErrorBody::of(&e);
            let json = serde_json::to_string(&body).unwrap();
            let back: ErrorBody = serde_json::from_str(&json).unwrap();
            let got = back.into_error();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&e),
                "{status} {json}"
            );
            match (&got, &e) {
                (Error::InvalidConfig { field: a, .. }, Error::InvalidConfig { field: b, .. }) => {
                    assert_eq!(a, b)
                }
                (Error::NotRunning { state: a, .. }, Error::NotRunning { state: b, .. }) => {
                    assert_eq!(a, b)
                }
                _ => {}
            }
        }
        let odd = ErrorBody {
            code: "invalid_config".into(),
            message: "m".into(),
            subject: Some("no.such.field".into()),
            state: None,
            guest: None,
        };
        assert!(matches!(
            odd.into_error(),
            Error::InvalidConfig {
                field: "remote",
                ..
            }
        ));
    }

    #[test]
    fn stream_events_are_tagged_lines() {
        let ev = StreamEvent::from_event(&ExecEvent::Stdout(Bytes::from_static(b"hi\n")));
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(line, r#"{"event":"stdout","data":"aGkK"}"#);
        assert_eq!(serde_json::from_str::<StreamEvent>(&line).unwrap(), ev);
    }
}
