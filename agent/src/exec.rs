//! Exec requests (written next).
use std::io::Write;

use crate::protocol::{AgentError, ErrorKind, ExecRequest};
use crate::server::{send_error, ServeError};

pub fn serve<S: Write>(s: &mut S, _req: ExecRequest) -> Result<(), ServeError> {
    send_error(
        s,
        &AgentError::new(ErrorKind::Unsupported, "exec is not available yet"),
    )?;
    Ok(())
}
