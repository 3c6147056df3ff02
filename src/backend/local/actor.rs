//! The machine actor: one tokio task per open machine, owning its VM, its
//! store lock and its state. [`Machine`](crate::Machine) handles talk to it
//! over a bounded channel, each request carrying a oneshot for the answer.
//!
//! The actor does only the lifecycle (boot, stop, delete); execs and file
//! transfers open their own connections to the monitor's socket, without a
//! word to the actor, so they run concurrently and never queue behind one
//! another or behind a boot.

use std::path::PathBuf;
use std::time::Duration;

use smol_protocol::{ExecRequest, MachineFacts, Request, Response, PROTOCOL_VERSION, READY_LINE};
use smol_vmm::{DiskConfig, ExitReason, Vm, VmConfig, VsockConfig};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agent::{unexpected, AgentConnection, SocketLink};
use crate::backend::local::assets::GuestAssets;
use crate::backend::local::disk::{DISK_CMDLINE, DISK_ID};
use crate::backend::local::fs::{share_mounts, Shares};
use crate::backend::local::limits::{Activity, Due, Limits};
use crate::backend::local::net::Passt;
use crate::backend::local::ports::{PortRelay, Target};
use crate::backend::local::store::{MachineLock, MachinePaths, MachineRecord};
use crate::error::{sanitize, Error, Result};
use crate::state::{BootTimings, MachineState, PortMapping};

/// Requests waiting for the actor; senders wait when it is full.
pub(crate) const CHANNEL_CAPACITY: usize = 32;
/// One attempt to reach the agent during boot.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// Time for the agent to acknowledge `Shutdown`.
const SHUTDOWN_ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the guest to power off after acknowledging.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Hello attempts before the console shows the agent's ready line.
const SLOW_ATTEMPT_EVERY: Duration = Duration::from_secs(1);
/// Lines of console log quoted in a boot error.
const CONSOLE_TAIL_LINES: usize = 30;
/// A guest report's limits (see `MachineActor::guest_report`).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
const REPORT_MAX_OUTPUT: u64 = 16 * 1024;
/// The guest's side of a network configuration that did not answer: its
/// clock, the DHCP client's log, and the state of the step's processes
/// (nothing that sleeps: a guest whose timers stopped must still answer).
const NET_REPORT: &str = r#"echo "uptime: $(cat /proc/uptime)"
echo "udhcpc log:"; tail -n 20 /run/smol/udhcpc.log 2>&1
for p in /proc/[0-9]*; do
  read -r c < "$p/comm" 2>/dev/null || continue
  case "$c" in udhcpc|ip|ifconfig|mv) echo "$c (pid ${p#/proc/}): state $(cut -d' ' -f3 "$p/stat")";; esac
done"#;

/// A request to the actor.
pub(crate) enum Command {
    State(oneshot::Sender<Result<MachineState>>),
    Timings(oneshot::Sender<Option<BootTimings>>),
    /// Boot; the duration is the preparation already spent (by `create`).
    Start(Duration, oneshot::Sender<Result<()>>),
    /// Start from the snapshot in the directory instead of booting (the
    /// disk is in place already); the duration as for `Start`.
    Restore(PathBuf, Duration, oneshot::Sender<Result<()>>),
    /// Snapshot the running machine into the directory; it runs on.
    Snapshot(PathBuf, oneshot::Sender<Result<smol_vmm::SnapshotTimings>>),
    Stop(oneshot::Sender<Result<()>>),
    Delete(oneshot::Sender<Result<()>>),
    /// The forwarded ports listening now (none while stopped).
    Ports(oneshot::Sender<Result<Vec<PortMapping>>>),
}

// The VM moves in and out of blocking tasks.
const _: () = {
    const fn send<T: Send>() {}
    send::<Vm>()
};

