//! A command that takes input while it runs: [`Machine::spawn`].
//!
//! [`Machine::spawn`]: crate::Machine::spawn

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::stream::{Stream, StreamExt};

use smol_protocol::{Request, TtySize};

use crate::agent::exec::{Ask, StdinWriter};
use crate::error::{Error, Result};
use crate::exec::{ExecEvent, ExecStream};

/// A running command: a `Stream` of its [`ExecEvent`]s (as
/// [`ExecStream`]), and its stdin, open until [`close_stdin`] (or given
/// whole in [`ExecOptions::stdin`](crate::ExecOptions::stdin), then closed).
///
/// Dropping it kills the command and its process group in the guest.
///
/// [`close_stdin`]: Process::close_stdin
pub struct Process {
    events: ExecStream,
    stdin: Option<StdinWriter>,
    /// It runs on a terminal.
    tty: bool,
    ask: Ask,
}

impl Process {
    pub(crate) fn new(
        events: ExecStream,
        stdin: Option<StdinWriter>,
        tty: bool,
        ask: Ask,
    ) -> Process {
        Process {
            events,
            stdin,
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

    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.events.pid()
    }

    /// Sends `data` to the command's stdin. It waits while the command's
    /// pipe is full (backpressure), and fails with [`Error::Timeout`] if
    /// the command takes none of it for the agent's answer timeout.
    /// Read the events meanwhile if the command writes as it reads.
    pub async fn write_stdin(&mut self, data: impl AsRef<[u8]>) -> Result<()> {
        match self.stdin.as_mut() {
            Some(w) => w.write(data.as_ref()).await,
            None => Err(Error::InvalidArgument {
                what: "stdin",
                reason: format!(
                    "process {} has its stdin closed (by close_stdin, or given whole in its options)",
                    self.pid()
                ),
            }),
        }
    }

    /// Ends the command's stdin (a `cat` then exits). Idempotent.
    pub async fn close_stdin(&mut self) -> Result<()> {
        match self.stdin.take() {
            Some(w) => w.close().await,
            None => Ok(()),
        }
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

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid())
            .field("stdin_open", &self.stdin.is_some())
            .field("tty", &self.tty)
            .finish_non_exhaustive()
    }
}
