//! `smol shell NAME` and `smol exec -t`: a command on a terminal in a
//! machine, as `docker exec -it` gives one. The command runs on a terminal in the
//! guest; this terminal is put in raw mode, so that every key (Ctrl-C
//! among them) reaches the guest's terminal, which turns it into a signal
//! for the program there. Window size changes follow (SIGWINCH).

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;

use futures::StreamExt;
use nix::sys::termios::{self, SetArg, Termios};
use smol::{ExecEvent, ExecOptions, Machine};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::CliError;

/// The size used when this process has no terminal (under a pipe).
const DEFAULT_SIZE: (u16, u16) = (80, 24);

/// Runs `argv` on a terminal in `m` of this terminal's size, with
/// `options` (env, workdir, timeout); with `keys`, this terminal's keys
/// go to it as they are typed, else its input is empty. Returns its exit
/// code.
pub async fn on_tty(
    m: Machine,
    argv: Vec<String>,
    options: ExecOptions,
    keys: bool,
) -> Result<u8, CliError> {
    let (cols, rows) = terminal_size().unwrap_or(DEFAULT_SIZE);
    let mut p = m.spawn(argv, options.tty(cols, rows)).await?;
    // Restored when dropped, on every way out of here.
    let _raw = if keys {
        Some(RawMode::enter().map_err(CliError::Input)?)
    } else {
        p.close_stdin().await?;
        None
    };
    let mut winch = signal(SignalKind::window_change()).map_err(CliError::Input)?;
    let mut keys_open = keys;
    let mut keys = if keys {
        stdin_chunks()
    } else {
        mpsc::channel(1).1
    };
    loop {
        tokio::select! {
            ev = p.next() => match ev {
                Some(Ok(ExecEvent::Stdout(b) | ExecEvent::Stderr(b))) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&b)
                        .and_then(|()| out.flush())
                        .map_err(CliError::Output)?;
                }
                Some(Ok(ExecEvent::Exit(code))) => {
                    return Ok(u8::try_from(code).unwrap_or(crate::EXIT_FAILURE))
                }
                Some(Ok(ExecEvent::Error(e))) => eprint!("smol: {e}\r\n"),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(CliError::NoExit),
            },
            chunk = keys.recv(), if keys_open => match chunk {
                Some(Ok(bytes)) => p.write_stdin(&bytes).await?,
                Some(Err(e)) => return Err(CliError::Input(e)),
                None => {
                    // Our stdin ended (a pipe): so does the shell's.
                    keys_open = false;
                    p.close_stdin().await?;
                }
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = terminal_size() {
                    if let Err(e) = p.resize(cols, rows).await {
                        eprint!("smol: resizing the terminal: {e}\r\n");
                    }
                }
            }
        }
    }
}

/// This process's stdin in chunks as they come, read on a thread of its
/// own: a read blocked on a terminal must not hold up the end of the
/// process (tokio's stdin would keep the runtime from shutting down).
fn stdin_chunks() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("smol-shell-stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            loop {
                let sent = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => tx.blocking_send(Ok(buf[..n].to_vec())),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => tx.blocking_send(Err(e)),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        // The receiver then sees the error and the shell ends with it.
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Err(e));
        return rx;
    }
    rx
}

/// The size of the terminal on stdout, if it is one.
fn terminal_size() -> Option<(u16, u16)> {
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which lives across
    // the call; the fd is stdout's, open for the whole process.
    let r = unsafe { libc::ioctl(out.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Stdin's terminal in raw mode until dropped (nothing when stdin is not
/// a terminal).
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(RawMode(None));
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode(Some(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}
