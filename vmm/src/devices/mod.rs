//! Devices the monitor emulates.

pub mod virtio;