pub(crate) struct MachineActor {
    name: String,
    /// The handles' requests and open connections (auto-stop).
    activity: std::sync::Arc<Activity>,
    limits: Limits,
    record: MachineRecord,
    paths: MachinePaths,
    lock: Option<MachineLock>,
    vm: Option<Vm>,
    /// The forwarded ports' listeners, while the VM runs.
    ports: Option<PortRelay>,
    /// The network's passt, while the VM runs (`resources.network`).
    passt: Option<Passt>,
    /// The shares' virtiofsds, while the VM runs (`mounts`).
    shares: Option<Shares>,
    state: MachineState,
    deleted: bool,
    timings: Option<BootTimings>,
}

impl MachineActor {
    pub fn new(
        record: MachineRecord,
        paths: MachinePaths,
        lock: MachineLock,
        state: MachineState,
    ) -> Self {
        MachineActor {
            name: record.name.clone(),
            activity: Activity::new(),
            limits: Limits::new(&record.config, record.created_unix),
            record,
            paths,
            lock: Some(lock),
            vm: None,
            ports: None,
            passt: None,
            shares: None,
            state,
            deleted: false,
            timings: None,
        }
    }

    pub fn config(&self) -> &crate::config::MachineConfig {
        &self.record.config
    }

    /// Takes the activity its handles record.
    pub fn watching(mut self, activity: std::sync::Arc<Activity>) -> Self {
        self.activity = activity;
        self
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let next = match self.deleted {
                true => None,
                false => self.limits.next_check(&self.activity, self.vm.is_some()),
            };
            let cmd = match next {
                Some(at) => tokio::select! {
                    cmd = rx.recv() => cmd,
                    _ = tokio::time::sleep_until(at) => {
                        self.enforce_limits().await;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match cmd {
                Some(cmd) => self.handle(cmd).await,
                None => break,
            }
        }
        self.last_handle_dropped().await;
    }

    /// `ttl_seconds` passed: the machine is deleted (its handles then get
    /// NotFound); idle for `auto_stop_seconds`: it is stopped.
    async fn enforce_limits(&mut self) {
        self.refresh().await;
        let r = match self.limits.due(&self.activity, self.vm.is_some()) {
            Some(Due::Delete) => {
                tracing::info!(machine = %self.name, "ttl_seconds passed: deleting the machine");
                self.delete().await
            }
            Some(Due::Stop) => {
                tracing::info!(machine = %self.name, "idle for auto_stop_seconds: stopping the machine");
                self.stop(true).await
            }
            None => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(machine = %self.name, "enforcing the machine's limits: {e}");
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::State(reply) => {
                let r = if self.deleted {
                    Err(self.not_found())
                } else {
                    self.refresh().await;
                    Ok(self.state)
                };
                let _ = reply.send(r);
            }
            Command::Timings(reply) => {
                let _ = reply.send(self.timings);
            }
            Command::Start(prepare, reply) => {
                let r = self.start(prepare, None).await;
                let _ = reply.send(r);
            }
            Command::Restore(dir, prepare, reply) => {
                let r = self.start(prepare, Some(dir)).await;
                let _ = reply.send(r);
            }
            Command::Snapshot(dir, reply) => {
                let r = self.snapshot(dir).await;
                let _ = reply.send(r);
            }
            Command::Stop(reply) => {
                let r = if self.deleted {
                    Err(self.not_found())
                } else {
                    self.stop(true).await
                };
                let _ = reply.send(r);
            }
            Command::Delete(reply) => {
                let r = self.delete().await;
                let _ = reply.send(r);
            }
            Command::Ports(reply) => {
                let r = if self.deleted {
                    Err(self.not_found())
                } else {
                    self.refresh().await;
                    Ok(self
                        .ports
                        .as_ref()
                        .map(|p| p.mappings().to_vec())
                        .unwrap_or_default())
                };
                let _ = reply.send(r);
            }
        }
    }

    fn not_found(&self) -> Error {
        Error::NotFound {
            name: self.name.clone(),
        }
    }

    /// Notices a VM that ended on its own (guest poweroff, crash) and
    /// releases it.
    async fn refresh(&mut self) {
        if let Some(status) = self.passt.as_mut().and_then(Passt::exited) {
            tracing::warn!(machine = %self.name, "passt ended ({status}): the machine has no network now (see {})", self.paths.passt_log.display());
            self.passt = None;
        }
        for (source, log, status) in self.shares.as_mut().map(Shares::ended).unwrap_or_default() {
            tracing::warn!(machine = %self.name, "the virtiofsd sharing {} ended ({status}): the guest cannot reach that share now (see {})", source.display(), log.display());
        }
        let exited = self.vm.as_ref().and_then(|vm| vm.try_exit());
        if let Some(reason) = exited {
            match &reason {
                ExitReason::Crashed(why) => {
                    tracing::warn!(machine = %self.name, "the vm crashed: {why}")
                }
                other => tracing::info!(machine = %self.name, "the vm exited: {other:?}"),
            }
            if let Err(e) = self.release_vm(false).await {
                tracing::warn!(machine = %self.name, "releasing the vm: {e}");
            }
        }
    }

    /// Boots the machine, or with `snapshot` restores it from that
    /// directory (whose disk the caller copied into place), then waits for
    /// the agent and tells it the machine's own facts.
    async fn start(&mut self, prepare: Duration, snapshot: Option<PathBuf>) -> Result<()> {
        if self.deleted {
            return Err(self.not_found());
        }
        self.refresh().await;
        if self.vm.is_some() {
            return Ok(());
        }
        let begin = Instant::now();
        // Before the boot: a host port in use costs none.
        let mut ports = PortRelay::bind(&self.record.config.ports)?;
        // A restore reads neither the kernel nor the initramfs.
        let assets = match &snapshot {
            None => GuestAssets::locate()?,
            Some(_) => GuestAssets {
                kernel: PathBuf::new(),
                initramfs: PathBuf::new(),
            },
        };
        // A socket left by an earlier boot would make the bind fail; the
        // console log holds this boot only.
        remove_if_exists(&self.paths.vsock)?;
        remove_if_exists(&self.paths.ready)?;
        remove_if_exists(&self.paths.ports)?;
        remove_if_exists(&self.paths.console_log)?;
        let r = &self.record.config.resources;
        let (passt, net) = match r.network {
            false => (None, None),
            true => {
                let allow = match &self.record.config.egress_allow {
                    Some(list) => Some(crate::config::egress_networks(list, true)?),
                    None => None,
                };
                let (passt, fd) = Passt::spawn(&self.paths.passt_log)?;
                // Every machine has the same MAC: each is alone on its
                // link, with a passt of its own.
                let net = smol_vmm::NetConfig {
                    allow,
                    ..smol_vmm::NetConfig::new(fd)
                };
                (Some(passt), Some(net))
            }
        };
        // Listening before the VM is built: the monitor connects to each.
        let (shares, fs) = match self.record.config.mounts.is_empty() {
            true => (None, Vec::new()),
            false => {
                let (shares, devices) =
                    Shares::start(&self.record.config.mounts, &self.paths.dir).await?;
                (Some(shares), devices)
            }
        };
        let config = VmConfig {
            kernel: assets.kernel,
            initramfs: Some(assets.initramfs),
            image_cache: Some(super::assets::image_cache_dir()),
            cmdline: DISK_CMDLINE.to_string(),
            // Validated against smol_vmm::MAX_VCPUS at create.
            vcpus: u8::try_from(r.cpus).unwrap_or(smol_vmm::MAX_VCPUS),
            memory_mib: r.memory_mb,
            console_log: Some(self.paths.console_log.clone()),
            vsock: Some(VsockConfig {
                guest_cid: self.record.guest_cid,
                uds_path: self.paths.vsock.clone(),
            }),
            disks: vec![DiskConfig {
                path: self.paths.disk.clone(),
                read_only: false,
                id: DISK_ID.to_string(),
            }],
            net,
            fs,
        };
        let restoring = snapshot.is_some();
        let name = self.name.clone();
        let vm = tokio::task::spawn_blocking(move || match &snapshot {
            None => Vm::start(config).map_err(|source| Error::Vmm { name, source }),
            Some(dir) => Vm::restore(config, dir).map_err(|e| match e {
                smol_vmm::Error::Snapshot(source) => Error::Snapshot {
                    path: dir.clone(),
                    source,
                },
                source => Error::Vmm { name, source },
            }),
        })
        .await
        .map_err(|e| Error::Internal(format!("vm start task: {e}")))??;
        let vm_setup = begin.elapsed();
        let vmm = vm.timings();
        self.vm = Some(vm);
        self.passt = passt;
        self.shares = shares;
        let ready_from = Instant::now();
        let up = async {
            self.wait_for_agent(boot_timeout(), restoring).await?;
            self.configure_network().await?;
            self.mount_shares().await?;
            self.open_ports(&mut ports)
        }
        .await;
        match up {
            Ok(()) => {
                self.ports = Some(ports);
                self.state = MachineState::Running;
                // For other processes: the guest is up (see `store::observe`).
                if let Err(e) = std::fs::write(&self.paths.ready, b"") {
                    tracing::warn!(machine = %self.name, "marking the machine up for other processes: {e}");
                }
                let agent_ready = ready_from.elapsed();
                self.timings = Some(BootTimings {
                    prepare,
                    vm_setup,
                    agent_ready,
                    total: prepare + begin.elapsed(),
                    vmm,
                    restored: restoring,
                });
                tracing::info!(machine = %self.name, ?agent_ready, restored = restoring, "machine running");
                note_boot(&self.name, restoring, prepare + begin.elapsed());
                Ok(())
            }
            Err(e) => {
                if let Err(stop_err) = self.release_vm(false).await {
                    tracing::warn!(machine = %self.name, "stopping after a failed boot: {stop_err}");
                }
                Err(e)
            }
        }
    }

    /// With a network: has the agent configure it by DHCP from this
    /// start's passt (a restored guest asks its new passt again).
    async fn configure_network(&self) -> Result<()> {
        if !self.record.config.resources.network {
            return Ok(());
        }
        let mut conn =
            AgentConnection::open_with(&self.paths.vsock, &self.name, &Request::ConfigureNetwork)
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?;
        match conn.response_within(None, "configuring the network").await {
            Ok(Response::Network(info)) => {
                tracing::info!(machine = %self.name, address = %info.address, gateway = %info.gateway, dns = ?info.dns, "network configured");
                Ok(())
            }
            Ok(other) => Err(unexpected("configure network", &other)),
            Err(e) => {
                let report = match e {
                    Error::Timeout { .. } => format!("; {}", self.guest_report(NET_REPORT).await),
                    _ => String::new(),
                };
                Err(self.boot_error(format!(
                    "the guest could not configure its network: {e} (passt's log: {}){report}",
                    self.paths.passt_log.display()
                )))
            }
        }
    }

    /// What the guest says about a step that did not answer: `script`'s
    /// output from an exec of its own (bounded in time and size), or why
    /// there is none.
    async fn guest_report(&self, script: &str) -> String {
        let link = SocketLink {
            uds: self.paths.vsock.clone(),
            machine: self.name.clone(),
            images: PathBuf::new(),
        };
        let req = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: Vec::new(),
            workdir: None,
            timeout_ms: Some(REPORT_TIMEOUT.as_millis() as u64),
            stdin: false,
            container: None,
            tty: None,
        };
        let run = crate::agent::exec::exec(&link, req, REPORT_MAX_OUTPUT, None);
        match tokio::time::timeout(REPORT_TIMEOUT * 2, run).await {
            Ok(Ok(r)) => format!(
                "the guest reports:\n{}{}",
                r.stdout_lossy(),
                r.stderr_lossy()
            ),
            Ok(Err(e)) => format!("no report from the guest: {e}"),
            Err(_) => format!("no report from the guest within {:?}", REPORT_TIMEOUT * 2),
        }
    }

    /// With mounts: has the agent mount every share (after each boot and
    /// restore, and after a snapshot). Shares mounted already stay.
    async fn mount_shares(&self) -> Result<()> {
        let mounts = &self.record.config.mounts;
        if mounts.is_empty() {
            return Ok(());
        }
        let req = Request::Mount {
            mounts: share_mounts(mounts),
        };
        self.agent_ok(&req, "mounting the shares").await?;
        tracing::info!(machine = %self.name, shares = mounts.len(), "shares mounted");
        Ok(())
    }

    /// With mounts: has the agent unmount every share, before a snapshot
    /// (the guest's FUSE state belongs to this start's virtiofsds). A
    /// guest process using a share makes it fail (`GuestErrorKind::InUse`).
    async fn unmount_shares(&self) -> Result<()> {
        let mounts = &self.record.config.mounts;
        if mounts.is_empty() {
            return Ok(());
        }
        let req = Request::Unmount {
            targets: mounts.iter().map(|m| m.target.clone()).collect(),
        };
        self.agent_ok(&req, "unmounting the shares").await
    }

    /// Sends `req` on a connection of its own; the agent answers `Ok`.
    async fn agent_ok(&self, req: &Request, step: &str) -> Result<()> {
        let mut conn = AgentConnection::open_with(&self.paths.vsock, &self.name, req)
            .await
            .map_err(|e| Error::Protocol(e.to_string()))?;
        match conn.response_within(None, step).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(step, &other)),
        }
    }

    /// Starts relaying the bound ports to the guest, and tells other
    /// processes where they listen.
    fn open_ports(&self, ports: &mut PortRelay) -> Result<()> {
        if self.record.config.ports.is_empty() {
            return Ok(());
        }
        ports.serve(Target {
            uds: self.paths.vsock.clone(),
            machine: self.name.clone(),
            activity: self.activity.clone(),
        })?;
        let json = serde_json::to_vec(ports.mappings())
            .map_err(|e| Error::Internal(format!("port mappings: {e}")))?;
        std::fs::write(&self.paths.ports, json)
            .map_err(|e| Error::io(format!("writing {}", self.paths.ports.display()), e))?;
        tracing::info!(machine = %self.name, ports = ?ports.mappings(), "forwarding ports");
        Ok(())
    }

    /// What makes this machine itself after a boot or a restore, sent
    /// with the first Hello: fresh entropy (a restored pool is every
    /// clone's), the host's clock (a restored clock is the snapshot's), its
    /// name as hostname.
    fn facts(&self) -> MachineFacts {
        MachineFacts {
            entropy: rand::random::<[u8; 64]>().to_vec(),
            unix_time_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1),
            hostname: self.name.clone(),
        }
    }

    /// Snapshots the running VM into `dir` (the monitor's part: memory,
    /// vCPU and device state, the disk). The shares are unmounted for it
    /// and mounted again after: a snapshot holds no FUSE state, which a
    /// restore (with new virtiofsds) could not use.
    async fn snapshot(&mut self, dir: PathBuf) -> Result<smol_vmm::SnapshotTimings> {
        if self.deleted {
            return Err(self.not_found());
        }
        self.refresh().await;
        if self.vm.is_none() {
            return Err(Error::NotRunning {
                name: self.name.clone(),
                state: self.state,
            });
        }
        if let Err(e) = self.unmount_shares().await {
            // Those unmounted already come back: the machine runs on as it was.
            if let Err(again) = self.mount_shares().await {
                tracing::warn!(machine = %self.name, "mounting the shares again after a failed unmount: {again}");
            }
            return Err(e);
        }
        let Some(vm) = self.vm.take() else {
            return Err(Error::Internal("the vm went away during a snapshot".into()));
        };
        let (vm, r) = tokio::task::spawn_blocking(move || {
            let r = vm.snapshot(&dir).map_err(|e| match e {
                smol_vmm::Error::Snapshot(source) => Error::Snapshot { path: dir, source },
                other => Error::Internal(format!("snapshot: {other}")),
            });
            (vm, r)
        })
        .await
        .map_err(|e| Error::Internal(format!("vm snapshot task: {e}")))?;
        self.vm = Some(vm);
        match (r, self.mount_shares().await) {
            (r, Ok(())) => r,
            (Ok(_), Err(e)) => {
                tracing::warn!(machine = %self.name, "the snapshot was taken, but the shares could not be mounted again: {e}");
                Err(e)
            }
            (Err(e), Err(m)) => {
                tracing::warn!(machine = %self.name, "mounting the shares again after a failed snapshot: {m}");
                Err(e)
            }
        }
    }

    /// Waits until the agent answers a Hello, the VM exits, or the deadline
    /// passes. The console is watched for the agent's ready line (a host
    /// file read, free for the guest); until it shows, Hello is tried only
    /// every [`SLOW_ATTEMPT_EVERY`] (each refused connection costs a guest
    /// that emulates its kernel real time), after it with a short backoff.
    /// No fixed sleeps.
    /// A restored agent printed its ready line before the snapshot: it is
    /// tried at once (`restored`).
    async fn wait_for_agent(&mut self, timeout: Duration, restored: bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(2);
        let mut last = String::from("no attempt made");
        let mut console = ConsoleWatch::new(self.paths.console_log.clone(), READY_LINE);
        console.seen |= restored;
        let mut next_attempt = Instant::now();
        loop {
            if let Some(reason) = self.vm.as_ref().and_then(|vm| vm.try_exit()) {
                return Err(self.boot_error(format!(
                    "the vm exited before its agent answered ({reason:?})"
                )));
            }
            let ready = console.seen();
            let now = Instant::now();
            if now >= deadline {
                let what = if ready {
                    "the agent printed its ready line but did not answer on vsock"
                } else {
                    "the agent did not print its ready line"
                };
                return Err(
                    self.boot_error(format!("{what} within {timeout:?} (last attempt: {last})"))
                );
            }
            if ready || now >= next_attempt {
                next_attempt = now + SLOW_ATTEMPT_EVERY;
                let uds = self.paths.vsock.clone();
                let name = self.name.clone();
                let facts = self.facts();
                let attempt = async move { AgentConnection::hello(&uds, &name, Some(facts)).await };
                match tokio::time::timeout(ATTEMPT_TIMEOUT.min(deadline - now), attempt).await {
                    Ok(Ok((version, agent))) if version == PROTOCOL_VERSION => {
                        tracing::debug!(machine = %self.name, %agent, "agent answered");
                        return Ok(());
                    }
                    Ok(Ok((version, _))) => {
                        return Err(Error::Protocol(format!(
                            "the agent speaks protocol version {version}, this smol speaks {PROTOCOL_VERSION}"
                        )))
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => last = format!("no answer within {ATTEMPT_TIMEOUT:?}"),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn boot_error(&self, reason: String) -> Error {
        // Where the guest is stuck, in the log (at info), for diagnosis.
        if let Some(vm) = &self.vm {
            vm.log_vcpu_state();
            std::thread::sleep(Duration::from_millis(50));
        }
        Error::Boot {
            name: self.name.clone(),
            reason,
            console_tail: console_tail(&self.paths.console_log, CONSOLE_TAIL_LINES),
        }
    }

    /// Asks the agent for a clean poweroff, waits for it, then (or if that
    /// fails) stops the VM from the host.
    async fn stop(&mut self, graceful: bool) -> Result<()> {
        self.refresh().await;
        if self.vm.is_none() {
            if self.state != MachineState::Created {
                self.state = MachineState::Stopped;
            }
            return Ok(());
        }
        self.release_vm(graceful).await
    }

    async fn release_vm(&mut self, graceful: bool) -> Result<()> {
        let Some(mut vm) = self.vm.take() else {
            return Ok(());
        };
        self.state = MachineState::Stopped;
        // The listeners close first: nothing new reaches a stopping guest.
        self.ports = None;
        remove_if_exists(&self.paths.ready)?;
        remove_if_exists(&self.paths.ports)?;
        if graceful && vm.try_exit().is_none() {
            match tokio::time::timeout(SHUTDOWN_ASK_TIMEOUT, self.ask_shutdown()).await {
                Ok(Ok(())) => {
                    let (back, exited) = tokio::task::spawn_blocking(move || {
                        let r = vm.wait(Some(POWEROFF_TIMEOUT));
                        (vm, r)
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("vm wait task: {e}")))?;
                    vm = back;
                    if exited.is_none() {
                        tracing::warn!(machine = %self.name, "the guest did not power off within {POWEROFF_TIMEOUT:?}; stopping it");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(machine = %self.name, "asking the agent to shut down: {e}; stopping the vm")
                }
                Err(_) => {
                    tracing::warn!(machine = %self.name, "the agent did not acknowledge shutdown; stopping the vm")
                }
            }
        }
        let reason = tokio::task::spawn_blocking(move || {
            let r = vm.stop();
            drop(vm);
            r
        })
        .await
        .map_err(|e| Error::Internal(format!("vm stop task: {e}")))?;
        // The monitor's ends of their sockets are closed: passt and the
        // virtiofsds end anyway.
        self.passt = None;
        self.shares = None;
        tracing::debug!(machine = %self.name, ?reason, "vm stopped");
        remove_if_exists(&self.paths.vsock)?;
        Ok(())
    }

    async fn ask_shutdown(&self) -> Result<()> {
        let mut conn =
            AgentConnection::open_with(&self.paths.vsock, &self.name, &Request::Shutdown)
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?;
        match conn.response(None).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected("shutdown", &other)),
        }
    }

    async fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        // The disk goes away: no need for a clean guest shutdown.
        self.release_vm(false).await?;
        match std::fs::remove_dir_all(&self.paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("removing {}", self.paths.dir.display()),
                    e,
                ))
            }
        }
        self.lock = None;
        self.deleted = true;
        self.state = MachineState::Stopped;
        tracing::info!(machine = %self.name, "machine deleted");
        Ok(())
    }

    /// No handle is left: a persistent machine is shut down cleanly and
    /// kept, any other is stopped and deleted.
    async fn last_handle_dropped(&mut self) {
        if self.deleted {
            return;
        }
        let r = if self.record.config.persistent {
            self.stop(true).await
        } else {
            self.delete().await
        };
        if let Err(e) = r {
            tracing::warn!(machine = %self.name, "cleaning up after the last handle: {e}");
        }
    }
}

