//! Port forwarding, the host's side: while a machine runs, a TCP listener
//! per [`PortSpec`], each accepted connection relayed over vsock to the
//! guest agent, which connects to the guest port ([`crate::agent::ports`]).
//!
//! The listeners are bound before the VM starts, so a port in use fails
//! the start at once ([`Error::PortInUse`]) and costs no boot; they accept
//! once the agent answers (connections made during the boot wait in the
//! backlog), and they close, with every relayed connection, when the
//! [`PortRelay`] is dropped: the actor drops it when the VM goes.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use super::limits::Activity;
use crate::config::PortSpec;
use crate::error::{Error, Result};
use crate::state::PortMapping;

/// Relayed connections open at once, per machine; past it, new ones wait
/// in the listeners' backlogs.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Buffer per direction of a relayed connection.
const RELAY_BUFFER: usize = 64 * 1024;
/// After a refused guest port: how long the host connection is drained
/// (so that closing it is a clean end of stream, not a reset), and at
/// most how much.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_MAX: usize = 1 << 20;
/// Pause after a failed accept (out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Where relayed connections go: the machine's monitor socket.
#[derive(Clone)]
pub(crate) struct Target {
    pub uds: PathBuf,
    pub machine: String,
    /// A relayed connection counts as an open connection (auto-stop).
    pub activity: Arc<Activity>,
}

/// The bound listeners of one machine start.
pub(crate) struct PortRelay {
    mappings: Vec<PortMapping>,
    bound: Vec<(std::net::TcpListener, u16)>,
    tasks: Vec<JoinHandle<()>>,
}

impl PortRelay {
    /// Binds a listener per spec (host port 0: any free one).
    pub fn bind(specs: &[PortSpec]) -> Result<PortRelay> {
        let mut relay = PortRelay {
            mappings: Vec::with_capacity(specs.len()),
            bound: Vec::with_capacity(specs.len()),
            tasks: Vec::new(),
        };
        for spec in specs {
            let addr = spec.bind_address();
            let listener = std::net::TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
            let local = listener
                .set_nonblocking(true)
                .and_then(|()| listener.local_addr())
                .map_err(|e| Error::io(format!("listening on host port {addr}"), e))?;
            relay.mappings.push(PortMapping {
                address: local.ip(),
                host: local.port(),
                guest: spec.guest,
            });
            relay.bound.push((listener, spec.guest));
        }
        Ok(relay)
    }

    /// Starts accepting: each connection to a listener is relayed to
    /// `target`. Needs a tokio runtime.
    pub fn serve(&mut self, target: Target) -> Result<()> {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        for (listener, guest) in self.bound.drain(..) {
            let addr = listener.local_addr().ok();
            let listener = TcpListener::from_std(listener)
                .map_err(|e| Error::io(format!("listening on host port {addr:?}"), e))?;
            let task = accept_loop(listener, guest, target.clone(), limit.clone());
            self.tasks.push(tokio::spawn(task));
        }
        Ok(())
    }

    pub fn mappings(&self) -> &[PortMapping] {
        &self.mappings
    }
}

impl Drop for PortRelay {
    /// Closes the listeners and ends every relayed connection: an accept
    /// loop owns its listener and its connections' tasks.
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind_error(addr: SocketAddr, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::AddrInUse => Error::PortInUse {
            address: addr.to_string(),
        },
        _ => Error::io(
            format!("listening on host port {addr} (MachineConfig.ports)"),
            e,
        ),
    }
}

async fn accept_loop(listener: TcpListener, guest: u16, target: Target, limit: Arc<Semaphore>) {
    // Dropped with this future (the relay's abort): its tasks end too.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let target = target.clone();
                conns.spawn(async move {
                    relay(tcp, peer, guest, &target).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::debug!(machine = %target.machine, "accepting on a forwarded port: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One host connection to guest port `guest`, until both directions end.
async fn relay(mut tcp: TcpStream, peer: SocketAddr, guest: u16, target: &Target) {
    let _busy = target.activity.open();
    let _ = tcp.set_nodelay(true);
    let mut conn = match crate::agent::ports::connect(&target.uds, &target.machine, guest).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(machine = %target.machine, %peer, guest, "forwarded connection not relayed: {e}");
            close_cleanly(tcp).await;
            return;
        }
    };
    let copied = tokio::io::copy_bidirectional_with_sizes(
        &mut tcp,
        conn.stream(),
        RELAY_BUFFER,
        RELAY_BUFFER,
    )
    .await;
    match copied {
        Ok((up, down)) => {
            tracing::trace!(machine = %target.machine, %peer, guest, up, down, "forwarded connection ended")
        }
        Err(e) => {
            tracing::debug!(machine = %target.machine, %peer, guest, "forwarded connection broke: {e}")
        }
    }
}

/// Ends a connection that cannot be relayed with an end of stream: what
/// the client sent is read and dropped for a moment, since closing a
/// socket with unread bytes resets it.
async fn close_cleanly(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < DRAIN_MAX {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

#[cfg(test)]
mod tests;
