//! A command that takes input while it runs: [`Machine::spawn`].
//!
//! [`Machine::spawn`]: crate::Machine::spawn

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::future::BoxFuture;
use futures::stream::{Stream, StreamExt};
use futures::FutureExt;

use smol_protocol::{Request, TtySize};

use crate::agent::exec::{Ask, StdinWriter};
use crate::error::{Error, Result};
use crate::exec::{ExecEvent, ExecStream};

/// A running command: a `Stream` of its [`ExecEvent`]s (as
/// [`ExecStream`]), and its stdin, open until [`close_stdin`] (or given
/// whole in [`ExecOptions::stdin`](crate::ExecOptions::stdin) or
/// [`stdin_reader`](crate::ExecOptions::stdin_reader), then closed).
///
/// It is also a `tokio::io::AsyncWrite` onto that stdin (see
/// [`ProcessStdin`]); [`take_stdin`](Process::take_stdin) hands the stdin
/// to another task, to write while this one reads the events.
///
/// Dropping it kills the command and its process group in the guest,
/// unless it was [`detach`](Process::detach)ed.
///
/// [`close_stdin`]: Process::close_stdin
pub struct Process {
    events: ExecStream,
    stdin: ProcessStdin,
    /// The exec connection, shut when the process is dropped: a stdin
    /// taken elsewhere holds the socket open, and the command must still
    /// end with its `Process`.
    connection: std::os::unix::net::UnixStream,
    /// It runs on a terminal.
    tty: bool,
    ask: Ask,
}

/// The stdin of a [`Process`], a `tokio::io::AsyncWrite`:
/// `tokio::io::copy(&mut file, &mut stdin)` streams a file in. A write
/// takes up to 64 KiB and sends it while the caller goes on, one frame in
/// flight, so the command's pace holds the writer back; a flush waits for
/// what is in flight, and a shutdown closes stdin (the command sees its
/// end). Dropping it leaves stdin open (a write in flight is finished
/// first); the command ends with its [`Process`].
pub struct ProcessStdin {
    state: Stdin,
    pid: u32,
}

enum Stdin {
    Open(StdinWriter),
    /// A write of the `AsyncWrite` side in flight; the writer comes back.
    Writing(BoxFuture<'static, (StdinWriter, Result<()>)>),
    /// The `AsyncWrite` side's shutdown in flight.
    Closing(BoxFuture<'static, Result<()>>),
    Closed,
}

impl ProcessStdin {
    /// Sends `data`, as [`Process::write_stdin`].
    pub async fn write(&mut self, data: impl AsRef<[u8]>) -> Result<()> {
        futures::future::poll_fn(|cx| self.poll_settle(cx)).await?;
        match &mut self.state {
            Stdin::Open(w) => w.write(data.as_ref()).await,
            _ => Err(self.closed_error()),
        }
    }

    /// Ends the command's stdin, as [`Process::close_stdin`]. Idempotent.
    pub async fn close(&mut self) -> Result<()> {
        futures::future::poll_fn(|cx| self.poll_settle(cx)).await?;
        match std::mem::replace(&mut self.state, Stdin::Closed) {
            Stdin::Open(w) => w.close().await,
            _ => Ok(()),
        }
    }

    fn is_open(&self) -> bool {
        matches!(self.state, Stdin::Open(_) | Stdin::Writing(_))
    }

    fn closed_error(&self) -> Error {
        Error::InvalidArgument {
            what: "stdin",
            reason: format!(
                "process {} has its stdin closed (by close_stdin or a shutdown, given whole \
                 in its options, or taken by take_stdin)",
                self.pid
            ),
        }
    }

    /// Waits for the write or shutdown in flight, and gives its result.
    fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match &mut self.state {
            Stdin::Writing(f) => {
                let (w, r) = ready!(f.poll_unpin(cx));
                self.state = Stdin::Open(w);
                Poll::Ready(r)
            }
            Stdin::Closing(f) => {
                let r = ready!(f.poll_unpin(cx));
                self.state = Stdin::Closed;
                Poll::Ready(r)
            }
            Stdin::Open(_) | Stdin::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// The crate's error as an `io::Error` of the `AsyncWrite` side, its
/// message kept.
fn io_error(e: Error) -> std::io::Error {
    let kind = match &e {
        Error::Timeout { .. } => std::io::ErrorKind::TimedOut,
        Error::InvalidArgument { .. } => std::io::ErrorKind::BrokenPipe,
        _ => std::io::ErrorKind::Other,
    };
    std::io::Error::new(kind, e)
}

impl tokio::io::AsyncWrite for ProcessStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_settle(cx)).map_err(io_error)?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut w = match std::mem::replace(&mut this.state, Stdin::Closed) {
            Stdin::Open(w) => w,
            _ => return Poll::Ready(Err(io_error(this.closed_error()))),
        };
        let n = buf.len().min(crate::agent::exec::STDIN_CHUNK);
        let data = buf[..n].to_vec();
        let mut write = async move {
            let r = w.write(&data).await;
            (w, r)
        }
        .boxed();
        // Started now; a failure shows at the next write, flush or shutdown.
        match write.poll_unpin(cx) {
            Poll::Ready((w, r)) => {
                this.state = Stdin::Open(w);
                r.map_err(io_error)?;
            }
            Poll::Pending => this.state = Stdin::Writing(write),
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().poll_settle(cx).map_err(io_error)
    }

    /// Closes stdin, after what is in flight. Idempotent.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_settle(cx)).map_err(io_error)?;
        if let Stdin::Open(w) = std::mem::replace(&mut this.state, Stdin::Closed) {
            this.state = Stdin::Closing(w.close().boxed());
            ready!(this.poll_settle(cx)).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for ProcessStdin {
    fn drop(&mut self) {
        // Half a frame would corrupt the exec connection, and the agent
        // would end the command: the write in flight is finished. (Once
        // the process is dropped, its connection is shut and it fails at
        // once.)
        if let Stdin::Writing(write) = std::mem::replace(&mut self.state, Stdin::Closed) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(write);
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // The agent kills the command when its connection ends (unless it
        // was detached); a stdin held elsewhere must not keep it open.
        let _ = self.connection.shutdown(std::net::Shutdown::Both);
    }
}

impl std::fmt::Debug for ProcessStdin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessStdin")
            .field("pid", &self.pid)
            .field("open", &self.is_open())
            .finish()
    }
}

impl Process {
    pub(crate) fn new(
        events: ExecStream,
        stdin: Option<StdinWriter>,
        connection: std::os::unix::net::UnixStream,
        tty: bool,
        ask: Ask,
    ) -> Process {
        let pid = events.pid();
        Process {
            events,
            stdin: ProcessStdin {
                state: stdin.map_or(Stdin::Closed, Stdin::Open),
                pid,
            },
            connection,
            tty,
            ask,
        }
    }

    /// Resizes the terminal of a command spawned with
    /// [`ExecOptions::tty`](crate::ExecOptions::tty) (the program gets
    /// SIGWINCH); one without a terminal, or a size of zero, is
    /// [`Error::InvalidArgument`].
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        if !self.tty {
            return Err(Error::InvalidArgument {
                what: "tty",
                reason: format!(
                    "process {} has no terminal (spawn it with ExecOptions::tty)",
                    self.pid()
                ),
            });
        }
        let size = TtySize { cols, rows };
        crate::exec::check_tty_size(size)?;
        (self.ask)(Request::Resize {
            pid: self.pid(),
            size,
        })
        .await
    }

    /// Sends the command signal `sig` (`libc::SIGTERM`...; 1 to 31). The
    /// events then end with its exit, 128 + `sig` if the signal ended it.
    /// A number that is no signal is [`Error::InvalidArgument`]; a command
    /// that has ended already is an error the agent names.
    pub async fn signal(&self, sig: i32) -> Result<()> {
        if !(1..=31).contains(&sig) {
            return Err(Error::InvalidArgument {
                what: "signal",
                reason: format!("{sig} is not a signal (1 to 31)"),
            });
        }
        (self.ask)(Request::Signal {
            pid: self.pid(),
            signal: sig,
        })
        .await
    }

    /// Lets the command run on without this handle, and gives its pid:
    /// it is no longer killed when the handle goes (its timeout, if any,
    /// still holds). Its stdin is closed and its output from then on
    /// discarded; `kill PID` in an exec ends it. An error (the command has
    /// ended already, and it is the agent's to name) leaves the handle's
    /// usual end: the drop kills what may remain.
    pub async fn detach(self) -> Result<u32> {
        let pid = self.pid();
        (self.ask)(Request::Detach { pid }).await?;
        Ok(pid)
    }

    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.events.pid()
    }

