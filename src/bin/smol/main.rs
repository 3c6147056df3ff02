//! `smol`: pull OCI images and run commands in throwaway microVMs from the
//! shell. Built with the `cli` feature:
//!
//! ```sh
//! smol pull alpine:3.20                      # into the host's blob cache
//! smol run alpine:3.20 -- cat /etc/os-release
//! smol exec -- uname -a                      # in the bare guest
//! smol snapshot ./tpl -- sh -c 'echo ready > /root/state'   # a template
//! smol restore ./tpl -- cat /root/state      # a machine from it, in ~0.3 s
//! smol create dev --persistent               # a machine that runs in the background
//! smol exec dev -- ls /root                  # in it (or in any store machine)
//! smol stop dev; smol start dev; smol rm dev
//! smol ls                                    # the machines of the store
//! smol key create alice                      # an API key of `smol serve`
//! smol serve --listen 127.0.0.1:7100         # the HTTP API (smol::api)
//! ```
//!
//! `run` and `exec` create a machine, use it and delete it (also on
//! Ctrl-C). Their exit code is the command's; smol's own failures exit 125
//! (as `docker run` does), an interrupt 130. `RUST_LOG=smol=info` shows
//! what smol does.

mod owner;
mod progress;
mod shell;

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use indicatif::HumanBytes;
use smol::image::{ImageResolver, ProgressFn};
use smol::{ExecEvent, ExecOptions, ExecStream, Machine, MachineConfig, MachineState};

use owner::{Ended, Want};
use progress::{layers_text, spinner, PullBar};

/// Exit code of a failure of smol itself.
const EXIT_FAILURE: u8 = 125;
/// Exit code after Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser, Debug)]
#[command(
    name = "smol",
    version,
    about = "Boot Linux microVMs and run commands and OCI images in them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, PartialEq)]
