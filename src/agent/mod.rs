//! Talking to the guest agent: one connection through the monitor's Unix
//! socket, the `CONNECT <port>\n` / `OK <port>\n` handshake, then protocol
//! frames. One connection carries one request (see `smol_protocol`): an
//! exec ([`exec`]), a file transfer ([`files`]), an image call ([`images`]),
//! a forwarded port connection ([`ports`]).

pub(crate) mod exec;
pub(crate) mod files;
pub(crate) mod images;
pub(crate) mod ports;

use std::io;
use std::path::{Path, PathBuf};

use smol_protocol::{
    asyncio, AgentError, Frame, FrameKind, MachineFacts, ProtocolError, Request, Response,
    AGENT_PORT, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Longest handshake reply we accept (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

/// Longest wait for the guest to accept a connection. An accept costs the
/// guest kernel little even where it is emulated (well under a second on
/// kvm_pvm hosts, a few seconds with several guests booting on two
/// cores); past this the guest is not answering.
const ACCEPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Longest wait for what the agent does at once: answer a request that
/// needs no long work (a program started, a file's size, an image record),
/// take the next frame of a transfer, send the next chunk of a file. A
/// guest past it is not answering, and the call is [`Error::Timeout`]
/// naming the step.
pub(crate) const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[cfg(test)]
thread_local! {
    /// A shorter [`ANSWER_TIMEOUT`] for the tests of this thread (a
    /// current-thread runtime runs all of a test's futures here).
    pub(crate) static TEST_ANSWER_TIMEOUT: std::cell::Cell<Option<std::time::Duration>> =
        const { std::cell::Cell::new(None) };
}

/// [`ANSWER_TIMEOUT`] (shorter in tests that set it).
pub(crate) fn answer_timeout() -> std::time::Duration {
    #[cfg(test)]
    if let Some(t) = TEST_ANSWER_TIMEOUT.with(|t| t.get()) {
        return t;
    }
    ANSWER_TIMEOUT
}

/// `fut`, or [`Error::Timeout`] for `what` after `limit`.
pub(crate) async fn within<T>(
    limit: std::time::Duration,
    what: impl FnOnce() -> String,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: what(),
            after: limit,
        }),
    }
}

/// Why the vsock handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The monitor's socket is not there or refuses connections.
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The monitor closed the connection: nothing listens on the port yet.
    #[error("vsock port {0} refused the connection")]
    Refused(u32),
    #[error("unexpected vsock handshake reply {0:?}")]
    BadReply(String),
    #[error("vsock handshake")]
    Io(#[source] io::Error),
    /// The guest did not accept within [`ACCEPT_TIMEOUT`].
    #[error("vsock port {port}: the guest did not accept the connection within {after:?}")]
    Timeout {
        port: u32,
        after: std::time::Duration,
    },
}

