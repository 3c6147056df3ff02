//! [`Machine`]: the cloneable handle users hold. It checks what the user
//! passed, then hands the call to the machine's engine (a [`Backend`]):
//! today the local one, which runs the machine in this process.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::backend::local::LocalMachine;
use crate::backend::Backend;
use crate::config::{ConnectOptions, MachineConfig};
use crate::error::Result;
use crate::exec::{ExecOptions, ExecResult, ExecStream};
use crate::files::{check_mode, check_path, FileStream};
use crate::image::{ImageInfo, PullEvent};
use crate::state::{BootTimings, MachineInfo, MachineState, PortMapping};

/// A handle to a microVM. Clone it freely (all clones drive the same
/// machine); it is `Send + Sync`. When the last clone (and the last stream
/// made from it) is dropped, a non-persistent machine is stopped and deleted,
/// a persistent one is shut down and kept.
///
/// ```no_run
/// # async fn demo() -> smol::Result<()> {
/// use smol::{Machine, MachineConfig};
/// let m = Machine::create(MachineConfig::default()).await?;
/// let r = m.exec(["uname", "-a"]).await?;
/// println!("{}", r.stdout_lossy());
/// m.delete().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Machine {
    backend: Arc<dyn Backend>,
}

impl Machine {
    fn from_backend(backend: impl Backend) -> Machine {
        Machine {
            backend: Arc::new(backend),
        }
    }

    /// Creates and boots a machine with the default engine (local, or the
    /// cloud when `SMOL_CLOUD_TOKEN` is set). Returns once the guest agent
    /// answers.
    pub async fn create(config: MachineConfig) -> Result<Machine> {
        Machine::create_with(config, ConnectOptions::from_env()).await
    }

    /// After the first machine of a shape (resources and guest assets) on
    /// this host, `create` restores that machine's booted snapshot instead
    /// of booting: see [`MachineConfig::cold_boot`] to always boot.
    pub async fn create_with(config: MachineConfig, options: ConnectOptions) -> Result<Machine> {
        config.validate()?;
        if let Some(client) = options.remote_client()? {
            return client.create(config).await.map(Machine::from_backend);
        }
        LocalMachine::create(config, options.home)
            .await
            .map(Machine::from_backend)
    }

    /// A new machine from the snapshot in `dir`, running where the snapshot
    /// stopped. Its name, persistence and forkability come from `config`;
    /// resources and image from the snapshot, and so do its ports and
    /// mounts unless `config` names its own (as many mounts as the
    /// snapshot's: they are devices). One snapshot can be restored any
    /// number of times; it is never changed.
    pub async fn restore(dir: impl AsRef<Path>, config: MachineConfig) -> Result<Machine> {
        Machine::restore_with(dir, config, ConnectOptions::from_env()).await
    }

    pub async fn restore_with(
        dir: impl AsRef<Path>,
        config: MachineConfig,
        options: ConnectOptions,
    ) -> Result<Machine> {
        options.require_local("restore from a snapshot directory")?;
        config.validate()?;
        LocalMachine::restore(dir.as_ref(), config, options.home)
            .await
            .map(Machine::from_backend)
    }

    /// Re-opens a persistent machine from the store (it is not booted:
    /// call [`Machine::start`]). A machine already open in this process
    /// yields another handle to it. A machine another live process runs
    /// is driven through its running guest: exec, streams, files, images
    /// and state work as in the owner; its lifecycle stays the owner's
    /// (stop, delete, snapshot and fork are [`Error::InUse`] naming the
    /// owner's pid), and once the owner lets go a new `connect` takes it
    /// over.
    pub async fn connect(name: &str) -> Result<Machine> {
        Machine::connect_with(name, ConnectOptions::from_env()).await
    }

    pub async fn connect_with(name: &str, options: ConnectOptions) -> Result<Machine> {
        crate::config::validate_name(name)?;
        if let Some(client) = options.remote_client()? {
            return client.connect(name).await.map(Machine::from_backend);
        }
        let backend = LocalMachine::connect(name, options.home).await?;
        Ok(Machine { backend })
    }

    /// The machines of the default engine: in the local store (also those
    /// other processes run, with their pid), or the key's on the cloud.
    /// A non-persistent machine whose process ended is removed; a record
    /// that cannot be read is left out, never removed.
    pub async fn list() -> Result<Vec<MachineInfo>> {
        Machine::list_with(ConnectOptions::from_env()).await
    }

