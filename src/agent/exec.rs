//! An exec on its own agent connection: the request, `Started`, then
//! output frames until the exit (or the agent's error).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use smol_protocol::{asyncio, AgentError, ExecRequest, ExitStatus, FrameKind, Request, Response};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{parse, unexpected, AgentConnection, AgentLink};
use crate::error::{Error, Result};
use crate::exec::{ExecEvent, ExecResult, ExecStream};
use crate::process::Process;

/// How long past its timeout the host waits for the agent's report before
/// deciding the guest is not answering.
const HOST_GRACE: Duration = Duration::from_secs(30);

/// What the agent sends after `Started`.
enum Raw {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
    Failed(AgentError),
}

/// Bytes of stdin per frame.
const STDIN_CHUNK: usize = 64 << 10;

/// An exec in flight on its own connection.
pub(crate) struct RunningExec {
    conn: AgentConnection,
    pid: u32,
    deadline: Option<Instant>,
    program: String,
    timeout: Option<Duration>,
    /// Sends the command's stdin beside the reads of its output; stopped
    /// with the exec.
    _feeder: Option<Feeder>,
}

/// The task writing an exec's stdin; aborted when dropped.
struct Feeder(JoinHandle<()>);

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `req` and collects up to `max_output` bytes of its output, feeding
/// it `stdin`; a broken connection is explained.
pub(crate) async fn exec<L: AgentLink>(
    link: &L,
    req: ExecRequest,
    max_output: u64,
    stdin: Option<Bytes>,
) -> Result<ExecResult> {
    let run = async {
        RunningExec::start(link, req, stdin)
            .await?
            .collect(max_output)
            .await
    };
    match run.await {
        Ok(r) => Ok(r),
        Err(e) => Err(link.explain(e).await),
    }
}

/// Runs `req` and streams its output; the stream holds `link` (a machine
/// handle), so the machine outlives it.
pub(crate) async fn exec_stream<L>(
    link: &L,
    req: ExecRequest,
    stdin: Option<Bytes>,
) -> Result<ExecStream>
where
    L: AgentLink + Clone + Send + 'static,
{
    match RunningExec::start(link, req, stdin).await {
        Ok(running) => Ok(running.into_stream(link.clone())),
        Err(e) => Err(link.explain(e).await),
    }
}

/// Starts `req` as a [`Process`] whose stdin stays open for
/// [`Process::write_stdin`], unless `stdin` gives all of it up front.
pub(crate) async fn spawn<L>(
    link: &L,
    mut req: ExecRequest,
    stdin: Option<Bytes>,
) -> Result<Process>
where
    L: AgentLink + Clone + Send + 'static,
{
    let open = stdin.is_none();
    let tty = req.tty.is_some();
    req.stdin = true;
    let started = async {
        let mut running = match stdin {
            Some(input) => RunningExec::start(link, req, Some(input)).await?,
            None => RunningExec::open(link, req).await?,
        };
        let writer = if open {
            Some(StdinWriter::new(&mut running)?)
        } else {
            None
        };
        Ok::<_, Error>((running, writer))
    };
    match started.await {
        Ok((running, writer)) => {
            let to = link.clone();
            let ask: Ask = Box::new(move |req| ask(to.clone(), req).boxed());
            Ok(Process::new(
                running.into_stream(link.clone()),
                writer,
                tty,
                ask,
            ))
        }
        Err(e) => Err(link.explain(e).await),
    }
}

/// How a [`Process`] asks the agent about its command (a signal, a
/// resize), on a connection of its own: the exec's own may be held up
/// behind stdin that the command does not read.
pub(crate) type Ask =
    Box<dyn Fn(Request) -> futures::future::BoxFuture<'static, Result<()>> + Send + Sync>;

/// Sends `req`, answered by `Ok`.
async fn ask<L: AgentLink>(link: L, req: Request) -> Result<()> {
    let step = match &req {
        Request::Signal { pid, signal } => format!("signal {signal} to pid {pid}"),
        Request::Resize { pid, size } => {
            format!(
                "resizing the terminal of pid {pid} to {}x{}",
                size.cols, size.rows
            )
        }
        _ => "a request about a process".to_string(),
    };
    let mut conn = link.request(&req).await?;
    match conn.response_within(None, &step).await? {
        Response::Ok => Ok(()),
        other => Err(unexpected("process request", &other)),
    }
}