/// Parses the monitor's reply line (without the newline): `OK <port>`.
pub(crate) fn parse_connect_reply(line: &[u8]) -> std::result::Result<u32, HandshakeError> {
    let bad = || HandshakeError::BadReply(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let port = text.strip_prefix("OK ").ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    port.parse::<u32>().map_err(|_| bad())
}

/// A stream to the agent, past the handshake.
pub(crate) struct AgentConnection {
    stream: UnixStream,
    /// Machine name, for error messages.
    machine: String,
    /// Dropped with the connection (the engine's count of open ones).
    _held: Option<Box<dyn Send + Sync>>,
}

impl AgentConnection {
    /// Connects and sends `first` in the same write as the handshake: the
    /// monitor leaves the bytes after the `CONNECT` line in the socket, so
    /// the request reaches the agent as soon as the guest accepts, with no
    /// wait for `OK` in between.
    pub async fn open_with(
        uds: &Path,
        machine: &str,
        first: &Request,
    ) -> std::result::Result<Self, HandshakeError> {
        let frame = Frame::json(FrameKind::Request, first).encode();
        let stream = vsock_connect(uds, AGENT_PORT, &frame).await?;
        Ok(AgentConnection {
            stream,
            machine: machine.to_string(),
            _held: None,
        })
    }

    /// Keeps `guard` until the connection is dropped.
    pub fn hold(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._held = Some(Box::new(guard));
        self
    }

    /// The version handshake on a new connection: `Hello` (sent with the
    /// opening) answered by `Response::Hello`. Returns the agent's protocol
    /// version and name; with `facts` the agent applies them before it
    /// answers.
    pub async fn hello(
        uds: &Path,
        machine: &str,
        facts: Option<MachineFacts>,
    ) -> std::result::Result<(u32, String), String> {
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            facts,
        };
        let mut conn = AgentConnection::open_with(uds, machine, &hello)
            .await
            .map_err(|e| e.to_string())?;
        // The caller compares the version: a mismatch is final, not a
        // reason to try again.
        match conn.response(None).await.map_err(|e| e.to_string())? {
            Response::Hello { version, agent } => Ok((version, agent)),
            other => Err(unexpected("hello", &other).to_string()),
        }
    }

    /// Sends a frame; a guest that takes none of it within
    /// [`ANSWER_TIMEOUT`] is a timeout.
    pub async fn write(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        let machine = &self.machine;
        let sent = async {
            asyncio::write_frame(&mut self.stream, kind, payload)
                .await
                .map_err(|e| Error::from_protocol(e, machine))
        };
        within(
            answer_timeout(),
            || format!("sending to the agent of machine {machine:?} (it took nothing)"),
            sent,
        )
        .await
    }

    /// The next frame; the agent closing the connection is an error here
    /// (every request ends with an explicit final frame).
    pub async fn next(&mut self) -> Result<Frame> {
        match asyncio::read_frame(&mut self.stream).await {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(Error::Protocol(format!(
                "the agent of machine {:?} closed the connection before answering",
                self.machine
            ))),
            Err(e) => Err(Error::from_protocol(e, &self.machine)),
        }
    }

    /// Reads a `Response` frame; an `Error` frame becomes the mapped agent
    /// error (`path` names the guest file of a file request).
    pub async fn response(&mut self, path: Option<&str>) -> Result<Response> {
        let f = self.next().await?;
        match f.kind {
            FrameKind::Response => parse(&f, "response"),
            FrameKind::Error => Err(Error::from_agent(parse::<AgentError>(&f, "error")?, path)),
            other => Err(Error::Protocol(format!(
                "expected a response frame, got {other:?}"
            ))),
        }
    }

    /// [`response`](Self::response) within [`ANSWER_TIMEOUT`]; `step`
    /// names what was waited for in the timeout.
    pub async fn response_within(&mut self, path: Option<&str>, step: &str) -> Result<Response> {
        let what = format!(
            "{step} on machine {:?} (the agent did not answer)",
            self.machine
        );
        within(answer_timeout(), || what, self.response(path)).await
    }

    /// [`next`](Self::next) within [`ANSWER_TIMEOUT`].
    pub async fn next_within(&mut self, step: &str) -> Result<Frame> {
        let what = format!(
            "{step} on machine {:?} (the agent sent nothing)",
            self.machine
        );
        within(answer_timeout(), || what, self.next()).await
    }

    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The stream itself, for a connection that carries raw bytes after
    /// its answer (a forwarded port's).
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Splits into read and write halves (file uploads read the answer
    /// while still sending).
    pub fn split(
        &mut self,
    ) -> (
        tokio::net::unix::ReadHalf<'_>,
        tokio::net::unix::WriteHalf<'_>,
    ) {
        self.stream.split()
    }
}

/// How a call reaches a machine's agent: the local engine's machine in
/// real use, a loopback socket to the agent's own handlers in host tests.
pub(crate) trait AgentLink: Sync {
    /// A new connection whose first request, `first`, is already sent.
    /// (`Send`, so that generic callers can box it.)
    fn request(
        &self,
        first: &Request,
    ) -> impl std::future::Future<Output = Result<AgentConnection>> + Send;
    /// Turns a broken connection into what happened to the machine.
    async fn explain(&self, e: Error) -> Error;
    fn label(&self) -> &str;
    /// The blob cache this machine's images go through.
    fn images_root(&self) -> PathBuf;
}

/// Decodes a control frame's JSON into a protocol error we can report.
pub(crate) fn parse<T: for<'de> serde::Deserialize<'de>>(
    f: &Frame,
    what: &'static str,
) -> Result<T> {
    f.parse(what)
        .map_err(|e: ProtocolError| Error::Protocol(e.to_string()))
}

pub(crate) fn unexpected(what: &str, got: &Response) -> Error {
    Error::Protocol(format!("unexpected answer to {what}: {got:?}"))
}

/// `CONNECT <port>\n` followed by `first` (the stream's first payload
/// bytes, possibly none) in one write, then reads `OK <port>\n` byte by
/// byte so that no byte of the stream after it is consumed.
async fn vsock_connect(
    uds: &Path,
    port: u32,
    first: &[u8],
) -> std::result::Result<UnixStream, HandshakeError> {
    match tokio::time::timeout(ACCEPT_TIMEOUT, handshake(uds, port, first)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout {
            port,
            after: ACCEPT_TIMEOUT,
        }),
    }
}

