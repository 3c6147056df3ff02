//! The guest agent's library side: the host/guest protocol, shared with the
//! smol SDK. The agent binary (`main.rs`) is PID 1 in the guest.

pub mod protocol;