impl RunningExec {
    /// Opens a connection with the request and waits for `Started` (a
    /// missing program or a bad workdir fails here); then starts feeding
    /// `stdin`, which `req.stdin` must announce.
    pub async fn start<L: AgentLink>(
        link: &L,
        req: ExecRequest,
        stdin: Option<Bytes>,
    ) -> Result<Self> {
        if req.stdin != stdin.is_some() {
            return Err(Error::Internal(format!(
                "exec of {:?}: the request's stdin flag ({}) does not match the input given",
                req.argv[0], req.stdin
            )));
        }
        let mut running = Self::open(link, req).await?;
        if let Some(input) = stdin {
            running._feeder = Some(Feeder::start(StdinWriter::new(&mut running)?, input));
        }
        Ok(running)
    }

    /// Opens a connection with the request and waits for `Started`.
    async fn open<L: AgentLink>(link: &L, req: ExecRequest) -> Result<Self> {
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let deadline = timeout.map(|t| Instant::now() + t + HOST_GRACE);
        let program = req.argv[0].clone();
        let mut conn = link.request(&Request::Exec(req)).await?;
        let step = format!("the start of {program:?}");
        let pid = match conn.response_within(None, &step).await? {
            Response::Started { pid } => pid,
            other => return Err(unexpected("exec", &other)),
        };
        Ok(RunningExec {
            conn,
            pid,
            deadline,
            program,
            timeout,
            _feeder: None,
        })
    }

    async fn next(&mut self) -> Result<Raw> {
        let frame = match self.deadline {
            Some(d) => match tokio::time::timeout_at(d, self.conn.next()).await {
                Ok(f) => f?,
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!(
                            "exec of {:?} (the agent did not report its timeout)",
                            self.program
                        ),
                        after: self.timeout.unwrap_or_default() + HOST_GRACE,
                    })
                }
            },
            None => self.conn.next().await?,
        };
        Ok(match frame.kind {
            FrameKind::Stdout => Raw::Stdout(Bytes::from(frame.payload)),
            FrameKind::Stderr => Raw::Stderr(Bytes::from(frame.payload)),
            FrameKind::Exit => Raw::Exit(parse(&frame, "exit")?),
            FrameKind::Error => Raw::Failed(parse(&frame, "error")?),
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected {other:?} frame during exec"
                )))
            }
        })
    }

    /// Collects everything into an [`ExecResult`]; past `max_output`
    /// bytes the connection is dropped, which makes the agent kill the
    /// command, and the call is [`Error::OutputTooLarge`].
    pub async fn collect(mut self, max_output: u64) -> Result<ExecResult> {
        let mut stdout = BytesMut::new();
        let mut stderr = BytesMut::new();
        loop {
            let raw = self.next().await?;
            if let Raw::Stdout(b) | Raw::Stderr(b) = &raw {
                let total = (stdout.len() + stderr.len()) as u64 + b.len() as u64;
                if total > max_output {
                    return Err(Error::OutputTooLarge {
                        program: self.program,
                        limit: max_output,
                    });
                }
            }
            match raw {
                Raw::Stdout(b) => stdout.extend_from_slice(&b),
                Raw::Stderr(b) => stderr.extend_from_slice(&b),
                Raw::Exit(st) => {
                    return Ok(ExecResult {
                        exit_code: exit_code(&st)?,
                        stdout: stdout.freeze(),
                        stderr: stderr.freeze(),
                        signal: st.signal,
                        timed_out: st.timed_out,
                    })
                }
                Raw::Failed(e) => return Err(Error::from_agent(e, None)),
            }
        }
    }

    /// Turns the rest into an [`ExecStream`]. `keep` is held until the
    /// stream is dropped (the machine handle, so the machine outlives it).
    pub fn into_stream<K: Send + 'static>(mut self, keep: K) -> ExecStream {
        let pid = self.pid;
        let inner = async_stream::stream! {
            let _keep = keep;
            loop {
                match self.next().await {
                    Ok(Raw::Stdout(b)) => yield Ok(ExecEvent::Stdout(b)),
                    Ok(Raw::Stderr(b)) => yield Ok(ExecEvent::Stderr(b)),
                    Ok(Raw::Exit(st)) => {
                        match exit_code(&st) {
                            Ok(code) => {
                                if st.timed_out {
                                    let t = self.timeout.unwrap_or_default();
                                    yield Ok(ExecEvent::Error(format!(
                                        "timed out after {t:?}; the process group was killed"
                                    )));
                                }
                                yield Ok(ExecEvent::Exit(code));
                            }
                            Err(e) => yield Err(e),
                        }
                        break;
                    }
                    Ok(Raw::Failed(e)) => {
                        yield Ok(ExecEvent::Error(crate::error::sanitize(&e.message)));
                        break;
                    }
                    Err(e) => {
                        yield Err(e);
                        break;
                    }
                }
            }
        };
        ExecStream::new(pid, Box::pin(inner))
    }
}

