//! The seam between the public [`Machine`](crate::Machine) handle and the
//! engine that runs the machine: [`Backend`]. The local engine
//! ([`crate::backend::local`]) implements it today; a remote one (an HTTP client of
//! `smol serve`) implements the same trait, so that user code does not
//! change between targets.
//!
//! The handle validates user input (argv, paths, modes) once, before the
//! call reaches a backend; backends get the checked values.

pub(crate) mod local;
pub(crate) mod remote;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use smol_protocol::ExecRequest;
use tokio::io::AsyncRead;

use crate::config::MachineConfig;
use crate::error::Result;
use crate::exec::{ExecOptions, ExecResult, ExecStream, Input};
use crate::files::FileStream;
use crate::image::{ImageInfo, ProgressFn};
use crate::state::{BootTimings, MachineState, PortMapping};

/// A backend call: a boxed future, so that the trait is object-safe.
pub(crate) type Call<'a, T> = BoxFuture<'a, Result<T>>;

/// A source of bytes for `write_file_from`, whatever its type.
pub(crate) type Source<'a> = Box<dyn AsyncRead + Unpin + Send + 'a>;

/// What an engine does for one machine. Every public method of
/// [`Machine`](crate::Machine) goes through one of these.
pub(crate) trait Backend: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// The machine's config (as the engine completed it: name, resources).
    fn config(&self) -> &MachineConfig;
    /// The machine's directory on this host; `None` for a remote machine.
    fn dir(&self) -> Option<&Path>;
    /// The serial console log on this host; `None` for a remote machine.
    fn console_log_path(&self) -> Option<&Path>;

    fn state(&self) -> Call<'_, MachineState>;
    fn boot_timings(&self) -> Call<'_, Option<BootTimings>>;
    fn start(&self) -> Call<'_, ()>;
    fn stop(&self) -> Call<'_, ()>;
    fn delete(&self) -> Call<'_, ()>;
    /// The forwarded ports listening now; none while the machine is stopped.
    fn ports(&self) -> Call<'_, Vec<PortMapping>>;
    /// Where clients reach the machine's first forwarded port: `None` on
    /// the local engine (use [`ports`](Self::ports)), the server's host
    /// and that port on the remote one.
    fn url(&self) -> Call<'_, Option<String>>;

    /// Runs `req`, collecting at most `max_output` bytes of output, with
    /// `stdin` as its input (present exactly when `req.stdin` is set).
    fn exec(&self, req: ExecRequest, max_output: u64, stdin: Option<Input>)
        -> Call<'_, ExecResult>;
    fn exec_stream(&self, req: ExecRequest, stdin: Option<Input>) -> Call<'_, ExecStream>;
    /// Starts `req` with its stdin open for writing (or fed `stdin`).
    fn spawn(&self, req: ExecRequest, stdin: Option<Input>) -> Call<'_, crate::Process>;

    fn write_file<'a>(&'a self, path: &'a str, mode: Option<u32>, src: Source<'a>)
        -> Call<'a, u64>;
    fn read_file<'a>(&'a self, path: &'a str) -> Call<'a, Bytes>;
    fn read_file_stream<'a>(&'a self, path: &'a str) -> Call<'a, FileStream>;

    fn pull_image<'a>(
        &'a self,
        reference: &'a str,
        progress: Option<ProgressFn>,
    ) -> Call<'a, ImageInfo>;
    fn list_images(&self) -> Call<'_, Vec<ImageInfo>>;
    fn run<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecResult>;
    fn run_stream<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecStream>;

    fn snapshot<'a>(&'a self, dir: &'a Path) -> Call<'a, crate::SnapshotTimings>;
    /// A live clone named `name` (validated by the caller).
    fn fork<'a>(&'a self, name: &'a str) -> Call<'a, Arc<dyn Backend>>;
}