async fn handshake(
    uds: &Path,
    port: u32,
    first: &[u8],
) -> std::result::Result<UnixStream, HandshakeError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| HandshakeError::Connect {
            path: uds.display().to_string(),
            source,
        })?;
    let mut opening = format!("CONNECT {port}\n").into_bytes();
    opening.extend_from_slice(first);
    stream
        .write_all(&opening)
        .await
        .map_err(|e| refused_or(e, port))?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await {
            Ok(0) => return Err(HandshakeError::Refused(port)),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_REPLY => {
                return Err(HandshakeError::BadReply(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(refused_or(e, port)),
        }
    }
    parse_connect_reply(&line)?;
    Ok(stream)
}

fn refused_or(e: io::Error, port: u32) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => HandshakeError::Refused(port),
        _ => HandshakeError::Io(e),
    }
}

/// A link to the agent behind one monitor socket, with no machine handle
/// around it: for the machine actor while it brings a guest up, and for
/// the unit tests' loopback agent.
#[derive(Clone)]
pub(crate) struct SocketLink {
    pub uds: PathBuf,
    /// Machine name, for messages.
    pub machine: String,
    /// The blob cache image requests go through.
    pub images: PathBuf,
}

impl AgentLink for SocketLink {
    async fn request(&self, first: &Request) -> Result<AgentConnection> {
        AgentConnection::open_with(&self.uds, &self.machine, first)
            .await
            .map_err(|e| Error::Protocol(e.to_string()))
    }

    async fn explain(&self, e: Error) -> Error {
        e
    }

    fn label(&self) -> &str {
        &self.machine
    }

    fn images_root(&self) -> PathBuf {
        self.images.clone()
    }
}

