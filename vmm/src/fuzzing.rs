//! What the fuzz targets (`fuzz/` in the repository) need beyond the public
//! API, built only with `--cfg fuzzing` (which cargo-fuzz and `cargo xtask
//! fuzz` pass): the device tests' driver side of a virtqueue, and the vsock
//! device's queue glue. [`VsockMuxer::check_bounds`] is the third part.
//!
//! [`VsockMuxer::check_bounds`]: crate::devices::virtio::vsock::VsockMuxer::check_bounds

pub use crate::devices::virtio::test_queue::{DriverQueue, F_NEXT, F_WRITE};
pub use crate::devices::virtio::vsock::fuzzing::VsockQueues;