    pub async fn list_with(options: ConnectOptions) -> Result<Vec<MachineInfo>> {
        if let Some(client) = options.remote_client()? {
            return client.list().await;
        }
        LocalMachine::list(options.home).await
    }

    /// Saves the running machine into `dir` (created if missing; it must be
    /// empty): memory, vCPU and device state, its disk, its config. The
    /// machine runs on. See [`Machine::restore`].
    pub async fn snapshot(&self, dir: impl AsRef<Path>) -> Result<crate::SnapshotTimings> {
        self.backend.snapshot(dir.as_ref()).await
    }

    /// A live clone of this running machine, named `name`: the same
    /// processes, memory and disk at this instant, independent afterwards
    /// (neither sees the other's later writes), with fresh entropy, the
    /// host's clock and its own hostname. Its vsock connections open at the
    /// fork are reset in the clone; this machine's carry on. Needs a machine
    /// created with [`MachineConfig::forkable`].
    pub async fn fork(&self, name: &str) -> Result<Machine> {
        crate::config::validate_name(name)?;
        let backend = self.backend.fork(name).await?;
        Ok(Machine { backend })
    }

    /// The machine's name; on the remote engine, the id that
    /// [`Machine::connect`] accepts.
    pub fn name(&self) -> &str {
        self.backend.name()
    }

    /// The machine's config, as its engine completed it (its name, the
    /// resources of a restored snapshot).
    pub fn config(&self) -> &MachineConfig {
        self.backend.config()
    }

    /// The machine's directory in the store (record, disk, socket, log),
    /// when the machine runs on this host.
    pub fn dir(&self) -> Option<&Path> {
        self.backend.dir()
    }

    /// The guest's serial console of the current (or last) boot, when the
    /// machine runs on this host.
    pub fn console_log_path(&self) -> Option<&Path> {
        self.backend.console_log_path()
    }

    pub async fn state(&self) -> Result<MachineState> {
        self.backend.state().await
    }

    /// Phases of the last `create` or `start`, once it has booted.
    pub async fn boot_timings(&self) -> Result<Option<BootTimings>> {
        self.backend.boot_timings().await
    }

    /// Boots a stopped machine again (same disk). Running: no-op.
    pub async fn start(&self) -> Result<()> {
        self.backend.start().await
    }

    /// Asks the guest to power off cleanly, waits for it, and stops the VM
    /// from the host if it does not. Stopped: no-op.
    pub async fn stop(&self) -> Result<()> {
        self.backend.stop().await
    }

    /// Stops the machine and removes everything of it (directory, disk,
    /// socket, record), persistent or not. Other handles then get
    /// [`Error::NotFound`](crate::Error::NotFound).
    pub async fn delete(&self) -> Result<()> {
        self.backend.delete().await
    }

    /// The host ports that relay to guest ports now
    /// ([`MachineConfig::ports`]), with the port picked for each `host: 0`;
    /// empty while the machine is stopped. A clone made by
    /// [`fork`](Machine::fork) relays the same guest ports from free host
    /// ports of its own.
    ///
    /// ```no_run
    /// # async fn f() -> smol::Result<()> {
    /// use smol::{Machine, MachineConfig, PortSpec};
    /// let m = Machine::create(MachineConfig { ports: vec![PortSpec::new(0, 80)], ..Default::default() }).await?;
    /// let web = m.ports().await?[0].host_addr(); // 127.0.0.1:<free port> to guest port 80
    /// # Ok(()) }
    /// ```
    pub async fn ports(&self) -> Result<Vec<PortMapping>> {
        self.backend.ports().await
    }

    /// Where the machine's first forwarded port is reached: on the remote
    /// engine `http://<server host>:<port>/`, the server listening for it
    /// on its own address; `None` on the local engine, whose listeners
    /// [`ports`](Machine::ports) lists, and for a machine without ports.
    pub async fn url(&self) -> Result<Option<String>> {
        self.backend.url().await
    }

