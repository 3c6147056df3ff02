//! File requests: `WriteFile` (streamed in, atomic replace) and `ReadFile`
//! (streamed out). Memory stays at one chunk whatever the file size.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::exec::io_error;
use crate::protocol::{
    read_frame, write_frame, AgentError, ErrorKind, FrameKind, Response, DATA_CHUNK, HEADER_LEN,
};
use crate::server::{send_error, send_response, Duplex, ServeError};

/// Mode of a written file when the request gives none.
pub const DEFAULT_MODE: u32 = 0o644;

fn invalid(msg: String) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, msg)
}

/// Checks a guest path from the host: absolute, no NUL.
fn check_path(path: &str) -> Result<&Path, AgentError> {
    if path.is_empty() {
        return Err(invalid("path is empty".into()));
    }
    if path.contains('\0') {
        return Err(invalid(format!("path contains a NUL byte: {path:?}")));
    }
    if !path.starts_with('/') {
        return Err(invalid(format!("path must be absolute: {path}")));
    }
    Ok(Path::new(path))
}

/// Removes the temporary file unless the write was committed.
struct TempFile {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Opens a fresh temporary file next to the target (same filesystem, so the
/// final rename is atomic).
fn create_temp(parent: &Path) -> Result<(File, TempFile), AgentError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!(".smol-tmp.{}.{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                return Ok((
                    f,
                    TempFile {
                        path,
                        committed: false,
                    },
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io_error(
                    &e,
                    &format!("cannot create a file in {}", parent.display()),
                ))
            }
        }
    }
}

/// Checks the target and its parent; returns the parent directory.
fn check_write_target(path: &Path, text: &str) -> Result<PathBuf, AgentError> {
    let is_dir_err = || {
        AgentError::new(
            ErrorKind::IsADirectory,
            format!("path is a directory: {text}"),
        )
    };
    if text.ends_with('/') || path.file_name().is_none() {
        return Err(is_dir_err());
    }
    let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    match std::fs::metadata(&parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::new(
                ErrorKind::NotADirectory,
                format!("parent is not a directory: {}", parent.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AgentError::new(
                ErrorKind::NotFound,
                format!("parent directory not found: {}", parent.display()),
            ))
        }
        Err(e) => {
            return Err(io_error(
                &e,
                &format!("parent directory {}", parent.display()),
            ))
        }
    }
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(is_dir_err());
    }
    Ok(parent)
}

/// Why a write ended without a file.
enum WriteEnd {
    /// Report this error, then drain what the host still sends.
    Failed(AgentError),
    /// The host went away (or broke the protocol): nothing to answer.
    Gone(ServeError),
}

fn receive<R: Read>(conn: &mut R, file: &mut File, text: &str) -> Result<u64, WriteEnd> {
    let mut size = 0u64;
    loop {
        let frame = match read_frame(conn) {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(WriteEnd::Gone(
                    io::Error::from(io::ErrorKind::UnexpectedEof).into(),
                ))
            }
            Err(e) => return Err(WriteEnd::Gone(e.into())),
        };
        match frame.kind {
            FrameKind::Data => {
                file.write_all(&frame.payload)
                    .map_err(|e| WriteEnd::Failed(io_error(&e, &format!("writing {text}"))))?;
                size += frame.payload.len() as u64;
            }
            FrameKind::Eof => return Ok(size),
            other => {
                return Err(WriteEnd::Failed(AgentError::new(
                    ErrorKind::Protocol,
                    format!("expected data or eof while writing {text}, got {other:?}"),
                )))
            }
        }
    }
}

/// Reads and discards frames until Eof or the end of the connection, so the
/// host's sends do not fail before it reads our error.
fn drain<R: Read>(conn: &mut R) {
    while let Ok(Some(f)) = read_frame(conn) {
        if f.kind == FrameKind::Eof {
            break;
        }
    }
}