impl Feeder {
    /// Writes `input` and the end of stdin with `writer`, beside the reads
    /// of the command's output (a command that writes as it reads would
    /// otherwise stall both sides once a pipe fills). It ends with the
    /// exec, whose own deadline holds; a write the agent no longer takes
    /// (the command ended) just ends it, and the reads report the exit.
    fn start(mut writer: StdinWriter, input: Bytes) -> Feeder {
        Feeder(tokio::spawn(async move {
            if writer.write(&input).await.is_ok() {
                let _ = writer.close().await;
            }
        }))
    }
}

/// Writes an exec's stdin as Stdin frames on a second fd of its
/// connection, so that the connection's reads go on meanwhile.
pub(crate) struct StdinWriter {
    stream: tokio::net::UnixStream,
    machine: String,
    program: String,
}

impl StdinWriter {
    fn new(running: &mut RunningExec) -> Result<StdinWriter> {
        use std::os::fd::AsFd;
        let machine = running.conn.machine().to_string();
        let io = |source| Error::Io {
            context: format!(
                "cannot open a second handle on the exec connection to machine {machine:?}"
            ),
            source,
        };
        let fd = running
            .conn
            .stream()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io)?;
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).map_err(io)?;
        let stream = tokio::net::UnixStream::from_std(std).map_err(io)?;
        Ok(StdinWriter {
            stream,
            machine: machine.clone(),
            program: running.program.clone(),
        })
    }

    /// Sends `data`; a command that takes none of a frame within
    /// [`answer_timeout`](super::answer_timeout) (its pipe full, the guest
    /// silent) is a timeout.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(STDIN_CHUNK) {
            self.frame(FrameKind::Stdin, chunk).await?;
        }
        Ok(())
    }

    /// Ends the command's stdin.
    pub async fn close(mut self) -> Result<()> {
        self.frame(FrameKind::Eof, &[]).await
    }

    async fn frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        let (machine, program) = (&self.machine, &self.program);
        let sent = async {
            asyncio::write_frame(&mut self.stream, kind, payload)
                .await
                .map_err(|e| Error::from_protocol(e, machine))
        };
        super::within(
            super::answer_timeout(),
            || format!("the stdin of {program:?} on machine {machine:?} (it took nothing)"),
            sent,
        )
        .await
    }
}

