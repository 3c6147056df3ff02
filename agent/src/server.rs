//! Serves one connection = one request (see [`crate::protocol`]).
//!
//! The handler works on any byte stream that can be cloned into a read half
//! and a write half ([`Duplex`]), so the same code runs on vsock in the guest
//! and on Unix socket pairs in the host tests.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::protocol::{
    read_frame, write_frame, AgentError, ErrorKind, Frame, FrameKind, ProtocolError, Request,
    Response, PROTOCOL_VERSION,
};

/// A bidirectional byte stream whose halves can be used from two threads.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
}

impl Duplex for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
}

/// Accepted vsock connections are plain socket fds wrapped in a `File`.
impl Duplex for File {
    fn try_clone(&self) -> io::Result<Self> {
        File::try_clone(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("i/o on the connection")]
    Io(#[from] io::Error),
}

impl From<ServeError> for AgentError {
    fn from(e: ServeError) -> Self {
        AgentError::new(ErrorKind::Protocol, error_chain(&e))
    }
}

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// State shared by every connection.
pub struct Agent {
    shutdown: Box<dyn Fn() + Send + Sync>,
}

impl Agent {
    /// `shutdown` is called after a `Shutdown` request has been answered.
    pub fn new(shutdown: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Agent {
            shutdown: Box::new(shutdown),
        })
    }

    /// Serves one connection to its end. Never panics on peer input; errors
    /// are sent to the peer when the connection still works.
    pub fn serve<S: Duplex>(&self, mut stream: S) {
        if let Err(e) = self.handle(&mut stream) {
            // The peer may already be gone; nothing else to do then.
            let _ = send_error(&mut stream, &e.into());
        }
    }

    fn handle<S: Duplex>(&self, s: &mut S) -> Result<(), ServeError> {
        let Some(frame) = read_frame(s)? else {
            return Ok(());
        };
        let frame = frame.expect(FrameKind::Request)?;
        let req: Request = frame.parse("request")?;
        match req {
            Request::Hello { .. } => {
                let agent = format!("smol-agent {}", env!("CARGO_PKG_VERSION"));
                send_response(
                    s,
                    &Response::Hello {
                        version: PROTOCOL_VERSION,
                        agent,
                    },
                )?;
            }
            Request::Shutdown => {
                send_response(s, &Response::Ok)?;
                s.flush()?;
                (self.shutdown)();
            }
            Request::Exec(req) => crate::exec::serve(s, req)?,
            Request::WriteFile { path, mode } => crate::files::serve_write(s, &path, mode)?,
            Request::ReadFile { path } => crate::files::serve_read(s, &path)?,
        }
        Ok(())
    }
}

pub fn send_response<W: Write>(w: &mut W, r: &Response) -> Result<(), ProtocolError> {
    let f = Frame::json(FrameKind::Response, r);
    write_frame(w, f.kind, &f.payload)
}

pub fn send_error<W: Write>(w: &mut W, e: &AgentError) -> Result<(), ProtocolError> {
    let f = Frame::json(FrameKind::Error, e);
    write_frame(w, f.kind, &f.payload)
}