/// A monitor socket served by the real agent request handlers running on
/// the host (no guest): the SDK's client side against the agent's code.
#[cfg(test)]
pub(crate) mod loopback {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};

    pub(crate) use super::SocketLink as Link;

    impl Link {
        /// Serves `<dir>/vsock.sock`; the blob cache is `<dir>/images`.
        pub fn new(dir: &Path) -> Link {
            Link {
                uds: agent_socket(dir),
                machine: "loopback".into(),
                images: dir.join("images"),
            }
        }
    }

    /// Serves every connection to `<dir>/vsock.sock` with
    /// `smol_agent::server::Agent`, after the `CONNECT`/`OK` handshake.
    pub fn agent_socket(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = smol_agent::server::Agent::new(|| {});
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let agent = agent.clone();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    if line == b"CONNECT 1024" {
                        s.write_all(b"OK 1024\n").unwrap();
                        agent.serve(s);
                    }
                });
            }
        });
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[test]
    fn connect_reply_parser() {
        assert_eq!(parse_connect_reply(b"OK 1024").unwrap(), 1024);
        assert_eq!(parse_connect_reply(b"OK 0").unwrap(), 0);
        for bad in [
            &b""[..],
            b"OK",
            b"OK ",
            b"ok 1",
            b"OK -1",
            b"OK 1 2",
            b"OK 99999999999",
            b"ERR",
            b"OK \xff",
        ] {
            assert!(
                matches!(parse_connect_reply(bad), Err(HandshakeError::BadReply(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// A fake monitor socket: answers the handshake with `reply`, then
    /// echoes one frame back, so the bytes after `OK` reach the protocol.
    async fn fake_monitor(reply: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            s.get_mut().write_all(reply).await.unwrap();
            if reply.starts_with(b"OK") {
                let f = asyncio::read_frame(&mut s).await.unwrap().unwrap();
                let hello = Response::Hello {
                    version: PROTOCOL_VERSION,
                    agent: format!("fake {}", f.payload.len()),
                };
                let out = Frame::json(FrameKind::Response, &hello);
                asyncio::write_frame(s.get_mut(), out.kind, &out.payload)
                    .await
                    .unwrap();
            }
        });
        (t, path)
    }

    /// A guest that accepts every connection and then says nothing, nor
    /// reads anything: `<dir>/vsock.sock`.
    fn silent_guest(dir: &Path) -> PathBuf {
        let path = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut b = [0u8; 1];
                while std::io::Read::read(&mut s, &mut b).unwrap_or(0) == 1 && b[0] != b'\n' {}
                let _ = std::io::Write::write_all(&mut s, b"OK 1024\n");
                held.push(s);
            }
        });
        path
    }

    /// Issue 15: every call to a guest that stops answering ends with a
    /// timeout naming the step, instead of waiting forever.
    #[tokio::test]
    async fn a_silent_guest_times_out_naming_the_step() {
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link {
            uds: silent_guest(t.path()),
            machine: "loopback".into(),
            images: t.path().join("images"),
        };
        TEST_ANSWER_TIMEOUT.with(|c| c.set(Some(std::time::Duration::from_millis(300))));
        let timed_out = |e: Error, step: &str| match e {
            Error::Timeout { what, .. } if what.contains(step) => {}
            other => panic!("{step}: {other}"),
        };
        let req = crate::ExecOptions::default().request(["true"]).unwrap();
        timed_out(
            exec::exec(&link, req, 1 << 20, None).await.unwrap_err(),
            "the start of \"true\"",
        );
        timed_out(
            files::download(&link, "/etc/hostname").await.unwrap_err(),
            "read_file of /etc/hostname",
        );
        // Small enough to sit in the socket's buffer: then no confirmation.
        timed_out(
            files::upload(&link, "/x", None, &b"abc"[..])
                .await
                .unwrap_err(),
            "did not confirm",
        );
        // Too much for the buffer: the guest takes no data.
        let big = vec![0u8; 16 << 20];
        timed_out(
            files::upload(&link, "/x", None, &big[..])
                .await
                .unwrap_err(),
            "took no data",
        );
        timed_out(images::list_images(&link).await.unwrap_err(), "list images");
        TEST_ANSWER_TIMEOUT.with(|c| c.set(None));
    }

    #[tokio::test]
    async fn handshake_then_frames() {
        let (_t, path) = fake_monitor(b"OK 1024\n").await;
        let (v, agent) = AgentConnection::hello(&path, "m", None).await.unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert!(agent.starts_with("fake "));
    }

    #[tokio::test]
    async fn hello_against_the_real_agent_handlers() {
        let t = tempfile::tempdir().unwrap();
        let path = loopback::agent_socket(t.path());
        let (v, agent) = AgentConnection::hello(&path, "m", None).await.unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert!(agent.starts_with("smol-agent"), "{agent}");
    }

    #[tokio::test]
    async fn handshake_failures() {
        let (_t, path) = fake_monitor(b"").await;
        assert!(matches!(
            AgentConnection::open_with(&path, "m", &Request::ListImages).await,
            Err(HandshakeError::Refused(1024))
        ));
        let (_t, path) = fake_monitor(b"NOPE\n").await;
        assert!(matches!(
            AgentConnection::open_with(&path, "m", &Request::ListImages).await,
            Err(HandshakeError::BadReply(_))
        ));
        let (_t, path) = fake_monitor(&[b'O'; 200]).await;
        assert!(matches!(
            AgentConnection::open_with(&path, "m", &Request::ListImages).await,
            Err(HandshakeError::BadReply(_))
        ));
        let missing = std::path::Path::new("/nonexistent/smol.sock");
        assert!(matches!(
            AgentConnection::open_with(missing, "m", &Request::ListImages).await,
            Err(HandshakeError::Connect { .. })
        ));
    }
}
