//! Port forwarding, the SDK's side of the agent protocol: a `Connect`
//! request that turns its connection into a raw byte stream to a guest
//! TCP port (see `smol_protocol`). The host listeners that use it are the
//! local engine's (`backend::local::ports`).

use std::path::Path;

use smol_protocol::{Request, Response};

use super::{unexpected, AgentConnection};
use crate::error::{Error, Result};

/// A connection to guest port `port` of the machine whose monitor socket
/// is `uds`: past the agent's `Connected`, every byte of
/// [`AgentConnection::stream`] goes to and comes from that port.
pub(crate) async fn connect(uds: &Path, machine: &str, port: u16) -> Result<AgentConnection> {
    let mut conn = AgentConnection::open_with(uds, machine, &Request::Connect { port })
        .await
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let step = format!("connecting to guest port {port}");
    match conn.response_within(None, &step).await? {
        Response::Connected => Ok(conn),
        other => Err(unexpected("connect", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::loopback::agent_socket;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The real agent handler (on the host) relays to a host port, as it
    /// does to a guest port in a machine.
    #[tokio::test]
    async fn connect_relays_and_refusal_is_named() {
        let t = tempfile::tempdir().unwrap();
        let uds = agent_socket(t.path());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        });
        let mut c = connect(&uds, "m", port).await.unwrap();
        c.stream().write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        c.stream().read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");
        server.join().unwrap();

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect(&uds, "m", closed).await.err().unwrap();
        assert!(
            matches!(&e, Error::Guest { kind: crate::GuestErrorKind::ConnectionRefused, message } if message.contains(&closed.to_string())),
            "{e}"
        );
    }
}
