//! The guest agent's library side: the request handlers the agent binary
//! (`main.rs`, PID 1 in the guest) serves over vsock. The protocol they
//! speak is the `smol-protocol` crate, which the SDK shares.

pub mod exec;
pub mod files;
pub mod forward;
pub mod image;
pub mod mounts;
pub mod net;
/// The wire protocol, shared with the SDK (the `smol-protocol` crate).
pub use smol_protocol as protocol;
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