impl Drop for MachineActor {
    /// Runs when the task ends or is cancelled (runtime shut down): the VM
    /// never outlives the actor, and a non-persistent machine leaves nothing.
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
        }
        self.passt = None;
        self.shares = None;
        if !self.deleted && !self.record.config.persistent {
            let _ = std::fs::remove_dir_all(&self.paths.dir);
        } else {
            let _ = std::fs::remove_file(&self.paths.ready);
            let _ = std::fs::remove_file(&self.paths.ports);
            let _ = std::fs::remove_file(&self.paths.vsock);
        }
    }
}

/// With `SMOL_BOOT_LOG` set, appends a line per machine start to that
/// file: `cold|restored <name> <ms>` (the test suite counts its boots).
fn note_boot(name: &str, restored: bool, took: Duration) {
    use std::io::Write;
    let Some(path) = std::env::var_os("SMOL_BOOT_LOG").filter(|p| !p.is_empty()) else {
        return;
    };
    let line = format!(
        "{} {name} {}\n",
        if restored { "restored" } else { "cold" },
        took.as_millis()
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::debug!("SMOL_BOOT_LOG {}: {e}", path.to_string_lossy());
    }
}

fn remove_if_exists(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// `SMOL_BOOT_TIMEOUT_SECS`, else 300 s on kvm_pvm hosts (boots take ~60 s
/// there, more under load) and 30 s elsewhere.
pub(crate) fn boot_timeout() -> Duration {
    if let Some(secs) = std::env::var("SMOL_BOOT_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        return Duration::from_secs(secs.max(1));
    }
    if smol_vmm::is_kvm_pvm_host() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    }
}