    /// Runs `argv` (no shell) and collects its output.
    pub async fn exec<I, S>(&self, argv: I) -> Result<ExecResult>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.exec_with(argv, ExecOptions::default()).await
    }

    /// [`Machine::exec`] with a timeout, environment and working directory.
    /// A timeout gives `Ok` with `timed_out` set (see [`crate::exec`]).
    pub async fn exec_with<I, S>(&self, argv: I, options: ExecOptions) -> Result<ExecResult>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let req = options.request(argv)?;
        let limit = options.output_limit();
        let input = options.take_input()?;
        self.backend.exec(req, limit, input).await
    }

    /// Runs `argv` and streams its output as it is produced.
    pub async fn exec_stream<I, S>(&self, argv: I) -> Result<ExecStream>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.exec_stream_with(argv, ExecOptions::default()).await
    }

    pub async fn exec_stream_with<I, S>(&self, argv: I, options: ExecOptions) -> Result<ExecStream>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let req = options.request(argv)?;
        let input = options.take_input()?;
        self.backend.exec_stream(req, input).await
    }

    /// Starts `argv` as a [`Process`](crate::Process): its output as a
    /// stream of events, its stdin open for
    /// [`write_stdin`](crate::Process::write_stdin) until closed (unless
    /// `options.stdin` or `options.stdin_reader` gives all of it, which is
    /// then fed and closed). The process is also an `AsyncWrite` onto that
    /// stdin (`tokio::io::copy` into it; shutdown closes it).
    /// Dropping the process kills the command. Local engine only for now:
    /// the remote one answers [`Error::Unsupported`](crate::Error).
    ///
    /// ```no_run
    /// # async fn f(m: smol::Machine) -> smol::Result<()> {
    /// use futures::StreamExt;
    /// let mut p = m.spawn(["cat"], smol::ExecOptions::default()).await?;
    /// p.write_stdin(b"hello\n").await?;
    /// let echoed = p.next().await;            // Some(Ok(Stdout("hello\n")))
    /// let code = p.wait().await?;             // closes stdin: cat exits 0
    /// # Ok(()) }
    /// ```
    pub async fn spawn<I, S>(&self, argv: I, options: ExecOptions) -> Result<crate::Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let req = options.request(argv)?;
        let input = options.take_input()?;
        self.backend.spawn(req, input).await
    }

    /// Writes `data` to `path` in the guest, atomically, with `mode` (else
    /// 0644, the agent's default).
    pub async fn write_file(
        &self,
        path: impl AsRef<str>,
        data: impl Into<Bytes>,
        mode: Option<u32>,
    ) -> Result<()> {
        let data: Bytes = data.into();
        self.write_file_from(path, &data[..], mode)
            .await
            .map(|_| ())
    }

    /// Streams `src` into `path` in the guest, one chunk at a time (bounded
    /// memory whatever the size); returns the bytes written.
    pub async fn write_file_from<R>(
        &self,
        path: impl AsRef<str>,
        src: R,
        mode: Option<u32>,
    ) -> Result<u64>
    where
        R: AsyncRead + Unpin + Send,
    {
        let path = path.as_ref();
        check_path(path)?;
        check_mode(mode)?;
        self.backend.write_file(path, mode, Box::new(src)).await
    }

    /// Reads the whole file at `path` in the guest.
    pub async fn read_file(&self, path: impl AsRef<str>) -> Result<Bytes> {
        let path = path.as_ref();
        check_path(path)?;
        self.backend.read_file(path).await
    }

    /// Reads `path` as a stream of chunks (or an `AsyncRead` with
    /// [`FileStream::into_reader`]); a missing file fails here.
    pub async fn read_file_stream(&self, path: impl AsRef<str>) -> Result<FileStream> {
        let path = path.as_ref();
        check_path(path)?;
        self.backend.read_file_stream(path).await
    }

    /// Pulls `reference` (a registry reference, `oci-layout:<dir>[:<tag>]`,
    /// `docker-archive:<file>[:<tag>]`, or a path to either) into the host's
    /// blob cache when needed, sends the layers this machine lacks, and
    /// records the image in the machine.
    pub async fn pull_image(&self, reference: &str) -> Result<ImageInfo> {
        self.backend.pull_image(reference, None).await
    }

    /// [`Machine::pull_image`], calling `progress` with each [`PullEvent`]
    /// as it happens: the image resolved, layer bytes and layers into the
    /// host's cache, then layers sent to the machine. It is called from the
    /// pulling tasks, so it should return quickly (update a progress bar,
    /// send on a channel).
    ///
    /// [`Machine::run`] pulls an image the machine lacks without progress:
    /// pull it with this first to show it.
    ///
    /// ```no_run
    /// # async fn demo(m: smol::Machine) -> smol::Result<()> {
    /// use smol::PullEvent;
    /// m.pull_image_with_progress("alpine:3.20", |ev: &PullEvent| {
    ///     if let PullEvent::LayerDone { index, size, .. } = ev {
    ///         eprintln!("layer {} ready ({size} bytes)", index + 1);
    ///     }
    /// })
    /// .await?;
    /// let r = m.run("alpine:3.20", ["echo", "hi"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn pull_image_with_progress(
        &self,
        reference: &str,
        progress: impl Fn(&PullEvent) + Send + Sync + 'static,
    ) -> Result<ImageInfo> {
        self.backend
            .pull_image(reference, Some(Arc::new(progress)))
            .await
    }

    /// The images in this machine's storage.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        self.backend.list_images().await
    }

    /// Runs `argv` in a container of `image` (pulled first if the machine
    /// does not have it). The image's Entrypoint is prefixed; an empty
    /// `argv` runs its Cmd.
    pub async fn run<I, S>(&self, image: &str, argv: I) -> Result<ExecResult>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.run_with(image, argv, ExecOptions::default()).await
    }

    /// [`Machine::run`] with options: `env` is added to the image's Env,
    /// `workdir` replaces its WorkingDir; timeouts behave as for `exec`.
    pub async fn run_with<I, S>(
        &self,
        image: &str,
        argv: I,
        options: ExecOptions,
    ) -> Result<ExecResult>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.backend.run(image, strings(argv), options).await
    }

    /// [`Machine::run`] streaming its output, as [`Machine::exec_stream`].
    pub async fn run_stream<I, S>(&self, image: &str, argv: I) -> Result<ExecStream>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.run_stream_with(image, argv, ExecOptions::default())
            .await
    }

    pub async fn run_stream_with<I, S>(
        &self,
        image: &str,
        argv: I,
        options: ExecOptions,
    ) -> Result<ExecStream>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.backend.run_stream(image, strings(argv), options).await
    }
}

