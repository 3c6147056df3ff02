//! smol: boot and drive Linux microVMs from Rust.
//!
//! A [`Machine`] is a microVM booted by smol's own KVM monitor (`smol_vmm`)
//! with the smol agent as its init. Create one, run commands in it, move
//! files in and out, stop, start and delete it:
//!
//! ```no_run
//! use futures::StreamExt;
//! use smol::{ExecEvent, ExecOptions, Machine, MachineConfig};
//! use std::time::Duration;
//!
//! # async fn demo() -> smol::Result<()> {
//! let m = Machine::create(MachineConfig::default()).await?;
//! let r = m.exec(["ls", "-la", "/"]).await?;
//! assert_eq!(r.exit_code, 0);
//! let r = m
//!     .exec_with(["sh", "-c", "echo $K; pwd"], ExecOptions::default().env("K", "v").workdir("/tmp").timeout(Duration::from_secs(60)))
//!     .await?;
//! let mut s = m.exec_stream(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"]).await?;
//! while let Some(ev) = s.next().await {
//!     if let ExecEvent::Stdout(b) = ev? {
//!         print!("{}", String::from_utf8_lossy(&b));
//!     }
//! }
//! m.write_file("/root/run.sh", "#!/bin/sh\necho hi\n", Some(0o755)).await?;
//! let bytes = m.read_file("/root/run.sh").await?;
//! m.delete().await?;
//! # Ok(()) }
//! ```
//!
//! The same API drives machines of another host running `smol serve`
//! (module `smol::server`, feature `server`): select it with
//! [`ConnectOptions::cloud`] (or `SMOL_CLOUD_TOKEN` and `SMOL_CLOUD_URL`).
//! The HTTP API is described in [`api`].
//!
//! Machines live under `SMOL_HOME` (default `~/.local/share/smol`), one
//! directory each: `machine.json` (the record), `disk.img` (the persistent
//! root, ext4), `console.log`, `vsock.sock` (and per share of
//! [`MachineConfig::mounts`], virtiofsd's `fs<i>.sock` and `fs<i>.log`). The guest kernel and initramfs
//! come from `SMOL_KERNEL` / `SMOL_INITRAMFS`, else from the cache that
//! `cargo xtask assets` fills (`~/.cache/smol/assets`).

mod agent;
pub mod api;
mod backend;
mod config;
mod error;
pub mod exec;
mod files;
pub mod image;
mod machine;
mod process;
#[cfg(feature = "server")]
pub mod server;
mod state;

pub use config::{
    validate_name, ConnectOptions, MachineConfig, MountSpec, PortSpec, ResourceSpec,
    DEFAULT_ENDPOINT, MAX_DISK_MB, MAX_MOUNTS, MAX_NAME_LEN, MIN_DISK_MB,
};
pub use error::{Error, GuestErrorKind, Result};
pub use exec::{ExecEvent, ExecOptions, ExecResult, ExecStream, StdinReader, TtySize};
pub use files::{FileReader, FileStream};
pub use image::{ImageInfo, PullEvent};
pub use machine::Machine;
pub use process::{Process, ProcessStdin};
pub use smol_vmm::snapshot::Error as SnapshotError;
pub use smol_vmm::{is_kvm_pvm_host, SnapshotTimings};
pub use state::{BootTimings, MachineInfo, MachineState, PortMapping, VmSetupTimings};
