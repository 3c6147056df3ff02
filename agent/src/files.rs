//! File requests (written next).
use std::io::Write;

use crate::protocol::{AgentError, ErrorKind};
use crate::server::{send_error, ServeError};

pub fn serve_write<S: Write>(s: &mut S, _path: &str, _mode: Option<u32>) -> Result<(), ServeError> {
    send_error(
        s,
        &AgentError::new(ErrorKind::Unsupported, "write_file is not available yet"),
    )?;
    Ok(())
}

pub fn serve_read<S: Write>(s: &mut S, _path: &str) -> Result<(), ServeError> {
    send_error(
        s,
        &AgentError::new(ErrorKind::Unsupported, "read_file is not available yet"),
    )?;
    Ok(())
}