/// Serves `WriteFile`: Data frames until Eof into a temporary file, then
/// mode, fsync and rename over `path`. Answers `Written` or `Error`.
pub fn serve_write<S: Duplex>(
    conn: &mut S,
    path: &str,
    mode: Option<u32>,
) -> Result<(), ServeError> {
    // Frames are read through a buffer: a header and the start of its
    // payload come in one system call (each costs ~0.4 ms in a guest on a
    // kvm_pvm host), and the file is written a whole frame at a time.
    let mut input = BufReader::with_capacity(DATA_CHUNK + HEADER_LEN, conn);
    let result = (|| {
        let mode = mode.unwrap_or(DEFAULT_MODE);
        if mode > 0o7777 {
            return Err(WriteEnd::Failed(invalid(format!(
                "mode {mode:o} is out of range"
            ))));
        }
        let target = check_path(path).map_err(WriteEnd::Failed)?;
        let parent = check_write_target(target, path).map_err(WriteEnd::Failed)?;
        let (mut file, mut temp) = create_temp(&parent).map_err(WriteEnd::Failed)?;
        let size = receive(&mut input, &mut file, path)?;
        let fail = |e: io::Error| WriteEnd::Failed(io_error(&e, &format!("writing {path}")));
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        file.sync_all().map_err(fail)?;
        drop(file);
        std::fs::rename(&temp.path, target).map_err(|e| WriteEnd::Failed(io_error(&e, path)))?;
        temp.committed = true;
        // Make the rename itself durable (survives a stop right after).
        if let Ok(dir) = File::open(&parent) {
            let _ = dir.sync_all();
        }
        Ok(size)
    })();
    // Answers go out on the connection itself (the buffer holds input only).
    match result {
        Ok(size) => send_response(input.get_mut(), &Response::Written { size })?,
        Err(WriteEnd::Failed(e)) => {
            send_error(input.get_mut(), &e)?;
            drain(&mut input);
        }
        Err(WriteEnd::Gone(e)) => return Err(e),
    }
    Ok(())
}

/// Opens a regular file for `ReadFile`: its size and mode as of the open.
/// Anything else (a device such as /dev/zero, which never ends, a FIFO, a
/// socket; also behind a symlink) is refused. The type is checked on the
/// opened file, so swapping the path afterwards changes nothing; the open
/// does not block (O_NONBLOCK: a FIFO would wait for a writer) and takes
/// no controlling terminal.
fn open_for_read(path: &str) -> Result<(File, u64, u32), AgentError> {
    let p = check_path(path)?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                AgentError::new(ErrorKind::NotFound, format!("file not found: {path}"))
            }
            _ => io_error(&e, path),
        })?;
    let meta = f.metadata().map_err(|e| io_error(&e, path))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(AgentError::new(
            ErrorKind::IsADirectory,
            format!("path is a directory: {path}"),
        ));
    }
    if !ft.is_file() {
        return Err(invalid(format!(
            "not a regular file: {path} (a {})",
            kind_of(&ft)
        )));
    }
    Ok((f, meta.len(), meta.permissions().mode() & 0o7777))
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Serves `ReadFile`: `FileInfo`, then Data frames and Eof (or `Error`).
pub fn serve_read<S: Duplex>(conn: &mut S, path: &str) -> Result<(), ServeError> {
    let (file, size, mode) = match open_for_read(path) {
        Ok(x) => x,
        Err(e) => {
            send_error(conn, &e)?;
            return Ok(());
        }
    };
    send_response(conn, &Response::FileInfo { size, mode })?;
    let mut buf = vec![0u8; DATA_CHUNK];
    // The size announced is what is sent (a file that grows meanwhile is
    // cut there); 0 is what procfs and sysfs announce: read to the end.
    let mut file: Box<dyn Read> = if size > 0 {
        Box::new(file.take(size))
    } else {
        Box::new(file)
    };
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => write_frame(conn, FrameKind::Data, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                send_error(conn, &io_error(&e, &format!("reading {path}")))?;
                return Ok(());
            }
        }
    }
    write_frame(conn, FrameKind::Eof, &[])?;
    conn.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests;
