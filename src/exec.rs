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
//!
//! Collected output is bounded: past [`ExecOptions::max_output`] bytes of
//! stdout and stderr together ([`DEFAULT_MAX_OUTPUT`] unless set), the
//! command is killed and the call is [`Error::OutputTooLarge`]. A stream
//! has no such bound: its reader takes the output as it comes.
//!
//! [`Machine::exec_with`]: crate::Machine::exec_with

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, Stream};
use smol_protocol::ExecRequest;
pub use smol_protocol::TtySize;
use tokio::io::AsyncRead;

use crate::error::{Error, Result};

/// The most output (stdout and stderr together) a collected exec keeps
/// unless [`ExecOptions::max_output`] says otherwise: 64 MiB.
pub const DEFAULT_MAX_OUTPUT: u64 = 64 << 20;

/// Options of one exec: timeout, environment, working directory, the most
/// output a collected exec keeps, and what goes to its standard input.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    pub timeout: Option<Duration>,
    /// Added to (overriding) the guest's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when absent.
    pub workdir: Option<String>,
    /// Bytes of stdout and stderr together that `exec` and `run` collect
    /// before they kill the command; [`DEFAULT_MAX_OUTPUT`] when absent.
    pub max_output: Option<u64>,
    /// Fed to the command's standard input, which then ends; stdin is
    /// `/dev/null` when absent (and `stdin_reader` too).
    pub stdin: Option<Bytes>,
    /// Streamed to the command's standard input until it ends (see
    /// [`ExecOptions::stdin_reader`]); not together with `stdin`.
    pub stdin_reader: Option<StdinReader>,
    /// Run on a pseudo-terminal of this size (see [`ExecOptions::tty`]).
    pub tty: Option<TtySize>,
}

/// Shows how much input there is, not the input (it may be large, or a
/// secret).
impl std::fmt::Debug for ExecOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecOptions")
            .field("timeout", &self.timeout)
            .field("env", &self.env)
            .field("workdir", &self.workdir)
            .field("max_output", &self.max_output)
            .field(
                "stdin",
                &self.stdin.as_ref().map(|b| format!("{} bytes", b.len())),
            )
            .field("stdin_reader", &self.stdin_reader)
            .field("tty", &self.tty)
            .finish()
    }
}

/// A reader whose bytes become a command's stdin, streamed as the command
/// takes them: [`ExecOptions::stdin_reader`]. Clones of the options share
/// it, and the first exec given it uses it up; a later one is
/// [`Error::InvalidArgument`].
#[derive(Clone)]
pub struct StdinReader(Arc<Mutex<Option<BoxReader>>>);

pub(crate) type BoxReader = Pin<Box<dyn AsyncRead + Send>>;

impl StdinReader {
    pub fn new(reader: impl AsyncRead + Send + 'static) -> StdinReader {
        StdinReader(Arc::new(Mutex::new(Some(Box::pin(reader)))))
    }

    fn take(&self) -> Option<BoxReader> {
        // A panic elsewhere while holding this lock left the Option whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn used(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// The same reader, not the same bytes.
impl PartialEq for StdinReader {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for StdinReader {}

impl std::fmt::Debug for StdinReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinReader")
            .field("used", &self.used())
            .finish()
    }
}

/// What goes to a command's stdin, as the backends take it.
pub(crate) enum Input {
    Bytes(Bytes),
    Reader(BoxReader),
}

impl Input {
    /// The bytes, for a path that cannot stream (the remote engine's
    /// bodies); a reader there is [`Error::Unsupported`].
    pub(crate) fn into_bytes(input: Option<Input>, path: &str) -> Result<Option<Bytes>> {
        match input {
            None => Ok(None),
            Some(Input::Bytes(b)) => Ok(Some(b)),
            Some(Input::Reader(_)) => Err(no_streamed_stdin(path)),
        }
    }
}

/// The error of a reader given where stdin cannot be streamed.
pub(crate) fn no_streamed_stdin(path: &str) -> Error {
    Error::Unsupported(format!(
        "ExecOptions::stdin_reader with {path} (a streamed stdin needs a two-way stream; \
         ExecOptions::stdin with bytes works there)"
    ))
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

    /// Kill the command and fail with [`Error::OutputTooLarge`] once a
    /// collected exec has more than `bytes` of output (streams are not
    /// bounded).
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.max_output = Some(bytes);
        self
    }

