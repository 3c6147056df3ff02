//! Running commands in the guest: options, results, and the output stream.
//!
//! Timeouts: the agent kills the command's whole process group when
//! [`ExecOptions::timeout`] passes and reports it. [`Machine::exec_with`]
//! then returns `Ok(ExecResult)` with `timed_out == true` (and the output
//! produced until then, `exit_code` 128 + the signal); a stream yields
//! [`ExecEvent::Error`] saying so, then [`ExecEvent::Exit`]. Only when the
//! agent itself stops answering (a hung guest) does the host give up, a grace
//! period after the timeout, with [`Error::Timeout`].
//!
//! [`Machine::exec_with`]: crate::Machine::exec_with

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, Stream};
use smol_protocol::{AgentError, ExecRequest, ExitStatus, FrameKind, Request, Response};
use tokio::time::Instant;

use crate::agent_conn::{parse, unexpected, AgentConnection};
use crate::error::{Error, Result};

/// How long past its timeout the host waits for the agent's report before
/// deciding the guest is not answering.
const HOST_GRACE: Duration = Duration::from_secs(30);

/// Options of one exec: timeout, environment, working directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub timeout: Option<Duration>,
    /// Added to (overriding) the guest's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub workdir: Option<String>,
}

impl ExecOptions {
    /// Kill the command (and its process group) after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn envs<K: Into<String>, V: Into<String>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Builds the protocol request, rejecting what execve cannot take.
    pub(crate) fn request<I, S>(&self, argv: I) -> Result<ExecRequest>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let argv: Vec<String> = argv.into_iter().map(|a| a.as_ref().to_string()).collect();
        if argv.is_empty() {
            return Err(bad("argv", "it is empty".into()));
        }
        if argv[0].is_empty() {
            return Err(bad("argv", "the program name is empty".into()));
        }
        if let Some(a) = argv.iter().find(|a| a.contains('\0')) {
            return Err(bad("argv", format!("{a:?} contains a NUL byte")));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(bad("env", format!("bad variable name {k:?}")));
            }
            if v.contains('\0') {
                return Err(bad("env", format!("the value of {k} contains a NUL byte")));
            }
        }
        if let Some(w) = &self.workdir {
            if w.is_empty() || w.contains('\0') {
                return Err(bad("workdir", format!("{w:?}")));
            }
        }
        let timeout_ms = match self.timeout {
            Some(d) if d.is_zero() => return Err(bad("timeout", "it is zero".into())),
            Some(d) => Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)),
            None => None,
        };
        Ok(ExecRequest {
            argv,
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            timeout_ms,
            stdin: false,
            container: None,
        })
    }
}

fn bad(what: &'static str, reason: String) -> Error {
    Error::InvalidArgument { what, reason }
}

/// What a finished command left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit code; 128 + the signal number when a signal ended it.
    pub exit_code: i32,
    pub stdout: Bytes,
    pub stderr: Bytes,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    pub timed_out: bool,
}

impl ExecResult {
    /// Exited with code 0 (no signal, no timeout).
    pub fn success(&self) -> bool {
        self.exit_code == 0 && self.signal.is_none() && !self.timed_out
    }

    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// One event of a streamed exec, in the order the agent reported them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event: the exit code (128 + signal for a signal).
    Exit(i32),
    /// The agent reported a failure after the command started (or its
    /// timeout); the stream ends after it (after `Exit` for a timeout).
    Error(String),
}

/// The output of [`Machine::exec_stream`](crate::Machine::exec_stream): a
/// `Stream` of [`ExecEvent`]s. Output is read from the guest only as fast as
/// the stream is polled (backpressure reaches the command's pipes).
pub struct ExecStream {
    pid: u32,
    inner: BoxStream<'static, Result<ExecEvent>>,
}

