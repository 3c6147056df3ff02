//! A machine that another live process runs, driven from this one.
//!
//! The owner process keeps the VM, its lock and its lifecycle; any other
//! process that connects gets a [`PeerMachine`]: exec, streams, files and
//! images go straight to the running guest through the monitor's vsock
//! socket (as the owner's own calls do), and the state follows the owner.
//! Lifecycle calls (start, stop, delete, snapshot, fork) are the owner's:
//! here they are [`Error::InUse`] naming the owner's pid, at once. Once the
//! owner lets go, `Machine::connect` in this process takes the machine over.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use smol_protocol::{ExecRequest, Request};

use super::store::{holder, MachinePaths, MachineRecord};
use crate::agent::files;
use crate::agent::images;
use crate::agent::{self, AgentConnection, AgentLink};
use crate::backend::{Backend, Call, Source};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::exec::{ExecOptions, ExecResult, ExecStream};
use crate::files::FileStream;
use crate::image::{ImageInfo, ProgressFn};
use crate::state::{BootTimings, MachineState};

#[derive(Clone)]
pub(crate) struct PeerMachine {
    name: String,
    config: MachineConfig,
    paths: MachinePaths,
    /// The owner when it was opened (from its lock file).
    owner: Option<u32>,
    images_root: PathBuf,
}

impl PeerMachine {
    /// `paths` are `<home>/machines/<name>/…`; images go through
    /// `<home>/images`, as the owner's do.
    pub fn new(record: MachineRecord, paths: MachinePaths, owner: Option<u32>) -> Self {
        let home = paths
            .dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        PeerMachine {
            images_root: home.join("images"),
            name: record.name,
            config: record.config,
            paths,
            owner,
        }
    }

    /// Running while the owner that was found still holds the machine and
    /// its monitor's socket is there; else stopped (or gone).
    async fn state(&self) -> Result<MachineState> {
        let lock = self.paths.lock.clone();
        let vsock = self.paths.vsock.clone();
        let dir = self.paths.dir.clone();
        let (held, socket, exists) =
            tokio::task::spawn_blocking(move || (holder(&lock), vsock.exists(), dir.is_dir()))
                .await
                .map_err(|e| Error::Internal(format!("state probe task: {e}")))?;
        if !exists {
            return Err(Error::NotFound {
                name: self.name.clone(),
            });
        }
        let same_owner = held.is_some() && (self.owner.is_none() || held == self.owner);
        Ok(if same_owner && socket {
            MachineState::Running
        } else {
            MachineState::Stopped
        })
    }

    fn owners(&self) -> Error {
        Error::InUse {
            name: self.name.clone(),
            pid: self.owner,
        }
    }

    async fn explain(&self, e: Error) -> Error {
        agent::explain_by_state(&self.name, e, self.state()).await
    }
}

impl AgentLink for PeerMachine {
    async fn request(&self, first: &Request) -> Result<AgentConnection> {
        match AgentConnection::open_with(&self.paths.vsock, &self.name, first).await {
            Ok(c) => Ok(c),
            Err(e) => Err(PeerMachine::explain(self, Error::Protocol(e.to_string())).await),
        }
    }

    async fn explain(&self, e: Error) -> Error {
        PeerMachine::explain(self, e).await
    }

    fn label(&self) -> &str {
        &self.name
    }

    fn images_root(&self) -> PathBuf {
        self.images_root.clone()
    }
}

impl Backend for PeerMachine {
    fn name(&self) -> &str {
        &self.name
    }

    fn config(&self) -> &MachineConfig {
        &self.config
    }

    fn dir(&self) -> Option<&Path> {
        Some(&self.paths.dir)
    }

    fn console_log_path(&self) -> Option<&Path> {
        Some(&self.paths.console_log)
    }

    fn state(&self) -> Call<'_, MachineState> {
        PeerMachine::state(self).boxed()
    }

    fn boot_timings(&self) -> Call<'_, Option<BootTimings>> {
        async { Ok(None) }.boxed()
    }

    /// Nothing to do while the owner runs it; refused once it stopped
    /// (the owner starts it, or this process connects again to own it).
    fn start(&self) -> Call<'_, ()> {
        async {
            match PeerMachine::state(self).await? {
                MachineState::Running => Ok(()),
                _ => Err(self.owners()),
            }
        }
        .boxed()
    }

    fn stop(&self) -> Call<'_, ()> {
        async { Err(self.owners()) }.boxed()
    }

    fn delete(&self) -> Call<'_, ()> {
        async { Err(self.owners()) }.boxed()
    }

    fn exec(&self, req: ExecRequest) -> Call<'_, ExecResult> {
        agent::exec::exec(self, req).boxed()
    }

    fn exec_stream(&self, req: ExecRequest) -> Call<'_, ExecStream> {
        agent::exec::exec_stream(self, req).boxed()
    }

    fn write_file<'a>(
        &'a self,
        path: &'a str,
        mode: Option<u32>,
        src: Source<'a>,
    ) -> Call<'a, u64> {
        files::write_file(self, path, mode, src).boxed()
    }

    fn read_file<'a>(&'a self, path: &'a str) -> Call<'a, Bytes> {
        files::read_file(self, path).boxed()
    }

    fn read_file_stream<'a>(&'a self, path: &'a str) -> Call<'a, FileStream> {
        files::read_file_stream(self, path).boxed()
    }

    fn pull_image<'a>(
        &'a self,
        reference: &'a str,
        progress: Option<ProgressFn>,
    ) -> Call<'a, ImageInfo> {
        images::pull_image(self, reference, progress).boxed()
    }

    fn list_images(&self) -> Call<'_, Vec<ImageInfo>> {
        images::list_images(self).boxed()
    }

    fn run<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecResult> {
        images::run_collect(self, image, argv, options).boxed()
    }

    fn run_stream<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecStream> {
        images::run_stream(self, image, argv, options).boxed()
    }

    fn snapshot<'a>(&'a self, _dir: &'a Path) -> Call<'a, crate::SnapshotTimings> {
        async { Err(self.owners()) }.boxed()
    }

    fn fork<'a>(&'a self, _name: &'a str) -> Call<'a, Arc<dyn Backend>> {
        async { Err(self.owners()) }.boxed()
    }
}
