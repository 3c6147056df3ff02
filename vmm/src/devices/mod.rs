//! Devices the monitor emulates.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
