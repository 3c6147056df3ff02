//! An exec on its own agent connection: the request, `Started`, then
//! output frames until the exit (or the agent's error).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use smol_protocol::{AgentError, ExecRequest, ExitStatus, FrameKind, Request, Response};
use tokio::time::Instant;

use super::{parse, unexpected, AgentConnection, AgentLink};
use crate::error::{Error, Result};
use crate::exec::{ExecEvent, ExecResult, ExecStream};

/// How long past its timeout the host waits for the agent's report before
/// deciding the guest is not answering.
const HOST_GRACE: Duration = Duration::from_secs(30);

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

/// Runs `req` and collects its output; a broken connection is explained.
pub(crate) async fn exec<L: AgentLink>(link: &L, req: ExecRequest) -> Result<ExecResult> {
    let run = async { RunningExec::start(link, req).await?.collect().await };
    match run.await {
        Ok(r) => Ok(r),
        Err(e) => Err(link.explain(e).await),
    }
}

/// Runs `req` and streams its output; the stream holds `link` (a machine
/// handle), so the machine outlives it.
pub(crate) async fn exec_stream<L>(link: &L, req: ExecRequest) -> Result<ExecStream>
where
    L: AgentLink + Clone + Send + 'static,
{
    match RunningExec::start(link, req).await {
        Ok(running) => Ok(running.into_stream(link.clone())),
        Err(e) => Err(link.explain(e).await),
    }
}

impl RunningExec {
    /// Opens a connection with the request and waits for `Started` (a
    /// missing program or a bad workdir fails here).
    pub async fn start<L: AgentLink>(link: &L, req: ExecRequest) -> Result<Self> {
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let deadline = timeout.map(|t| Instant::now() + t + HOST_GRACE);
        let program = req.argv[0].clone();
        let mut conn = link.request(&Request::Exec(req)).await?;
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
        ExecStream::new(pid, Box::pin(inner))
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