    /// Sends `data` to the command's stdin. It waits while the command's
    /// pipe is full (backpressure), and fails with [`Error::Timeout`] if
    /// the command takes none of it for the agent's answer timeout.
    /// Read the events meanwhile if the command writes as it reads.
    pub async fn write_stdin(&mut self, data: impl AsRef<[u8]>) -> Result<()> {
        self.stdin.write(data).await
    }

    /// Ends the command's stdin (a `cat` then exits). Idempotent.
    pub async fn close_stdin(&mut self) -> Result<()> {
        self.stdin.close().await
    }

    /// Takes the stdin, to write from another task while this one reads
    /// the events; the process's own stdin is closed to it from then on
    /// (writes are [`Error::InvalidArgument`]). `None` once taken.
    pub fn take_stdin(&mut self) -> Option<ProcessStdin> {
        if matches!(self.stdin.state, Stdin::Closed) {
            return None;
        }
        let pid = self.stdin.pid;
        Some(std::mem::replace(
            &mut self.stdin,
            ProcessStdin {
                state: Stdin::Closed,
                pid,
            },
        ))
    }

    /// Closes stdin, then waits for the exit and returns its code (128 +
    /// the signal for a signal). Output not read yet is dropped: read the
    /// events first to keep it.
    pub async fn wait(mut self) -> Result<i32> {
        // A command that has ended (a signal) no longer takes the close:
        // its exit is what counts.
        let _ = self.close_stdin().await;
        // A timeout is reported, then the exit; a failure only reported.
        let mut failure = None;
        while let Some(ev) = self.events.next().await {
            match ev? {
                ExecEvent::Exit(code) => return Ok(code),
                ExecEvent::Stdout(_) | ExecEvent::Stderr(_) => {}
                ExecEvent::Error(message) => failure = Some(message),
            }
        }
        Err(Error::Guest {
            kind: crate::GuestErrorKind::Io,
            message: format!(
                "process {} ended without an exit status: {}",
                self.pid(),
                failure.as_deref().unwrap_or("the agent reported none")
            ),
        })
    }
}

impl Stream for Process {
    type Item = Result<ExecEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}

/// Writes go to its stdin, as [`ProcessStdin`]'s.
impl tokio::io::AsyncWrite for Process {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid())
            .field("stdin_open", &self.stdin.is_open())
            .field("tty", &self.tty)
            .finish_non_exhaustive()
    }
}
