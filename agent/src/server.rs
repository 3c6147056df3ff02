//! Serves one connection = one request (see [`crate::protocol`]).
//!
//! The handler works on any byte stream that can be cloned into a read half
//! and a write half ([`Duplex`]), so the same code runs on vsock in the guest
//! and on Unix socket pairs in the host tests.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::protocol::{
    read_frame, write_frame, AgentError, ErrorKind, Frame, FrameKind, ProtocolError, Request,
    Response, PROTOCOL_VERSION,
};

/// A bidirectional byte stream whose halves can be used from two threads.
pub trait Duplex: Read + Write + AsFd + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;

    /// Closes both directions (also for clones held by other threads).
    fn shutdown_both(&self) {
        // SAFETY: shutdown(2) on a valid borrowed fd; harmless on a
        // non-socket (ENOTSOCK is ignored).
        unsafe { libc::shutdown(self.as_fd().as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Closes the sending direction: the peer reads an end of stream and
    /// may still send (a half-close).
    fn shutdown_write(&self) {
        // SAFETY: as for `shutdown_both`.
        unsafe { libc::shutdown(self.as_fd().as_raw_fd(), libc::SHUT_WR) };
    }
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

pub use crate::protocol::error_chain;

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
            Request::Hello { facts, .. } => {
                if let Some(facts) = facts {
                    if let Err(e) = crate::reseed::apply(&facts) {
                        send_error(s, &e)?;
                        return Ok(());
                    }
                }
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
            Request::PutLayer { digest, size } => crate::image::serve::put_layer(s, &digest, size)?,
            Request::MissingLayers { digests } => crate::image::serve::missing_layers(s, &digests)?,
            Request::RecordImage(record) => crate::image::serve::record_image(s, &record)?,
            Request::ListImages => crate::image::serve::list_images(s)?,
            Request::Connect { port } => crate::forward::serve_connect(s, port)?,
            Request::ConfigureNetwork => crate::net::serve_configure(s)?,
            Request::Mount { mounts } => crate::mounts::serve_mount(s, &mounts)?,
            Request::Unmount { targets } => crate::mounts::serve_unmount(s, &targets)?,
            Request::Signal { pid, signal } => match crate::exec::signal(pid, signal) {
                Ok(()) => send_response(s, &Response::Ok)?,
                Err(e) => send_error(s, &e)?,
            },
            Request::Resize { pid, size } => match crate::exec::resize(pid, size) {
                Ok(()) => send_response(s, &Response::Ok)?,
                Err(e) => send_error(s, &e)?,
            },
            Request::Detach { pid } => match crate::exec::detach(pid) {
                Ok(()) => send_response(s, &Response::Ok)?,
                Err(e) => send_error(s, &e)?,
            },
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

/// A host-side client over a Unix socket pair, for the tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::protocol::{ExecRequest, ExitStatus};
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub static SHUTDOWNS: AtomicUsize = AtomicUsize::new(0);

    pub struct Client {
        pub conn: UnixStream,
    }

    /// Starts an agent connection on its own thread, like the vsock loop.
    pub fn connect() -> Client {
        static SUBREAPER: std::sync::Once = std::sync::Once::new();
        // Orphans of our exec children come back to this process (as they
        // would to PID 1), so the reaper collects them.
        SUBREAPER.call_once(|| nix::sys::prctl::set_child_subreaper(true).unwrap());
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = Agent::new(|| {
            SHUTDOWNS.fetch_add(1, Ordering::SeqCst);
        });
        std::thread::spawn(move || agent.serve(guest));
        Client { conn: host }
    }

    /// What an exec produced.
    #[derive(Debug, Default)]
    pub struct Outcome {
        pub pid: Option<u32>,
        pub stdout: Vec<u8>,
        pub stderr: Vec<u8>,
        pub exit: Option<ExitStatus>,
        pub error: Option<AgentError>,
    }

    impl Outcome {
        pub fn out(&self) -> String {
            String::from_utf8_lossy(&self.stdout).into_owned()
        }
        pub fn err(&self) -> String {
            String::from_utf8_lossy(&self.stderr).into_owned()
        }
    }

    impl Client {
        pub fn send(&mut self, req: &Request) {
            let f = Frame::json(FrameKind::Request, req);
            write_frame(&mut self.conn, f.kind, &f.payload).unwrap();
        }

        pub fn frame(&mut self) -> Option<Frame> {
            read_frame(&mut self.conn).unwrap()
        }

        pub fn response(&mut self) -> Result<Response, AgentError> {
            let f = self.frame().expect("a frame");
            match f.kind {
                FrameKind::Response => Ok(f.parse("response").unwrap()),
                FrameKind::Error => Err(f.parse("error").unwrap()),
                k => panic!("unexpected frame {k:?}"),
            }
        }

        /// Collects frames until the connection ends.
        pub fn collect(&mut self) -> Outcome {
            let mut o = Outcome::default();
            while let Some(f) = self.frame() {
                match f.kind {
                    FrameKind::Response => match f.parse("response").unwrap() {
                        Response::Started { pid } => o.pid = Some(pid),
                        r => panic!("unexpected response {r:?}"),
                    },
                    FrameKind::Stdout => o.stdout.extend_from_slice(&f.payload),
                    FrameKind::Stderr => o.stderr.extend_from_slice(&f.payload),
                    FrameKind::Exit => o.exit = Some(f.parse("exit").unwrap()),
                    FrameKind::Error => {
                        o.error = Some(f.parse("error").unwrap());
                        break;
                    }
                    k => panic!("unexpected frame {k:?}"),
                }
            }
            o
        }
    }

    pub fn exec_req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Runs one exec on a fresh connection and collects everything.
    pub fn run(req: ExecRequest) -> Outcome {
        let mut c = connect();
        c.send(&Request::Exec(req));
        c.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn hello_answers_version() {
        let mut c = connect();
        c.send(&Request::Hello {
            facts: None,
            version: PROTOCOL_VERSION,
        });
        match c.response().unwrap() {
            Response::Hello { version, agent } => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert!(agent.starts_with("smol-agent "));
            }
            r => panic!("{r:?}"),
        }
        assert!(c.frame().is_none(), "one request per connection");
    }

    #[test]
    fn shutdown_is_answered_then_triggered() {
        let before = SHUTDOWNS.load(Ordering::SeqCst);
        let mut c = connect();
        c.send(&Request::Shutdown);
        assert_eq!(c.response().unwrap(), Response::Ok);
        assert!(c.frame().is_none());
        assert!(SHUTDOWNS.load(Ordering::SeqCst) > before);
    }

    #[test]
    fn garbage_gets_a_protocol_error() {
        for bytes in [
            &b"\xee\0\0\0\0"[..],
            &b"\x01\x03\0\0\0{x}"[..],
            &b"\x06\0\0\0\0"[..],
        ] {
            let mut c = connect();
            c.conn.write_all(bytes).unwrap();
            let e = c.response().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Protocol, "{bytes:?}");
        }
        // An oversized header is refused without allocating it.
        let mut c = connect();
        c.conn.write_all(&[1, 0xff, 0xff, 0xff, 0xff]).unwrap();
        assert!(c.response().unwrap_err().message.contains("exceeds"));
    }

    #[test]
    fn random_bytes_never_panic_the_handler() {
        // Deterministic xorshift: frames with random kinds, lengths and
        // payloads (also JSON-looking ones) must end in a Protocol error or
        // a clean close, never a panic or a hang.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: [&[u8]; 4] = [
            b"{\"op\":\"exec\"",
            b"{\"op\":\"hello\"}",
            b"{\"op\":\"write_file\",\"path\":1}",
            b"[]",
        ];
        for i in 0..300 {
            let mut bytes = Vec::new();
            match i % 3 {
                0 => bytes.extend((0..(next() % 64)).map(|_| next() as u8)),
                1 => {
                    let body = seeds[(next() % 4) as usize];
                    bytes.push(1);
                    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(body);
                }
                _ => {
                    bytes.push((next() % 12) as u8);
                    bytes.extend_from_slice(&((next() % 2048) as u32).to_le_bytes());
                    bytes.extend((0..(next() % 256)).map(|_| next() as u8));
                }
            }
            let mut c = connect();
            c.conn
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let _ = c.conn.write_all(&bytes);
            let _ = c.conn.shutdown(std::net::Shutdown::Write);
            while let Ok(Some(f)) = read_frame(&mut c.conn) {
                if f.kind == FrameKind::Error {
                    let e: AgentError = f.parse("error").unwrap();
                    assert!(
                        matches!(e.kind, ErrorKind::Protocol | ErrorKind::InvalidArgument),
                        "{bytes:?}: {e:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn silent_close_is_fine() {
        let c = connect();
        drop(c);
    }
}
