//! The guest agent's library side: the host/guest protocol, shared with the
//! smol SDK, and the request handlers the agent binary (`main.rs`, PID 1 in
//! the guest) serves over vsock.

pub mod exec;
pub mod files;
pub mod image;
pub mod protocol;
pub mod reaper;
pub mod reseed;
pub mod server;
pub mod system;
pub mod vsock;

/// Writes `smol-agent: <msg>` on stderr (the console when PID 1).
pub fn log(msg: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "smol-agent: {msg}");
}
