//! The vsock listener: one thread per accepted connection.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::log;
use crate::server::Agent;

/// Any CID: the guest accepts connections addressed to its own CID.
const VMADDR_CID_ANY: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot create a vsock socket (no vsock in this kernel or no device)")]
    Socket(#[source] Errno),
    #[error("cannot bind vsock port {port}")]
    Bind {
        port: u32,
        #[source]
        source: Errno,
    },
    #[error("cannot listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: Errno,
    },
}

/// Binds and listens on `port` for any CID.
pub fn listen_on(port: u32) -> Result<OwnedFd, VsockError> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(VsockError::Socket)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(VMADDR_CID_ANY, port),
    )
    .map_err(|source| VsockError::Bind { port, source })?;
    let backlog = Backlog::new(128).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|source| VsockError::Listen { port, source })?;
    Ok(fd)
}

/// Accepts connections forever, each served on its own thread.
pub fn accept_loop(listener: OwnedFd, agent: Arc<Agent>) -> ! {
    loop {
        match accept4(&listener, SockFlag::SOCK_CLOEXEC) {
            Ok(conn) => {
                let agent = agent.clone();
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || agent.serve(File::from(conn)));
                if let Err(e) = spawned {
                    log(format_args!("cannot start a connection thread: {e}"));
                }
            }
            Err(Errno::EINTR | Errno::ECONNABORTED) => {}
            Err(e) => {
                log(format_args!("vsock accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
