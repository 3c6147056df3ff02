//! An exec on its own agent connection: the request, `Started`, then
//! output frames until the exit (or the agent's error).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use smol_protocol::{asyncio, AgentError, ExecRequest, ExitStatus, FrameKind, Request, Response};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{parse, unexpected, AgentConnection, AgentLink};
use crate::error::{Error, Result};
use crate::exec::{BoxReader, ExecEvent, ExecResult, ExecStream, Input};
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
pub(crate) const STDIN_CHUNK: usize = 64 << 10;

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
    /// Why the feeder's reader failed, once it did: the feeder then shut
    /// the connection, and that error is the exec's.
    input_failure: Arc<Mutex<Option<Error>>>,
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
    stdin: Option<Input>,
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
    stdin: Option<Input>,
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
    stdin: Option<Input>,
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
        let connection = running.second_handle()?;
        Ok::<_, Error>((running, writer, connection))
    };
    match started.await {
        Ok((running, writer, connection)) => {
            let to = link.clone();
            let ask: Ask = Box::new(move |req| ask(to.clone(), req).boxed());
            Ok(Process::new(
                running.into_stream(link.clone()),
                writer,
                connection,
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
        Request::Detach { pid } => format!("detaching pid {pid}"),
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
        stdin: Option<Input>,
    ) -> Result<Self> {
        if req.stdin != stdin.is_some() {
            return Err(Error::Internal(format!(
                "exec of {:?}: the request's stdin flag ({}) does not match the input given",
                req.argv[0], req.stdin
            )));
        }
        let mut running = Self::open(link, req).await?;
        if let Some(input) = stdin {
            let writer = StdinWriter::new(&mut running)?;
            let failure = running.input_failure.clone();
            running._feeder = Some(Feeder::start(writer, input, failure));
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
            input_failure: Arc::default(),
        })
    }

    async fn next(&mut self) -> Result<Raw> {
        let read = self.next_frame().await;
        // A stdin reader that failed shut the connection: its error, not
        // the closed connection, is what went wrong. (Frames read before
        // the end still count.)
        if read.is_err() {
            let failed = self
                .input_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(e) = failed {
                return Err(e);
            }
        }
        read
    }

    /// A second fd of the exec's connection (the same socket).
    fn second_handle(&mut self) -> Result<std::os::unix::net::UnixStream> {
        use std::os::fd::AsFd;
        let fd = self
            .conn
            .stream()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| self.second_handle_error(source))?;
        Ok(std::os::unix::net::UnixStream::from(fd))
    }

    fn second_handle_error(&self, source: std::io::Error) -> Error {
        Error::Io {
            context: format!(
                "cannot open a second handle on the exec connection to machine {:?}",
                self.conn.machine()
            ),
            source,
        }
    }

    async fn next_frame(&mut self) -> Result<Raw> {
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
    ///
    /// A reader is read a frame at a time, as the agent takes them. If it
    /// fails, its error goes to `failure` and the connection is shut: the
    /// agent kills the command, and the exec fails with that error rather
    /// than give the command a truncated input as if it were whole.
    fn start(mut writer: StdinWriter, input: Input, failure: Arc<Mutex<Option<Error>>>) -> Feeder {
        Feeder(tokio::spawn(async move {
            let sent = match input {
                Input::Bytes(b) => writer.write(&b).await,
                Input::Reader(reader) => match copy_reader(reader, &mut writer).await {
                    Ok(sent) => sent,
                    Err(e) => {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        writer.shut();
                        return;
                    }
                },
            };
            if sent.is_ok() {
                let _ = writer.close().await;
            }
        }))
    }
}

/// Copies `reader` to `writer` until the reader ends. The outer error is
/// the reader's; the inner result is the writes' (a command that stopped
/// taking its input is not the reader's fault).
async fn copy_reader(mut reader: BoxReader, writer: &mut StdinWriter) -> Result<Result<()>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let n = reader.read(&mut buf).await.map_err(|source| Error::Io {
            context: format!(
                "reading the stdin of {:?} on machine {:?} from its reader",
                writer.program, writer.machine
            ),
            source,
        })?;
        if n == 0 {
            return Ok(Ok(()));
        }
        if let Err(e) = writer.write(&buf[..n]).await {
            return Ok(Err(e));
        }
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
        let std = running.second_handle()?;
        let stream = std
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(std))
            .map_err(|source| running.second_handle_error(source))?;
        Ok(StdinWriter {
            stream,
            machine: running.conn.machine().to_string(),
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

    /// Shuts the whole exec connection (both ways, for this handle and the
    /// exec's own): the agent then kills the command.
    fn shut(self) {
        if let Ok(std) = self.stream.into_std() {
            let _ = std.shutdown(std::net::Shutdown::Both);
        }
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

    /// `spawn` and `exec_stream` of `argv` with the input of `opts`.
    async fn spawn_of(
        link: &crate::agent::loopback::Link,
        opts: &crate::ExecOptions,
        argv: &[&str],
    ) -> Process {
        spawn(
            link,
            opts.request(argv).unwrap(),
            opts.take_input().unwrap(),
        )
        .await
        .unwrap()
    }

    async fn stream_of(
        link: &crate::agent::loopback::Link,
        opts: &crate::ExecOptions,
        argv: &[&str],
    ) -> ExecStream {
        exec_stream(
            link,
            opts.request(argv).unwrap(),
            opts.take_input().unwrap(),
        )
        .await
        .unwrap()
    }

    /// The stdout of `events` to their end, and the exit code; stderr or
    /// an error event fails the test.
    async fn stdout_and_exit<S>(events: &mut S) -> (Vec<u8>, Option<i32>)
    where
        S: futures::Stream<Item = Result<ExecEvent>> + Unpin,
    {
        let mut out = Vec::new();
        let mut code = None;
        while let Some(ev) = futures::StreamExt::next(events).await {
            match ev.unwrap() {
                ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                ExecEvent::Exit(c) => code = Some(c),
                other => panic!("{other:?}"),
            }
        }
        (out, code)
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
            async move {
                exec(link, req, 64 << 20, opts.take_input().unwrap())
                    .await
                    .unwrap()
            }
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
        let mut stream = stream_of(&link, &opts, &["cat"]).await;
        let (got, code) = stdout_and_exit(&mut stream).await;
        assert_eq!(code, Some(0));
        assert!(
            got == noise[..300_000],
            "the stream gave {} bytes",
            got.len()
        );

        // The flag and the input go together.
        let req = crate::ExecOptions::default().request(["cat"]).unwrap();
        let e = exec(
            &link,
            req,
            1 << 20,
            Some(Input::Bytes(Bytes::from_static(b"x"))),
        )
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
        let mut p = spawn_of(&link, &given, &["cat"]).await;
        assert!(p.write_stdin(b"more").await.is_err());
        let (out, _) = stdout_and_exit(&mut p).await;
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

    /// A reader that gives `good` bytes, then fails.
    struct FailingReader {
        good: usize,
    }

    impl tokio::io::AsyncRead for FailingReader {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.good == 0 {
                return std::task::Poll::Ready(Err(std::io::Error::other("the disk went away")));
            }
            let n = self.good.min(buf.remaining());
            buf.put_slice(&vec![b'x'; n]);
            self.good -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// Issue 19: stdin from an `AsyncRead` is streamed as the command takes
    /// it (no size cap, none of it held whole), in a collected exec, a
    /// stream and a spawn; a reader that fails fails the exec with its
    /// error and kills the command; a reader serves one exec.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_is_streamed_to_stdin() {
        use crate::agent::loopback;
        use sha2::Digest;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let noise: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let want = hex::encode(sha2::Sha256::digest(&noise));

        let opts = crate::ExecOptions::default().stdin_reader(std::io::Cursor::new(noise.clone()));
        let req = opts.request(["sha256sum"]).unwrap();
        assert!(req.stdin);
        let r = exec(&link, req, 1 << 20, opts.take_input().unwrap())
            .await
            .unwrap();
        assert_eq!(r.stdout_lossy().split_whitespace().next(), Some(&*want));
        // The options' reader is used up; clones share it.
        let again = opts.clone().take_input().err().unwrap();
        assert!(
            matches!(
                &again,
                Error::InvalidArgument {
                    what: "stdin_reader",
                    ..
                }
            ),
            "{again}"
        );
        let both = crate::ExecOptions::default()
            .stdin("x")
            .stdin_reader(tokio::io::empty())
            .take_input()
            .err()
            .unwrap();
        assert!(
            matches!(&both, Error::InvalidArgument { what: "stdin", .. }),
            "{both}"
        );

        // A reader fed as it goes (a pipe): cat gives it back whole, in a
        // stream.
        let (mut tx, rx) = tokio::io::duplex(4096);
        let feed = noise[..500_000].to_vec();
        let feeder = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in feed.chunks(7000) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let opts = crate::ExecOptions::default().stdin_reader(rx);
        let mut stream = stream_of(&link, &opts, &["cat"]).await;
        let (got, code) = stdout_and_exit(&mut stream).await;
        assert_eq!(code, Some(0));
        feeder.await.unwrap();
        assert!(got == noise[..500_000], "cat gave back {} bytes", got.len());

        // A spawn takes a reader too, and its stdin is then closed to writes.
        let opts =
            crate::ExecOptions::default().stdin_reader(std::io::Cursor::new(b"abc".to_vec()));
        let mut p = spawn_of(&link, &opts, &["wc", "-c"]).await;
        assert!(p.write_stdin(b"more").await.is_err());
        let (out, _) = stdout_and_exit(&mut p).await;
        assert_eq!(String::from_utf8_lossy(&out).trim(), "3");

        // A reader that fails: the exec fails with its error, and the
        // command (which would wait for more input) is killed.
        let argv = ["sh", "-c", "cat >/dev/null; sleep 1000"];
        let opts = crate::ExecOptions::default().stdin_reader(FailingReader { good: 200_000 });
        let failed = exec(
            &link,
            opts.request(argv).unwrap(),
            1 << 20,
            opts.take_input().unwrap(),
        );
        let e = tokio::time::timeout(Duration::from_secs(30), failed)
            .await
            .expect("the exec went on after its reader failed")
            .unwrap_err();
        assert!(
            matches!(&e, Error::Io { context, .. } if context.contains("reading the stdin of \"sh\"")),
            "{e:?}"
        );
        assert!(format!("{:?}", e).contains("the disk went away"), "{e:?}");
        assert_gone(&argv).await;
    }

    /// Issue 19: a `Process` is an `AsyncWrite` onto its stdin
    /// (`tokio::io::copy` into it, shutdown ends it), and its stdin can be
    /// taken to another task, so one writes while the other reads a
    /// command that answers as it reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_is_an_async_write() {
        use crate::agent::loopback;
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let opts = crate::ExecOptions::default();
        let noise: Vec<u8> = (0..2u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
            .collect();

        let mut p = spawn(&link, opts.request(["sha256sum"]).unwrap(), None)
            .await
            .unwrap();
        let copied = tokio::io::copy(&mut std::io::Cursor::new(noise.clone()), &mut p)
            .await
            .unwrap();
        assert_eq!(copied, noise.len() as u64);
        p.shutdown().await.unwrap();
        // Idempotent, and the end is an end for the methods too.
        p.shutdown().await.unwrap();
        let late = p.write_stdin(b"late").await.unwrap_err();
        assert!(
            matches!(&late, Error::InvalidArgument { what: "stdin", .. }),
            "{late}"
        );
        let (out, _) = stdout_and_exit(&mut p).await;
        let want = hex::encode(sha2::Sha256::digest(&noise));
        assert_eq!(
            String::from_utf8_lossy(&out).split_whitespace().next(),
            Some(&*want)
        );

        // cat echoes as it reads: 2 MiB through it needs the writer and the
        // reader at once, far past what the pipes hold.
        let mut p = spawn(&link, opts.request(["cat"]).unwrap(), None)
            .await
            .unwrap();
        let mut stdin = p.take_stdin().unwrap();
        assert!(p.take_stdin().is_none());
        assert!(p.write_stdin(b"x").await.is_err());
        let input = noise.clone();
        let writer = tokio::spawn(async move {
            for piece in input.chunks(100_000) {
                stdin.write_all(piece).await.unwrap();
            }
            stdin.shutdown().await.unwrap();
        });
        let (got, code) = stdout_and_exit(&mut p).await;
        writer.await.unwrap();
        assert_eq!(code, Some(0));
        assert!(got == noise, "cat gave back {} bytes", got.len());

        // The command ends with its Process, even while its stdin, taken,
        // lives on (it holds the connection's socket too).
        let argv = ["sleep", "1001"];
        let mut p = spawn_of(&link, &opts, &argv).await;
        let mut stdin = p.take_stdin().unwrap();
        drop(p);
        assert_gone(&argv).await;
        assert!(stdin.write(b"x").await.is_err());
    }

    /// Waits up to 20 s for `path` to hold `want`.
    async fn wait_for_file(path: &std::path::Path, want: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if std::fs::read_to_string(path).is_ok_and(|s| s.trim() == want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never held {want:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Issue 19: a detached process outlives its handle: it is not killed,
    /// its output (far past what a pipe holds) is drained, and its stdin
    /// ends. Detaching one that has ended is the agent's named error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_detached_process_outlives_its_handle() {
        use crate::agent::loopback;
        let t = tempfile::tempdir().unwrap();
        let link = loopback::Link::new(t.path());
        let opts = crate::ExecOptions::default();
        let loud = t.path().join("loud");
        let script = format!(
            "sleep 0.3; head -c 2000000 /dev/zero; echo done > {}",
            loud.display()
        );
        let p = spawn(&link, opts.request(["sh", "-c", &script]).unwrap(), None)
            .await
            .unwrap();
        let pid = p.pid();
        assert_eq!(p.detach().await.unwrap(), pid);
        wait_for_file(&loud, "done").await;

        let eof = t.path().join("eof");
        let script = format!("cat >/dev/null; echo eof > {}", eof.display());
        let mut p = spawn(&link, opts.request(["sh", "-c", &script]).unwrap(), None)
            .await
            .unwrap();
        p.write_stdin(b"some input").await.unwrap();
        p.detach().await.unwrap();
        wait_for_file(&eof, "eof").await;

        let mut p = spawn(&link, opts.request(["true"]).unwrap(), None)
            .await
            .unwrap();
        assert_eq!(stdout_and_exit(&mut p).await, (Vec::new(), Some(0)));
        let e = p.detach().await.unwrap_err();
        assert!(format!("{e}").contains("no command runs with pid"), "{e}");
    }
}