fn strings<I, S>(argv: I) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    argv.into_iter().map(|a| a.as_ref().to_string()).collect()
}

impl fmt::Debug for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.name())
            .field("dir", &self.dir())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn handle_is_send_sync_clone() {
        assert_send_sync::<Machine>();
        fn stream_is_send<T: Send>() {}
        stream_is_send::<ExecStream>();
        stream_is_send::<FileStream>();
    }

    #[tokio::test]
    async fn cloud_needs_an_endpoint_and_a_server() {
        let e = Machine::create_with(
            MachineConfig::default(),
            ConnectOptions::cloud("k").endpoint(""),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    what: "endpoint",
                    ..
                }
            ),
            "{e}"
        );
        // Nothing listens there: a named error, quickly, with no key in it.
        let opts = ConnectOptions::cloud("smk_secret").endpoint("http://127.0.0.1:9");
        let e = Machine::connect_with("x", opts.clone()).await.unwrap_err();
        assert!(
            matches!(&e, Error::Remote { code, .. } if code == "unreachable"),
            "{e}"
        );
        assert!(!e.to_string().contains("smk_secret"), "{e}");
        assert!(!format!("{opts:?}").contains("smk_secret"));
        let e = Machine::restore_with("/nonexistent", MachineConfig::default(), opts)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
    }

    #[tokio::test]
    async fn connect_unknown_machine() {
        let t = tempfile::tempdir().unwrap();
        let e = Machine::connect_with("ghost", ConnectOptions::local().home(t.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::NotFound { name } if name == "ghost"),
            "{e}"
        );
        let e = Machine::connect_with("Bad Name", ConnectOptions::local().home(t.path()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidConfig { field: "name", .. }),
            "{e}"
        );
    }

    #[tokio::test]
    async fn invalid_config_creates_nothing() {
        let t = tempfile::tempdir().unwrap();
        let e = Machine::create_with(
            MachineConfig::default().cpus(0),
            ConnectOptions::local().home(t.path()),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    field: "resources.cpus",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