/// Watches a growing console log for a line, reading only what is new.
struct ConsoleWatch {
    path: std::path::PathBuf,
    needle: &'static str,
    offset: u64,
    /// The end of what was read, so a needle split across reads is found.
    carry: Vec<u8>,
    seen: bool,
}

impl ConsoleWatch {
    fn new(path: std::path::PathBuf, needle: &'static str) -> Self {
        ConsoleWatch {
            path,
            needle,
            offset: 0,
            carry: Vec::new(),
            seen: false,
        }
    }

    /// Whether the needle has appeared so far.
    fn seen(&mut self) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        if self.seen {
            return true;
        }
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return false;
        };
        // The monitor empties a log that reached its size limit.
        if f.metadata().is_ok_and(|m| m.len() < self.offset) {
            self.offset = 0;
            self.carry.clear();
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = std::mem::take(&mut self.carry);
        let Ok(n) = f.take(1 << 20).read_to_end(&mut buf) else {
            return false;
        };
        self.offset += n as u64;
        let needle = self.needle.as_bytes();
        self.seen = buf.windows(needle.len()).any(|w| w == needle);
        let keep = needle.len().saturating_sub(1).min(buf.len());
        self.carry = buf[buf.len() - keep..].to_vec();
        self.seen
    }
}

/// The last `lines` lines of the console log, safe to print.
pub(crate) fn console_tail(path: &std::path::Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX: u64 = 16 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("(no console log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.trim().is_empty() {
        return "(the console log is empty)".into();
    }
    sanitize(&tail.replace('\r', ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent of another protocol version is a final error at once,
    /// naming both versions, not retried until the boot deadline.
    #[tokio::test]
    async fn a_protocol_mismatch_fails_at_once() {
        use smol_protocol::{asyncio, Frame, FrameKind};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let t = tempfile::tempdir().unwrap();
        let store = crate::backend::local::store::MachineStore::open(Some(t.path())).unwrap();
        let (record, paths, lock) = store
            .reserve(&crate::config::MachineConfig::default().name("old"))
            .unwrap();
        let listener = tokio::net::UnixListener::bind(&paths.vsock).unwrap();
        let answers = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = answers.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut s = tokio::io::BufReader::new(s);
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                s.get_mut().write_all(b"OK 1024\n").await.unwrap();
                let _hello = asyncio::read_frame(&mut s).await.unwrap().unwrap();
                let old = Response::Hello {
                    version: 999,
                    agent: "smol-agent 0.0.1".into(),
                };
                let f = Frame::json(FrameKind::Response, &old);
                asyncio::write_frame(s.get_mut(), f.kind, &f.payload)
                    .await
                    .unwrap();
            }
        });
        let mut actor = MachineActor::new(record, paths, lock, MachineState::Created);
        let begin = std::time::Instant::now();
        let e = actor
            .wait_for_agent(Duration::from_secs(60), true)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("999") && text.contains(&PROTOCOL_VERSION.to_string()),
            "{text}"
        );
        assert!(
            begin.elapsed() < Duration::from_secs(5),
            "{:?}",
            begin.elapsed()
        );
        assert_eq!(answers.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn console_watch_finds_a_line_written_in_pieces() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        let mut w = ConsoleWatch::new(p.clone(), READY_LINE);
        assert!(!w.seen(), "no file yet");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"[ 1.0] booting\nsmol-ag").unwrap();
        assert!(!w.seen());
        f.write_all(b"ent: rea").unwrap();
        assert!(!w.seen());
        f.write_all(b"dy\n").unwrap();
        assert!(w.seen());
        // A log that started over is read from its start.
        let mut w = ConsoleWatch::new(p.clone(), READY_LINE);
        assert!(w.seen(), "read once");
        let mut w2 = ConsoleWatch::new(p.clone(), "after the restart");
        assert!(!w2.seen());
        std::fs::write(&p, b"after the restart\n").unwrap();
        assert!(w2.seen(), "the shorter file was read from 0");
        assert!(w.seen(), "stays seen");
    }

    #[test]
    fn console_tail_is_the_end_and_safe() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("line {i}\r\n"));
        }
        text.push_str("bad \x1b[0m byte\n");
        std::fs::write(&p, text).unwrap();
        let tail = console_tail(&p, 3);
        assert_eq!(tail, "line 98\nline 99\nbad \u{fffd}[0m byte");
        assert!(console_tail(&t.path().join("none"), 3).contains("no console log"));
        std::fs::write(&p, "").unwrap();
        assert!(console_tail(&p, 3).contains("empty"));
    }
}