enum Command {
    /// Pull an image into the host's blob cache (shared by every machine).
    Pull {
        /// A registry reference (`alpine:3.20`, `127.0.0.1:5000/app@sha256:…`),
        /// `oci-layout:DIR[:TAG]`, `docker-archive:FILE[:TAG]`, or a path to either.
        image: String,
    },
    /// Run a command in a container of IMAGE, in a temporary machine.
    Run {
        #[command(flatten)]
        options: RunOptions,
        /// The image, as for `smol pull`.
        image: String,
        /// The command and its arguments (after `--`); the image's
        /// Entrypoint is prefixed, and none runs its Cmd.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Run a command in the store's machine NAME (see `smol ls`), or
    /// without NAME in a temporary machine (no image: the guest's busybox).
    /// Another process may be running NAME; a stopped one is started for
    /// the command and stopped after it.
    Exec {
        #[command(flatten)]
        options: RunOptions,
        /// The machine (no resources may be given then: it has its own).
        #[arg(conflicts_with_all = ["cpus", "memory", "disk", "ports", "network"])]
        name: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(required = true, last = true)]
        argv: Vec<String>,
    },
    /// An interactive shell in machine NAME, as `docker exec -it` gives:
    /// on a terminal of this one's size, every key to the guest (Ctrl-C
    /// interrupts the program there), the shell's exit code as smol's.
    Shell {
        name: String,
        /// The program instead of `sh` (after `--`).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Create a machine that runs in the background until `smol stop`: a
    /// detached `smol __own NAME` process owns it. Without --persistent it
    /// is deleted when it stops.
    Create {
        /// Its name (else one is generated).
        name: Option<String>,
        /// Kept, disk and all, when it stops (`smol start` boots it again).
        #[arg(long)]
        persistent: bool,
        /// It may be forked (`smol fork`).
        #[arg(long)]
        forkable: bool,
        #[command(flatten)]
        resources: Resources,
    },
    /// Start the store's stopped machine NAME in the background (as
    /// `create` does); nothing to do when a process runs it already.
    Start { name: String },
    /// The background owner of a machine (see `smol create`).
    #[command(name = owner::OWN_COMMAND, hide = true)]
    Own(OwnArgs),
    /// Snapshot the store's machine NAME, which runs in the background,
    /// into DIR (created; must be empty); it runs on. Without NAME:
    /// snapshot a temporary machine after an optional set-up command, which
    /// must succeed.
    Snapshot {
        #[command(flatten)]
        options: RunOptions,
        /// NAME DIR, or DIR alone.
        #[arg(num_args = 1..=2, required = true, value_name = "NAME] [DIR")]
        targets: Vec<String>,
        /// The set-up command of a temporary machine (after `--`).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Restore the snapshot DIR (as written by `smol snapshot` or
    /// `Machine::snapshot`; DIR is not changed) into a machine that goes on
    /// where the snapshot stopped: one that runs in the background (as
    /// `smol create` makes), or with a command, a temporary one that runs
    /// it.
    Restore {
        /// The machine's name (else one is generated).
        #[arg(long)]
        name: Option<String>,
        /// Keep it, disk and all, when it stops (background machines only).
        #[arg(long, conflicts_with = "argv")]
        persistent: bool,
        dir: std::path::PathBuf,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Fork the store's forkable machine NAME, which runs in the background
    /// (`smol create --forkable`), into a running clone named CLONE, owned
    /// by the same background process.
    Fork { name: String, clone: String },
    /// Serve the local engine's HTTP API (`smol::api`) until SIGTERM or
    /// Ctrl-C; clients use `ConnectOptions::cloud(KEY)`.
    Serve {
        /// Address to listen on (port 0: any free port; the address is
        /// printed on stdout).
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: std::net::SocketAddr,
    },
    /// List the machines of the store (or of the cloud with
    /// SMOL_CLOUD_TOKEN): name, state, persistence, owner process.
    Ls,
    /// Stop the store's machine NAME (its background owner lets it go).
    /// Refused, naming the process, while another process runs it: that
    /// process owns its lifecycle.
    Stop { name: String },
    /// Delete the store's machine NAME and its disk (stopping it first when
    /// it runs in the background). Refused, naming the process, while
    /// another process runs it.
    Rm { name: String },
    /// Manage the API keys of `smol serve` (stored as hashes in SMOL_HOME).
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
}

/// What `smol __own` brings up: the arguments [`Want::args`] writes.
#[derive(Args, Debug, PartialEq)]
struct OwnArgs {
    name: String,
    /// Create it (else start the store's machine).
    #[arg(long, conflicts_with = "restore")]
    create: bool,
    /// Restore it from this snapshot directory.
    #[arg(long, value_name = "DIR")]
    restore: Option<std::path::PathBuf>,
    #[arg(long)]
    persistent: bool,
    #[arg(long, requires = "create")]
    forkable: bool,
    #[command(flatten)]
    resources: Resources,
}

impl OwnArgs {
    fn want(self) -> Want {
        let config = |c: MachineConfig| c.name(self.name.clone()).persistent(self.persistent);
        match self.restore {
            _ if self.create => {
                Want::Create(config(self.resources.machine_config()).forkable(self.forkable))
            }
            Some(ref dir) => Want::Restore(dir.clone(), config(MachineConfig::default())),
            None => Want::Start(self.name),
        }
    }
}

#[derive(Subcommand, Debug, PartialEq)]
enum KeyAction {
    /// Make a key named NAME and print it (once: only its hash is kept).
    Create { name: String },
    /// The keys' names and creation times.
    List,
    /// Remove the key named NAME; requests with it get 401 from then on.
    Revoke { name: String },
}

#[derive(Args, Debug, Default, PartialEq)]
struct RunOptions {
    /// Set an environment variable of the command (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The command's working directory.
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Pass this program's standard input to the command (read to its end
    /// before the command starts; without -i the command's is /dev/null).
    #[arg(short, long)]
    interactive: bool,
    /// Run the command on a terminal of this one's size (80x24 when this
    /// is none); with -i, keys go to it as they are typed, as `smol shell`.
    #[arg(short, long)]
    tty: bool,
    #[command(flatten)]
    resources: Resources,
}

/// The size of a new machine; each unset one is the default's.
#[derive(Args, Debug, Default, PartialEq)]
struct Resources {
    /// vCPUs of the machine.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory of the machine, in MiB.
    #[arg(long, value_name = "MIB")]
    memory: Option<u32>,
    /// Disk of the machine (where images are unpacked), in MiB.
    #[arg(long, value_name = "MIB")]
    disk: Option<u64>,
    /// Relay host port HOST (0: any free one) on ADDR (127.0.0.1 when
    /// absent; `[::1]` for IPv6) to the guest's port GUEST (repeatable).
    #[arg(short = 'p', long = "port", value_name = "[ADDR:]HOST:GUEST", value_parser = parse_port)]
    ports: Vec<smol::PortSpec>,
    /// Give the machine an outbound network (passt; the host's loopback
    /// is `host.smol.internal` in the guest).
    #[arg(long)]
    network: bool,
}

impl Resources {
    fn machine_config(&self) -> MachineConfig {
        let mut config = MachineConfig::default();
        if let Some(c) = self.cpus {
            config.resources.cpus = c;
        }
        if let Some(m) = self.memory {
            config.resources.memory_mb = m;
        }
        if let Some(d) = self.disk {
            config.resources.disk_mb = d;
        }
        config.ports = self.ports.clone();
        config.resources.network = self.network;
        config
    }
}

/// `[ADDR:]HOST:GUEST`, as `-p` takes it (and [`port_arg`] writes it).
fn parse_port(s: &str) -> Result<smol::PortSpec, String> {
    let bad = |why: &str| format!("{s:?}: {why} (expected [ADDR:]HOST:GUEST, e.g. 8080:80)");
    let (rest, guest) = s.rsplit_once(':').ok_or_else(|| bad("no GUEST port"))?;
    let guest: u16 = guest.parse().map_err(|_| bad("GUEST is not a port"))?;
    let (addr, host) = match rest.rsplit_once(':') {
        Some((addr, host)) => (Some(addr), host),
        None => (None, rest),
    };
    let host: u16 = host.parse().map_err(|_| bad("HOST is not a port"))?;
    let mut spec = smol::PortSpec::new(host, guest);
    if let Some(a) = addr {
        let a = a
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(a);
        spec = spec.address(a.parse().map_err(|_| bad("ADDR is not an IP address"))?);
    }
    Ok(spec)
}

/// The `-p` argument of `spec`.
fn port_arg(spec: &smol::PortSpec) -> String {
    match spec.address {
        Some(std::net::IpAddr::V6(a)) => format!("[{a}]:{}:{}", spec.host, spec.guest),
        Some(a) => format!("{a}:{}:{}", spec.host, spec.guest),
        None => format!("{}:{}", spec.host, spec.guest),
    }
}

/// Says where the machine's forwarded ports listen, if it has any.
async fn print_ports(m: &Machine) {
    match m.ports().await {
        Ok(ports) => {
            for p in ports {
                eprintln!("  {} -> guest port {}", p.host_addr(), p.guest);
            }
        }
        Err(e) => eprintln!("smol: the ports of machine {}: {e}", m.name()),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

impl RunOptions {
    fn exec_options(&self) -> ExecOptions {
        let mut o = ExecOptions::default().envs(self.env.iter().cloned());
        if let Some(w) = &self.workdir {
            o = o.workdir(w);
        }
        if let Some(t) = self.timeout {
            o = o.timeout(Duration::from_secs(t));
        }
        o
    }

    /// [`exec_options`](Self::exec_options), with this program's stdin
    /// under `-i`.
    async fn exec_options_with_input(&self) -> Result<ExecOptions, CliError> {
        let o = self.exec_options();
        if !self.interactive {
            return Ok(o);
        }
        let mut input = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut input)
            .await
            .map_err(CliError::Input)?;
        Ok(o.stdin(input))
    }
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Smol(#[from] smol::Error),
    #[error(transparent)]
    Image(#[from] smol::image::ImageError),
    #[error("interrupted")]
    Interrupted,
    #[error("writing the command's output")]
    Output(#[source] std::io::Error),
    #[error("reading standard input")]
    Input(#[source] std::io::Error),
    #[error("the command ended without an exit status")]
    NoExit,
    #[error("listening on {0}")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Owner(#[from] owner::OwnerError),
    #[error("{0}")]
    Usage(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,smol::serve=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("smol: starting the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Interrupted) => {
            eprintln!("smol: interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => {
            eprintln!("smol: {e}");
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                eprintln!("  caused by: {c}");
                cause = c.source();
            }
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn run(command: Command) -> Result<u8, CliError> {
    match command {
        Command::Serve { listen } => serve(listen).await.map(|()| 0),
        Command::Ls => {
            println!("NAME\tSTATE\tPERSISTENT\tOWNER");
            for m in Machine::list().await? {
                let owner = m.owner_pid.map(|p| format!("pid {p}")).unwrap_or_default();
                match &m.unreadable {
                    None => println!("{}\t{}\t{}\t{owner}", m.name, m.state, m.persistent),
                    Some(why) => {
                        println!("{}\tunreadable\t{}\t{owner}", m.name, m.persistent);
                        eprintln!("smol: {}: {why} (left as it is)", m.name);
                    }
                }
            }
            Ok(0)
        }
        Command::Stop { name } => {
            let released = owner::release(&name).await?;
            match Machine::connect(&name).await {
                Ok(m) => m.stop().await?,
                // A machine that was not persistent went with its owner.
                Err(smol::Error::NotFound { .. }) if released => {
                    eprintln!("machine {name} stopped and deleted (it was not persistent)");
                }
                Err(e) => return Err(e.into()),
            }
            Ok(0)
        }
        Command::Rm { name } => {
            let released = owner::release(&name).await?;
            match Machine::connect(&name).await {
                Ok(m) => m.delete().await?,
                Err(smol::Error::NotFound { .. }) if released => {}
                Err(e) => return Err(e.into()),
            }
            Ok(0)
        }
        Command::Create {
            name,
            persistent,
            forkable,
            resources,
        } => {
            let config = resources
                .machine_config()
                .name(name.unwrap_or_else(generated_name))
                .persistent(persistent)
                .forkable(forkable);
            launched(owner::launch(Want::Create(config)).await?)
        }
        Command::Start { name } => launched(owner::launch(Want::Start(name)).await?),
        Command::Own(args) => launched(owner::serve(args.want()).await?),
        Command::Fork { name, clone } => {
            eprintln!(
                "{}",
                owner::ask(owner::Request::Fork { name, clone }).await?
            );
            Ok(0)
        }
        Command::Key { action } => {
            let keys = smol::server::keys::KeyStore::new(&smol::image::smol_home());
            match action {
                KeyAction::Create { name } => println!("{}", keys.create(&name)?),
                KeyAction::List => {
                    for k in keys.list()? {
                        println!("{}\tcreated {}", k.name, k.created_unix);
                    }
                }
                KeyAction::Revoke { name } => keys.revoke(&name)?,
            }
            Ok(0)
        }
        Command::Pull { image } => interruptible(pull(&image)).await.map(|()| 0),
        Command::Run {
            options,
            image,
            argv,
        } => {
            let exec = options.exec_options_with_input().await?;
            in_machine(&options, |m| async move {
                let bar = PullBar::new(&image);
                let pulled = m.pull_image_with_progress(&image, bar.callback()).await;
                bar.finish();
                let info = pulled?;
                eprintln!(
                    "image {} ({}, {})",
                    info.reference,
                    layers_text(info.layers.len()),
                    HumanBytes(info.size)
                );
                let stream = m.run_stream_with(&info.digest, argv, exec).await?;
                forward(stream).await
            })
            .await
        }
        Command::Shell { name, argv } => {
            let argv = if argv.is_empty() {
                vec!["sh".to_string()]
            } else {
                argv
            };
            let options = ExecOptions::default();
            in_named_machine(&name, |m| shell::on_tty(m, argv, options, true)).await
        }
        Command::Exec {
            options,
            name: Some(name),
            argv,
        } if options.tty => {
            let keys = options.interactive;
            in_named_machine(&name, |m| {
                shell::on_tty(m, argv, options.exec_options(), keys)
            })
            .await
        }
        Command::Exec {
            options,
            name: None,
            argv,
        } if options.tty => {
            let keys = options.interactive;
            let exec = options.exec_options();
            in_machine(&options, |m| shell::on_tty(m, argv, exec, keys)).await
        }
        Command::Exec {
            options,
            name: Some(name),
            argv,
        } => {
            let exec = options.exec_options_with_input().await?;
            in_named_machine(&name, |m| async move {
                forward(m.exec_stream_with(argv, exec).await?).await
            })
            .await
        }
        Command::Exec {
            options,
            name: None,
            argv,
        } => {
            let exec = options.exec_options_with_input().await?;
            in_machine(&options, |m| async move {
                forward(m.exec_stream_with(argv, exec).await?).await
            })
            .await
        }
        Command::Snapshot {
            targets,
            argv,
            options,
        } if targets.len() == 2 => {
            if !argv.is_empty() || options != RunOptions::default() {
                return Err(CliError::Usage(
                    "a snapshot of a machine NAME takes no command and no options".into(),
                ));
            }
            let [name, dir] = <[String; 2]>::try_from(targets).expect("two targets");
            let dir = std::path::PathBuf::from(dir);
            eprintln!(
                "{}",
                owner::ask(owner::Request::Snapshot { name, dir }).await?
            );
            Ok(0)
        }
        Command::Snapshot {
            options,
            targets,
            argv,
        } => {
            let dir = std::path::PathBuf::from(&targets[0]);
            let exec = options.exec_options_with_input().await?;
            in_machine(&options, |m| async move {
                if !argv.is_empty() {
                    let code = forward(m.exec_stream_with(argv, exec).await?).await?;
                    if code != 0 {
                        eprintln!("smol: the set-up command exited {code}; no snapshot taken");
                        return Ok(code);
                    }
                }
                let t = m.snapshot(&dir).await?;
                eprintln!(
                    "snapshot {} ({} of memory) in {:.1?}",
                    dir.display(),
                    HumanBytes(t.memory_bytes),
                    t.total
                );
                Ok(0)
            })
            .await
        }
        Command::Restore {
            name,
            persistent,
            dir,
            argv,
        } if argv.is_empty() => {
            let config = MachineConfig::default()
                .name(name.unwrap_or_else(generated_name))
                .persistent(persistent);
            launched(owner::launch(Want::Restore(dir, config)).await?)
        }
        Command::Restore {
            name, dir, argv, ..
        } => {
            let config = MachineConfig {
                name,
                ..MachineConfig::default()
            };
            let made = Made::Restore(dir, config);
            in_made_machine(made, |m| async move {
                forward(m.exec_stream(argv).await?).await
            })
            .await
        }
    }
}

/// A name for a machine the user did not name, as the library makes them.
fn generated_name() -> String {
    format!("smol-{:08x}", rand::random::<u32>())
}

fn launched(ended: Ended) -> Result<u8, CliError> {
    Ok(match ended {
        Ended::Done => 0,
        Ended::Interrupted => EXIT_INTERRUPTED,
    })
}

/// `smol serve`: listens, says where on stdout, serves until SIGTERM or
/// Ctrl-C, then cleans up its machines.
async fn serve(listen: std::net::SocketAddr) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Listen(listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Listen(listen, e))?;
    println!("smol serve: listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        eprintln!("smol serve: shutting down");
    };
    smol::server::serve(listener, smol::image::smol_home(), shutdown).await?;
    Ok(())
}

/// Pulls into the host's blob cache and says what it got on stdout.
async fn pull(image: &str) -> Result<(), CliError> {
    let t = Instant::now();
    let source = smol::image::ImageSource::parse(image)?;
    let resolver = ImageResolver::open_default()?;
    let bar = PullBar::new(image);
    let pulled = resolver
        .pull_source_with_progress(&source, std::sync::Arc::new(bar.callback()) as ProgressFn)
        .await;
    let state = bar.finish();
    let pulled = pulled?;
    let i = &pulled.image;
    println!("{}", i.reference);
    println!("  digest  {}", i.digest);
    println!(
        "  size    {} in {} ({} cached)",
        HumanBytes(i.size),
        layers_text(i.layers.len()),
        state.layers_cached
    );
    println!(
        "  fetched {} in {:.1?}",
        HumanBytes(pulled.stats.bytes_fetched),
        t.elapsed()
    );
    Ok(())
}

/// How a temporary machine comes to be.
enum Made {
    Create(MachineConfig),
    Restore(std::path::PathBuf, MachineConfig),
}

/// Runs `work` in a new machine, then deletes the machine, whatever
/// happened (Ctrl-C included).
async fn in_machine<F, Fut>(options: &RunOptions, work: F) -> Result<u8, CliError>
where
    F: FnOnce(Machine) -> Fut,
    Fut: Future<Output = Result<u8, CliError>>,
{
    in_made_machine(Made::Create(options.resources.machine_config()), work).await
}

async fn in_made_machine<F, Fut>(made: Made, work: F) -> Result<u8, CliError>
where
    F: FnOnce(Machine) -> Fut,
    Fut: Future<Output = Result<u8, CliError>>,
{
    let t = Instant::now();
    let creating = spinner("creating a machine".into());
    // A cancelled create leaves nothing behind.
    let created = interruptible(async {
        Ok(match made {
            Made::Create(config) => Machine::create(config).await?,
            Made::Restore(dir, config) => Machine::restore(dir, config).await?,
        })
    })
    .await;
    creating.finish_and_clear();
    let m = created?;
    eprintln!("machine {} up in {:.1?}", m.name(), t.elapsed());
    print_ports(&m).await;
    let result = interruptible(work(m.clone())).await;
    if let Err(e) = m.delete().await {
        eprintln!("smol: deleting machine {}: {e}", m.name());
    }
    result
}

/// `work` in the store's machine `name`: as it is when another process
/// runs it (or boots it: that boot is waited for), else started for `work`
/// and stopped after it.
async fn in_named_machine<F, Fut>(name: &str, work: F) -> Result<u8, CliError>
where
    F: FnOnce(Machine) -> Fut,
    Fut: Future<Output = Result<u8, CliError>>,
{
    let m = Machine::connect(name).await?;
    let mut started = false;
    if m.state().await? != MachineState::Running {
        let t = Instant::now();
        let starting = spinner(format!("starting machine {name}"));
        let r = interruptible(async { Ok(m.start().await?) }).await;
        starting.finish_and_clear();
        r?;
        // Booted here, or by the process that owns it (then left to it).
        started = owner::owned_here(name).await?;
        eprintln!("machine {name} up in {:.1?}", t.elapsed());
    }
    let result = interruptible(work(m.clone())).await;
    if started {
        if let Err(e) = m.stop().await {
            eprintln!("smol: stopping machine {name}: {e}");
        }
    }
    result
}

/// `work`, or [`CliError::Interrupted`] at Ctrl-C.
async fn interruptible<T>(work: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => Err(CliError::Interrupted),
    }
}

/// Copies a command's output to ours as it comes; returns its exit code.
async fn forward(mut stream: ExecStream) -> Result<u8, CliError> {
    let mut code = None;
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(b) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&b)
                    .and_then(|()| out.flush())
                    .map_err(CliError::Output)?;
            }
            ExecEvent::Stderr(b) => {
                let mut err = std::io::stderr().lock();
                err.write_all(&b)
                    .and_then(|()| err.flush())
                    .map_err(CliError::Output)?;
            }
            ExecEvent::Exit(c) => code = Some(c),
            ExecEvent::Error(e) => eprintln!("smol: {e}"),
        }
    }
    // Exit codes are 0..=255 (128 + signal for a signal).
    code.map(|c| u8::try_from(c).unwrap_or(EXIT_FAILURE))
        .ok_or(CliError::NoExit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(args).map(|c| c.command)
    }

    #[test]
    fn pull_takes_one_image() {
        assert_eq!(
            parse(&["smol", "pull", "alpine:3.20"]).unwrap(),
            Command::Pull {
                image: "alpine:3.20".into()
            }
        );
        assert!(parse(&["smol", "pull"]).is_err());
        assert!(parse(&["smol", "pull", "a", "b"]).is_err());
    }

    #[test]
    fn run_takes_options_an_image_and_argv() {
        let c = parse(&[
            "smol",
            "run",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "-w",
            "/tmp",
            "--timeout",
            "5",
            "--memory",
            "256",
            "alpine",
            "--",
            "sh",
            "-c",
            "echo $A",
        ])
        .unwrap();
        let Command::Run {
            options,
            image,
            argv,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(image, "alpine");
        assert_eq!(argv, ["sh", "-c", "echo $A"]);
        assert_eq!(
            options.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(options.resources.memory, Some(256));
        let exec = options.exec_options();
        assert_eq!(exec.workdir.as_deref(), Some("/tmp"));
        assert_eq!(exec.timeout, Some(Duration::from_secs(5)));
        assert_eq!(options.resources.machine_config().resources.memory_mb, 256);
    }

    #[test]
    fn run_argv_may_skip_the_separator_and_be_empty() {
        let Command::Run { argv, .. } = parse(&["smol", "run", "alpine", "ls", "-la"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(argv, ["ls", "-la"]);
        let Command::Run { argv, .. } = parse(&["smol", "run", "alpine"]).unwrap() else {
            panic!()
        };
        assert!(argv.is_empty(), "the image's Cmd runs");
    }

    #[test]
    fn exec_needs_a_command() {
        let Command::Exec {
            argv,
            options,
            name,
        } = parse(&["smol", "exec", "--cpus", "2", "--", "uname", "-a"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(argv, ["uname", "-a"]);
        assert_eq!(options.resources.machine_config().resources.cpus, 2);
        assert_eq!(name, None);
        assert!(!options.interactive, "stdin is /dev/null without -i");
        let Command::Exec { options, name, .. } =
            parse(&["smol", "exec", "-i", "dev", "--", "wc", "-c"]).unwrap()
        else {
            panic!()
        };
        assert!(options.interactive);
        assert_eq!(name.as_deref(), Some("dev"));
        let Command::Exec { options, .. } =
            parse(&["smol", "exec", "-it", "dev", "--", "sh"]).unwrap()
        else {
            panic!()
        };
        assert!(options.interactive && options.tty);
        let Command::Shell { name, argv } = parse(&["smol", "shell", "dev"]).unwrap() else {
            panic!()
        };
        assert_eq!((name.as_str(), argv.len()), ("dev", 0), "sh by default");
        let Command::Exec { argv, name, .. } =
            parse(&["smol", "exec", "dev", "--", "ls", "-la"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (argv, name),
            (vec!["ls".to_string(), "-la".into()], Some("dev".into()))
        );
        assert!(
            parse(&["smol", "exec", "dev", "--disk", "9", "--", "ls"]).is_err(),
            "a named machine has its own resources"
        );
        assert!(parse(&["smol", "exec"]).is_err());
        assert!(parse(&["smol", "exec", "--"]).is_err());
        assert!(parse(&["smol", "exec", "dev"]).is_err(), "no command");
    }

    #[test]
    fn create_start_and_the_owner_agree() {
        let c = parse(&["smol", "create", "dev", "--persistent", "--disk", "512"]).unwrap();
        let Command::Create {
            name,
            persistent,
            resources,
            ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!((name.as_deref(), persistent), (Some("dev"), true));
        let config = resources.machine_config().name("dev").persistent(true);
        assert_eq!(config.resources.disk_mb, 512);
        let Command::Create {
            name, persistent, ..
        } = parse(&["smol", "create"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((name, persistent), (None, false));
        assert_eq!(
            parse(&["smol", "start", "dev"]).unwrap(),
            Command::Start { name: "dev".into() }
        );
        assert!(parse(&["smol", "start"]).is_err());

        // What `launch` passes its owner parses back to the same machine.
        let mut forkable = config.clone().forkable(true);
        forkable.ports = vec![
            smol::PortSpec::new(8080, 80),
            smol::PortSpec::new(0, 22).address("::1".parse().unwrap()),
        ];
        let restored = MachineConfig::default().name("dev").persistent(true);
        for want in [
            Want::Create(config),
            Want::Create(forkable),
            Want::Start("dev".into()),
            Want::Restore("/snap shots/a".into(), restored),
        ] {
            let mut args = vec!["smol".to_string(), owner::OWN_COMMAND.into()];
            args.extend(want.args());
            let Command::Own(own) = Cli::try_parse_from(&args).unwrap().command else {
                panic!("{args:?}")
            };
            let back = own.want();
            assert_eq!(back, want, "{args:?}");
        }
    }

    #[test]
    fn ports_are_addr_host_guest() {
        let p = |s: &str| parse_port(s);
        assert_eq!(p("8080:80").unwrap(), smol::PortSpec::new(8080, 80));
        assert_eq!(
            p("0.0.0.0:0:22").unwrap(),
            smol::PortSpec::new(0, 22).address("0.0.0.0".parse().unwrap())
        );
        let v6 = p("[::1]:9000:90").unwrap();
        assert_eq!(v6.address, Some("::1".parse().unwrap()));
        assert_eq!(parse_port(&port_arg(&v6)).unwrap(), v6);
        for bad in ["80", "x:80", "8080:x", "70000:80", "nowhere:1:2", ""] {
            let e = p(bad).unwrap_err();
            assert!(e.contains("HOST:GUEST"), "{bad}: {e}");
        }
        let Command::Run { options, .. } =
            parse(&["smol", "run", "-p", "8080:80", "--port", "0:443", "alpine"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(options.resources.machine_config().ports.len(), 2);
        assert!(parse(&["smol", "exec", "-p", "1:2", "dev", "--", "true"]).is_err());
    }

    #[test]
    fn snapshot_and_restore_take_a_directory() {
        let Command::Snapshot {
            targets,
            argv,
            options,
        } = parse(&[
            "smol", "snapshot", "--memory", "256", "./tpl", "--", "touch", "/x",
        ])
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(targets, ["./tpl"]);
        assert_eq!(argv, ["touch", "/x"]);
        assert_eq!(options.resources.memory, Some(256));
        let Command::Snapshot { argv, targets, .. } =
            parse(&["smol", "snapshot", "./tpl"]).unwrap()
        else {
            panic!()
        };
        assert!(argv.is_empty(), "no set-up command");
        assert_eq!(targets, ["./tpl"]);
        let Command::Snapshot { targets, .. } =
            parse(&["smol", "snapshot", "dev", "./tpl"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(targets, ["dev", "./tpl"], "a machine and a directory");
        assert!(parse(&["smol", "snapshot", "a", "b", "c"]).is_err());
        assert!(parse(&["smol", "snapshot"]).is_err());

        let Command::Restore {
            name,
            dir,
            argv,
            persistent,
        } = parse(&[
            "smol", "restore", "--name", "r1", "./tpl", "--", "cat", "/x",
        ])
        .unwrap()
        else {
            panic!()
        };
        assert_eq!(name.as_deref(), Some("r1"));
        assert_eq!(dir, std::path::Path::new("./tpl"));
        assert_eq!(argv, ["cat", "/x"]);
        assert!(!persistent);
        let Command::Restore {
            argv, persistent, ..
        } = parse(&["smol", "restore", "--persistent", "./tpl"]).unwrap()
        else {
            panic!()
        };
        assert!(argv.is_empty() && persistent, "a background machine");
        assert!(
            parse(&["smol", "restore", "--persistent", "./tpl", "--", "ls"]).is_err(),
            "a temporary machine is not persistent"
        );
        assert_eq!(
            parse(&["smol", "fork", "golden", "clone-1"]).unwrap(),
            Command::Fork {
                name: "golden".into(),
                clone: "clone-1".into()
            }
        );
    }

    #[test]
    fn bad_options_are_refused() {
        for args in [
            &["smol", "run", "-e", "NOEQUALS", "alpine"][..],
            &["smol", "run", "-e", "=v", "alpine"],
            &["smol", "run", "--timeout", "0", "alpine"],
            &["smol", "exec", "--memory", "lots", "--", "true"],
            &["smol", "frobnicate"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