    /// Feeds `input` to the command's standard input, then closes it, as
    /// a shell's `<<<` or a pipe would: `wc -c` with `stdin("abc")` prints
    /// 3. The bytes go in as the command reads them, while its output is
    /// taken, so a command that reads and writes much does not stall; one
    /// that never reads them just leaves them unread.
    pub fn stdin(mut self, input: impl Into<Bytes>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    /// Streams what `reader` gives to the command's standard input until
    /// the reader ends, then closes it: a file of any size, a socket, the
    /// caller's own stdin. The bytes are read only as fast as the command
    /// takes them, while its output is read. If the reader fails, the
    /// command is killed and the exec fails with that error. Local engine
    /// only for now: the remote one answers [`Error::Unsupported`].
    pub fn stdin_reader(mut self, reader: impl AsyncRead + Send + 'static) -> Self {
        self.stdin_reader = Some(StdinReader::new(reader));
        self
    }

    /// The input of one exec: the bytes, or the reader, which this takes.
    pub(crate) fn take_input(&self) -> Result<Option<Input>> {
        match (&self.stdin, &self.stdin_reader) {
            (Some(_), Some(_)) => Err(bad(
                "stdin",
                "both bytes (stdin) and a reader (stdin_reader) are given; give one".into(),
            )),
            (Some(b), None) => Ok(Some(Input::Bytes(b.clone()))),
            (None, Some(r)) => match r.take() {
                Some(reader) => Ok(Some(Input::Reader(reader))),
                None => Err(bad(
                    "stdin_reader",
                    "the reader was given to an earlier exec, which used it up".into(),
                )),
            },
            (None, None) => Ok(None),
        }
    }

    /// Runs the command on a pseudo-terminal of `cols` by `rows` cells, as
    /// `docker exec -t` does: the program sees a tty (`isatty`, `stty
    /// size`, `TERM=xterm-256color` unless `env` sets it), its stderr comes
    /// merged into stdout the way a terminal shows both, with `\r\n` line
    /// ends, and the end of its input is the terminal's ^D. Resize it with
    /// [`Process::resize`](crate::Process::resize).
    pub fn tty(mut self, cols: u16, rows: u16) -> Self {
        self.tty = Some(TtySize { cols, rows });
        self
    }

    /// The bound on collected output.
    pub(crate) fn output_limit(&self) -> u64 {
        self.max_output.unwrap_or(DEFAULT_MAX_OUTPUT)
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
        if let Some(t) = self.tty {
            check_tty_size(t)?;
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
            stdin: self.stdin.is_some() || self.stdin_reader.is_some(),
            container: None,
            tty: self.tty,
        })
    }
}

/// A terminal size the guest can take: both sides positive.
pub(crate) fn check_tty_size(size: TtySize) -> Result<()> {
    if size.cols == 0 || size.rows == 0 {
        return Err(bad(
            "tty",
            format!("{}x{} cells: both must be positive", size.cols, size.rows),
        ));
    }
    Ok(())
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
    /// A stream of events from whichever engine runs the command.
    pub(crate) fn new(pid: u32, inner: BoxStream<'static, Result<ExecEvent>>) -> Self {
        ExecStream { pid, inner }
    }

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
        let with_input = ExecOptions::default().stdin("secret");
        assert!(with_input.request(["cat"]).unwrap().stdin);
        let shown = format!("{with_input:?}");
        assert!(
            shown.contains("6 bytes") && !shown.contains("secret"),
            "{shown}"
        );
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
}