impl ExecStream {
    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Stream for ExecStream {
    type Item = Result<ExecEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// What the agent sends after `Started`.
enum Raw {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
    Failed(AgentError),
}

/// An exec in flight on its own connection.
pub(crate) struct RunningExec {
    conn: AgentConnection,
    pid: u32,
    deadline: Option<Instant>,
    program: String,
    timeout: Option<Duration>,
}

impl RunningExec {
    /// Sends the request and waits for `Started` (a missing program or a bad
    /// workdir fails here).
    pub async fn start(mut conn: AgentConnection, req: ExecRequest) -> Result<Self> {
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let deadline = timeout.map(|t| Instant::now() + t + HOST_GRACE);
        let program = req.argv[0].clone();
        conn.send(&Request::Exec(req)).await?;
        let pid = match conn.response(None).await? {
            Response::Started { pid } => pid,
            other => return Err(unexpected("exec", &other)),
        };
        Ok(RunningExec {
            conn,
            pid,
            deadline,
            program,
            timeout,
        })
    }

    async fn next(&mut self) -> Result<Raw> {
        let frame = match self.deadline {
            Some(d) => match tokio::time::timeout_at(d, self.conn.next()).await {
                Ok(f) => f?,
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!(
                            "exec of {:?} (the agent did not report its timeout)",
                            self.program
                        ),
                        after: self.timeout.unwrap_or_default() + HOST_GRACE,
                    })
                }
            },
            None => self.conn.next().await?,
        };
        Ok(match frame.kind {
            FrameKind::Stdout => Raw::Stdout(Bytes::from(frame.payload)),
            FrameKind::Stderr => Raw::Stderr(Bytes::from(frame.payload)),
            FrameKind::Exit => Raw::Exit(parse(&frame, "exit")?),
            FrameKind::Error => Raw::Failed(parse(&frame, "error")?),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} frame during exec"
                )))
            }
        })
    }

    /// Collects everything into an [`ExecResult`].
    pub async fn collect(mut self) -> Result<ExecResult> {
        let mut stdout = BytesMut::new();
        let mut stderr = BytesMut::new();
        loop {
            match self.next().await? {
                Raw::Stdout(b) => stdout.extend_from_slice(&b),
                Raw::Stderr(b) => stderr.extend_from_slice(&b),
                Raw::Exit(st) => {
                    return Ok(ExecResult {
                        exit_code: exit_code(&st)?,
                        stdout: stdout.freeze(),
                        stderr: stderr.freeze(),
                        signal: st.signal,
                        timed_out: st.timed_out,
                    })
                }
                Raw::Failed(e) => return Err(Error::from_agent(e, None)),
            }
        }
    }

    /// Turns the rest into an [`ExecStream`]. `keep` is held until the
    /// stream is dropped (the machine handle, so the machine outlives it).
    pub fn into_stream<K: Send + 'static>(mut self, keep: K) -> ExecStream {
        let pid = self.pid;
        let inner = async_stream::stream! {
            let _keep = keep;
            loop {
                match self.next().await {
                    Ok(Raw::Stdout(b)) => yield Ok(ExecEvent::Stdout(b)),
                    Ok(Raw::Stderr(b)) => yield Ok(ExecEvent::Stderr(b)),
                    Ok(Raw::Exit(st)) => {
                        match exit_code(&st) {
                            Ok(code) => {
                                if st.timed_out {
                                    let t = self.timeout.unwrap_or_default();
                                    yield Ok(ExecEvent::Error(format!(
                                        "timed out after {t:?}; the process group was killed"
                                    )));
                                }
                                yield Ok(ExecEvent::Exit(code));
                            }
                            Err(e) => yield Err(e),
                        }
                        break;
                    }
                    Ok(Raw::Failed(e)) => {
                        yield Ok(ExecEvent::Error(crate::error::sanitize(&e.message)));
                        break;
                    }
                    Err(e) => {
                        yield Err(e);
                        break;
                    }
                }
            }
        };
        ExecStream {
            pid,
            inner: Box::pin(inner),
        }
    }
}

/// The shell convention: the code, or 128 + the signal.
fn exit_code(st: &ExitStatus) -> Result<i32> {
    match (st.code, st.signal) {
        (Some(c), _) => Ok(c),
        (None, Some(s)) if (1..=64).contains(&s) => Ok(128 + s),
        _ => Err(Error::Protocol(format!(
            "exit status with neither a code nor a valid signal: {st:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_built_untouched() {
        let r = ExecOptions::default()
            .timeout(Duration::from_micros(10))
            .env("A", "b c")
            .workdir("/tmp")
            .request(["echo", "a b", "'q'", "\"d\""])
            .unwrap();
        assert_eq!(r.argv, ["echo", "a b", "'q'", "\"d\""]);
        assert_eq!(r.env, [("A".to_string(), "b c".to_string())]);
        assert_eq!(r.timeout_ms, Some(1));
        assert_eq!(r.workdir.as_deref(), Some("/tmp"));
        assert!(!r.stdin);
    }

    #[test]
    fn bad_requests_are_named() {
        let o = ExecOptions::default();
        let empty: [&str; 0] = [];
        assert!(matches!(
            o.request(empty),
            Err(Error::InvalidArgument { what: "argv", .. })
        ));
        assert!(matches!(
            o.request([""]),
            Err(Error::InvalidArgument { what: "argv", .. })
        ));
        assert!(matches!(
            o.request(["a\0b"]),
            Err(Error::InvalidArgument { what: "argv", .. })
        ));
        for k in ["", "A=B", "A\0"] {
            let e = o.clone().env(k, "v").request(["true"]).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument { what: "env", .. }),
                "{k:?}"
            );
        }
        let e = o
            .clone()
            .timeout(Duration::ZERO)
            .request(["true"])
            .unwrap_err();
        assert!(matches!(
            e,
            Error::InvalidArgument {
                what: "timeout",
                ..
            }
        ));
        let e = o.clone().workdir("").request(["true"]).unwrap_err();
        assert!(matches!(
            e,
            Error::InvalidArgument {
                what: "workdir",
                ..
            }
        ));
    }

    #[test]
    fn exit_codes() {
        let st = |code, signal| ExitStatus {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(exit_code(&st(Some(3), None)).unwrap(), 3);
        assert_eq!(exit_code(&st(None, Some(9))).unwrap(), 137);
        assert!(exit_code(&st(None, None)).is_err());
        assert!(exit_code(&st(None, Some(1000))).is_err());
    }
}