/// The shell convention: the code, or 128 + the signal.
fn exit_code(st: &ExitStatus) -> Result<i32> {
    match (st.code, st.signal) {
        (Some(c), _) => Ok(c),
        (None, Some(s)) if (1..=64).contains(&s) => Ok(128 + s),
        _ => Err(Error::Protocol(format!(
            "exit status with neither a code nor a valid signal: {st:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Children of this process whose command line is `argv`.
    fn children_running(argv: &[&str]) -> Vec<String> {
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| c.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
            .collect()
    }

    /// Waits up to 10 s for no child running `argv` to be left.
    async fn assert_gone(argv: &[&str]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !children_running(argv).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            children_running(argv),
            Vec::<String>::new(),
            "{argv:?} still runs"
        );
    }

    /// Issue 15: a guest that writes without end cannot grow the host
    /// without bound; the command is killed at the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn collected_output_is_bounded_and_the_command_killed() {
        use crate::agent::loopback;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let opts = crate::ExecOptions::default();
        let argv = ["cat", "/dev/zero"];
        let e = exec(&link, opts.request(argv).unwrap(), 1 << 20, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::OutputTooLarge { program, limit } if program == "cat" && *limit == 1 << 20),
            "{e}"
        );
        assert_gone(&argv).await;

        // Right at the bound is fine; stdout and stderr count together.
        let script = [
            "sh",
            "-c",
            "head -c 600 /dev/zero; head -c 400 /dev/zero >&2",
        ];
        let r = exec(&link, opts.request(script).unwrap(), 1000, None)
            .await
            .unwrap();
        assert_eq!((r.stdout.len(), r.stderr.len()), (600, 400));
        let e = exec(&link, opts.request(script).unwrap(), 999, None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::OutputTooLarge { .. }), "{e}");
        assert_eq!(opts.output_limit(), crate::exec::DEFAULT_MAX_OUTPUT);
        assert_eq!(opts.max_output(5).output_limit(), 5);
    }

    /// Issue 19: what `ExecOptions::stdin` gives reaches the command byte
    /// for byte, while its output is read (a command that writes as it
    /// reads would stall a host that wrote everything first: pipes hold
    /// 64 KiB), and whatever the command does with it, the exec ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stdin_reaches_the_command_exactly() {
        use crate::agent::loopback;
        use sha2::Digest;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let run = |argv: &'static [&'static str], input: Bytes| {
            let opts = crate::ExecOptions::default().stdin(input);
            let req = opts.request(argv).unwrap();
            let link = &link;
            async move { exec(link, req, 64 << 20, opts.stdin).await.unwrap() }
        };
        let r = run(&["wc", "-c"], Bytes::from_static(b"abc")).await;
        assert_eq!(r.stdout_lossy().trim(), "3");

        let noise: Bytes = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>()
            .into();
        let r = run(&["cat"], noise.clone()).await;
        assert_eq!(r.exit_code, 0);
        assert!(r.stdout == noise, "cat gave back {} bytes", r.stdout.len());

        let r = run(&["sha256sum"], noise.slice(..1 << 20)).await;
        let want = hex::encode(sha2::Sha256::digest(&noise[..1 << 20]));
        assert_eq!(r.stdout_lossy().split_whitespace().next(), Some(&*want));

        // Empty input is an immediate end of file.
        let r = run(&["cat"], Bytes::new()).await;
        assert_eq!((r.exit_code, r.stdout.len()), (0, 0));
        // A command that reads none of it, or stops early, still ends.
        let r = run(&["true"], noise.clone()).await;
        assert_eq!(r.exit_code, 0);
        let r = run(&["head", "-c", "10"], noise.clone()).await;
        assert_eq!(r.stdout, noise.slice(..10));

        // A stream feeds its input the same way.
        let opts = crate::ExecOptions::default().stdin(noise.slice(..300_000));
        let mut stream = exec_stream(&link, opts.request(["cat"]).unwrap(), opts.stdin)
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(ev) = futures::StreamExt::next(&mut stream).await {
            match ev.unwrap() {
                ExecEvent::Stdout(b) => got.extend_from_slice(&b),
                ExecEvent::Exit(code) => assert_eq!(code, 0),
                other => panic!("{other:?}"),
            }
        }
        assert!(
            got == noise[..300_000],
            "the stream gave {} bytes",
            got.len()
        );

        // The flag and the input go together.
        let req = crate::ExecOptions::default().request(["cat"]).unwrap();
        let e = exec(&link, req, 1 << 20, Some(Bytes::from_static(b"x")))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");
    }

    /// Issue 19: a spawned process takes input while it runs, line by
    /// line; its stdin closes on request or on `wait`; writes after that
    /// are a named error; dropping it kills the command.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spawned_process_takes_input_as_it_runs() {
        use crate::agent::loopback;
        use futures::StreamExt;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let opts = crate::ExecOptions::default();
        let mut p = spawn(&link, opts.request(["cat"]).unwrap(), None)
            .await
            .unwrap();
        assert!(p.pid() > 0);
        for i in 0..5 {
            let line = format!("line {i}\n");
            p.write_stdin(&line).await.unwrap();
            // The echo comes back before the next line is written.
            let mut got = Vec::new();
            while got != line.as_bytes() {
                match tokio::time::timeout(Duration::from_secs(10), p.next()).await {
                    Ok(Some(Ok(ExecEvent::Stdout(b)))) => got.extend_from_slice(&b),
                    other => panic!("waiting for {line:?}: {other:?}"),
                }
            }
        }
        p.close_stdin().await.unwrap();
        p.close_stdin().await.unwrap();
        let e = p.write_stdin(b"late").await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { what: "stdin", .. }),
            "{e}"
        );
        assert_eq!(p.wait().await.unwrap(), 0);

        // wait closes stdin itself.
        let mut p = spawn(
            &link,
            opts.request(["sh", "-c", "cat; exit 7"]).unwrap(),
            None,
        )
        .await
        .unwrap();
        p.write_stdin(b"x").await.unwrap();
        assert_eq!(p.wait().await.unwrap(), 7);

        // Input given whole in the options is fed, then closed.
        let given = crate::ExecOptions::default().stdin("all of it");
        let mut p = spawn(&link, given.request(["cat"]).unwrap(), given.stdin)
            .await
            .unwrap();
        assert!(p.write_stdin(b"more").await.is_err());
        let mut out = Vec::new();
        while let Some(ev) = p.next().await {
            if let ExecEvent::Stdout(b) = ev.unwrap() {
                out.extend_from_slice(&b);
            }
        }
        assert_eq!(out, b"all of it");

        // Dropped: the command is killed.
        let argv = ["sleep", "1000"];
        let p = spawn(&link, opts.request(argv).unwrap(), None)
            .await
            .unwrap();
        assert_eq!(children_running(&argv).len(), 1);
        drop(p);
        assert_gone(&argv).await;

        // A signal ends it and is reported; after that, there is nothing
        // to signal.
        let p = spawn(&link, opts.request(["sleep", "100"]).unwrap(), None)
            .await
            .unwrap();
        let e = p.signal(99).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { what: "signal", reason } if reason.contains("99")),
            "{e}"
        );
        p.signal(libc::SIGTERM).await.unwrap();
        assert_eq!(p.wait().await.unwrap(), 128 + libc::SIGTERM);
        let gone = spawn(&link, opts.request(["true"]).unwrap(), None)
            .await
            .unwrap();
        let gone_pid = gone.pid();
        assert_eq!(gone.wait().await.unwrap(), 0);
        let e = ask(
            link.clone(),
            Request::Signal {
                pid: gone_pid,
                signal: libc::SIGTERM,
            },
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("no command runs"), "{e}");

        // A missing program fails at the spawn.
        let e = spawn(&link, opts.request(["no-such-program"]).unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Guest { .. }), "{e}");
    }

    /// Issue 19: a command on a terminal sees one of the asked size, and
    /// of the new size after `resize`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_on_a_terminal_follows_resize() {
        use crate::agent::loopback;
        use futures::StreamExt;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let on_tty = crate::ExecOptions::default().tty(80, 24);
        let r = exec(&link, on_tty.request(["tty"]).unwrap(), 1 << 20, None)
            .await
            .unwrap();
        assert!(r.stdout_lossy().starts_with("/dev/pts/"), "{r:?}");

        let script = ["sh", "-c", "stty size; read x; stty size"];
        let mut p = spawn(&link, on_tty.request(script).unwrap(), None)
            .await
            .unwrap();
        let mut out = String::new();
        let until = async |p: &mut crate::Process, want: &str, out: &mut String| {
            while !out.contains(want) {
                match tokio::time::timeout(Duration::from_secs(10), p.next()).await {
                    Ok(Some(Ok(ExecEvent::Stdout(b)))) => {
                        out.push_str(&String::from_utf8_lossy(&b))
                    }
                    other => panic!("waiting for {want:?} in {out:?}: {other:?}"),
                }
            }
        };
        until(&mut p, "24 80", &mut out).await;
        p.resize(100, 30).await.unwrap();
        p.write_stdin(b"go\n").await.unwrap();
        until(&mut p, "30 100", &mut out).await;
        assert_eq!(p.wait().await.unwrap(), 0);

        let e = crate::ExecOptions::default()
            .tty(0, 5)
            .request(["true"])
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { what: "tty", .. }),
            "{e}"
        );
        let plain = crate::ExecOptions::default();
        let p = spawn(&link, plain.request(["sleep", "100"]).unwrap(), None)
            .await
            .unwrap();
        let e = p.resize(100, 30).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { what: "tty", .. }),
            "{e}"
        );
    }

    #[test]
    fn exit_codes() {
        let st = |code, signal| ExitStatus {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(exit_code(&st(Some(3), None)).unwrap(), 3);
        assert_eq!(exit_code(&st(None, Some(9))).unwrap(), 137);
        assert!(exit_code(&st(None, None)).is_err());
        assert!(exit_code(&st(None, Some(1000))).is_err());
    }
}
