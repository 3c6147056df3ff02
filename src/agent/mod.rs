//! One connection to the guest agent: the monitor's Unix socket, the
//! `CONNECT <port>\n` / `OK <port>\n` handshake, then protocol frames.
//! One connection carries one request (see `smol_protocol`).

use std::io;
use std::path::Path;

use smol_protocol::{
    asyncio, AgentError, Frame, FrameKind, MachineFacts, ProtocolError, Request, Response,
    AGENT_PORT, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Longest handshake reply we accept (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

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
}

impl AgentConnection {
    /// Connects through the monitor's socket to the agent's port.
    pub async fn open(uds: &Path, machine: &str) -> std::result::Result<Self, HandshakeError> {
        let stream = vsock_connect(uds, AGENT_PORT).await?;
        Ok(AgentConnection {
            stream,
            machine: machine.to_string(),
        })
    }

    /// The version handshake: `Hello` answered by `Response::Hello`.
    /// Says hello and returns the agent's protocol version and name; with
    /// `facts` the agent applies them before it answers.
    pub async fn hello(&mut self, facts: Option<MachineFacts>) -> Result<(u32, String)> {
        self.send(&Request::Hello {
            version: PROTOCOL_VERSION,
            facts,
        })
        .await?;
        // The caller compares the version: a mismatch is final, not a
        // reason to try again.
        match self.response(None).await? {
            Response::Hello { version, agent } => Ok((version, agent)),
            other => Err(unexpected("hello", &other)),
        }
    }

    /// Sends the request frame.
    pub async fn send(&mut self, req: &Request) -> Result<()> {
        let f = Frame::json(FrameKind::Request, req);
        self.write(f.kind, &f.payload).await
    }

    pub async fn write(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        asyncio::write_frame(&mut self.stream, kind, payload)
            .await
            .map_err(|e| Error::from_protocol(e, &self.machine))
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

    pub fn machine(&self) -> &str {
        &self.machine
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

/// `CONNECT <port>\n`, then reads `OK <port>\n` byte by byte so that no
/// byte of the stream after it is consumed.
async fn vsock_connect(uds: &Path, port: u32) -> std::result::Result<UnixStream, HandshakeError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| HandshakeError::Connect {
            path: uds.display().to_string(),
            source,
        })?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
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

/// A monitor socket served by the real agent request handlers running on
/// the host (no guest): the SDK's client side against the agent's code.
#[cfg(test)]
pub(crate) mod loopback {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

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

    #[tokio::test]
    async fn handshake_then_frames() {
        let (_t, path) = fake_monitor(b"OK 1024\n").await;
        let mut c = AgentConnection::open(&path, "m").await.unwrap();
        let (v, agent) = c.hello(None).await.unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert!(agent.starts_with("fake "));
    }

    #[tokio::test]
    async fn hello_against_the_real_agent_handlers() {
        let t = tempfile::tempdir().unwrap();
        let path = loopback::agent_socket(t.path());
        let mut c = AgentConnection::open(&path, "m").await.unwrap();
        let (v, agent) = c.hello(None).await.unwrap();
        assert_eq!(v, PROTOCOL_VERSION);
        assert!(agent.starts_with("smol-agent"), "{agent}");
    }

    #[tokio::test]
    async fn handshake_failures() {
        let (_t, path) = fake_monitor(b"").await;
        assert!(matches!(
            AgentConnection::open(&path, "m").await,
            Err(HandshakeError::Refused(1024))
        ));
        let (_t, path) = fake_monitor(b"NOPE\n").await;
        assert!(matches!(
            AgentConnection::open(&path, "m").await,
            Err(HandshakeError::BadReply(_))
        ));
        let (_t, path) = fake_monitor(&[b'O'; 200]).await;
        assert!(matches!(
            AgentConnection::open(&path, "m").await,
            Err(HandshakeError::BadReply(_))
        ));
        let missing = std::path::Path::new("/nonexistent/smol.sock");
        assert!(matches!(
            AgentConnection::open(missing, "m").await,
            Err(HandshakeError::Connect { .. })
        ));
    }
}
