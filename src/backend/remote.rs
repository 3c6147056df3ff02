//! The remote engine's client: a [`Backend`] that drives a machine of a
//! `smol serve` over its HTTP API ([`crate::api`]). Selected by
//! [`ConnectOptions::cloud`](crate::ConnectOptions::cloud) (or
//! `SMOL_CLOUD_TOKEN`), the endpoint from `SMOL_CLOUD_URL` or
//! [`ConnectOptions::endpoint`](crate::ConnectOptions::endpoint).
//!
//! Every call has a deadline except the ones whose length the user chose
//! (an exec without a timeout, a stream, a file transfer): those have a
//! connect deadline and run as long as the data flows. Connection errors
//! are retried only for idempotent calls (GETs). Dropping the last handle
//! made by `create` of a non-persistent machine deletes it, as locally;
//! handles from `connect` leave the machine to its creator.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use smol_protocol::ExecRequest;
use tokio::io::AsyncReadExt;

use super::{Backend, Call, Source};
use crate::api::{
    encode_stdin, CreateMachine, ErrorBody, ExecBody, ExecResultBody, ForkBody, MachineBody,
    PullBody, PullLine, RunBody, StreamEvent, WrittenBody, MODE_HEADER, SIZE_HEADER,
};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::exec::{ExecEvent, ExecOptions, ExecResult, ExecStream, Input};
use crate::files::FileStream;
use crate::image::{ImageInfo, ProgressFn};
use crate::state::{BootTimings, MachineState};

/// Reaching the server at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A create boots (or restores) a machine on the server.
const CREATE_TIMEOUT: Duration = Duration::from_secs(600);
/// State, start, stop, delete.
const CALL_TIMEOUT: Duration = Duration::from_secs(360);
/// Beyond an exec's own timeout, for the server to report it.
const EXEC_GRACE: Duration = Duration::from_secs(60);
/// Retries of an idempotent call whose connection failed.
const RETRIES: usize = 2;
/// Longest NDJSON line of a stream we accept (a 64 KiB chunk in base64
/// and its envelope fit easily).
const MAX_LINE: usize = 1 << 20;
/// Upload chunks.
const CHUNK: usize = 256 * 1024;

/// The HTTP client of one server and key, shared by its machines.
#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    key: Arc<str>,
}

impl std::fmt::Debug for Client {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish()
    }
}

impl Client {
    pub fn new(endpoint: &str, key: &str) -> Result<Client> {
        let base = endpoint.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::InvalidArgument {
                what: "endpoint",
                reason: format!("{endpoint:?} is not an http:// or https:// URL"),
            });
        }
        crate::image::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| Error::Remote {
                code: "client".into(),
                message: format!("building the HTTP client: {e}"),
            })?;
        Ok(Client {
            http,
            base,
            key: key.into(),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}/v1{path}", self.base))
            .bearer_auth(&*self.key)
    }

    /// Sends `build()`'s request; connection failures of idempotent calls
    /// are tried again. A non-success status becomes its [`Error`].
    async fn send(&self, idempotent: bool, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        let mut attempt = 0;
        loop {
            match build().send().await {
                Ok(r) => return check(r).await,
                Err(e) if idempotent && e.is_connect() && attempt < RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            return Error::Timeout {
                what: format!("a request to {}", self.base),
                after: Duration::ZERO,
            };
        }
        Error::Remote {
            code: "unreachable".into(),
            message: format!("{}: {}", self.base, smol_protocol::error_chain(&e)),
        }
    }

    pub async fn create(&self, config: MachineConfig) -> Result<RemoteMachine> {
        let body = CreateMachine { config };
        let r = self
            .send(false, || {
                self.request(Method::POST, "/machines")
                    .json(&body)
                    .timeout(CREATE_TIMEOUT)
            })
            .await?;
        let m: MachineBody = json(r).await?;
        Ok(RemoteMachine::new(self.clone(), m, true))
    }

    /// The key's machines on the server.
    pub async fn list(&self) -> Result<Vec<crate::state::MachineInfo>> {
        let r = self
            .send(true, || {
                self.request(Method::GET, "/machines").timeout(CALL_TIMEOUT)
            })
            .await?;
        let machines: Vec<MachineBody> = json(r).await?;
        Ok(machines
            .into_iter()
            .map(|m| crate::state::MachineInfo {
                name: m.id,
                state: m.state,
                persistent: m.config.persistent,
                created_unix: None,
                config: m.config,
                owner_pid: None,
                unreadable: None,
            })
            .collect())
    }

    pub async fn connect(&self, id: &str) -> Result<RemoteMachine> {
        let path = format!("/machines/{id}");
        let r = self
            .send(true, || {
                self.request(Method::GET, &path).timeout(CALL_TIMEOUT)
            })
            .await?;
        let m: MachineBody = json(r).await?;
        Ok(RemoteMachine::new(self.clone(), m, false))
    }
}

/// A non-success answer as the error its body names.
async fn check(r: Response) -> Result<Response> {
    let status = r.status();
    if status.is_success() {
        return Ok(r);
    }
    let text = r.text().await.unwrap_or_default();
    Err(match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => body.into_error(),
        Err(_) if status == StatusCode::UNAUTHORIZED => Error::Unauthorized(text),
        Err(_) => Error::Remote {
            code: status.as_str().into(),
            message: crate::error::sanitize(&text.chars().take(512).collect::<String>()),
        },
    })
}

async fn json<T: serde::de::DeserializeOwned>(r: Response) -> Result<T> {
    let bytes = r.bytes().await.map_err(|e| Error::Remote {
        code: "bad_answer".into(),
        message: format!("reading the answer: {e}"),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Remote {
        code: "bad_answer".into(),
        message: format!("an answer that is not the expected JSON: {e}"),
    })
}

/// A machine on a `smol serve`. Clones share one [`Owned`]; the last one
/// gone deletes a non-persistent machine.
#[derive(Clone)]
pub(crate) struct RemoteMachine {
    owned: Arc<Owned>,
}

struct Owned {
    client: Client,
    id: String,
    config: MachineConfig,
    /// Made by this handle's `create` (not `connect`): its drop deletes a
    /// non-persistent machine.
    created: bool,
    /// `delete` was called: nothing left for the drop to do.
    deleted: std::sync::atomic::AtomicBool,
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.config.persistent
            || !self.created
            || self.deleted.load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        // Best effort, as the local engine's cleanup: without a runtime
        // (the process is ending) the server's own limits apply.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let req = self
            .client
            .request(Method::DELETE, &format!("/machines/{}", self.id))
            .timeout(CALL_TIMEOUT);
        rt.spawn(async move {
            let _ = req.send().await;
        });
    }
}

impl RemoteMachine {
    fn new(client: Client, m: MachineBody, created: bool) -> RemoteMachine {
        RemoteMachine {
            owned: Arc::new(Owned {
                client,
                id: m.id,
                config: m.config,
                created,
                deleted: Default::default(),
            }),
        }
    }

    fn client(&self) -> &Client {
        &self.owned.client
    }

    fn path(&self, rest: &str) -> String {
        format!("/machines/{}{rest}", self.owned.id)
    }

    /// A GET of `rest` answered with JSON.
    async fn get<T: serde::de::DeserializeOwned>(&self, rest: &str) -> Result<T> {
        let path = self.path(rest);
        let r = self
            .client()
            .send(true, || {
                self.client()
                    .request(Method::GET, &path)
                    .timeout(CALL_TIMEOUT)
            })
            .await?;
        json(r).await
    }

    async fn info(&self) -> Result<MachineBody> {
        self.get("").await
    }

    async fn lifecycle(&self, verb: &str) -> Result<()> {
        let path = self.path(&format!("/{verb}"));
        self.client()
            .send(false, || {
                self.client()
                    .request(Method::POST, &path)
                    .timeout(CALL_TIMEOUT)
            })
            .await
            .map(drop)
    }

    async fn delete(&self) -> Result<()> {
        let path = self.path("");
        self.client()
            .send(true, || {
                self.client()
                    .request(Method::DELETE, &path)
                    .timeout(CALL_TIMEOUT)
            })
            .await?;
        self.owned
            .deleted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn exec_body(req: &ExecRequest, stdin: Option<&Bytes>) -> Result<ExecBody> {
        Ok(ExecBody {
            argv: req.argv.clone(),
            env: req.env.clone(),
            workdir: req.workdir.clone(),
            timeout_ms: req.timeout_ms,
            max_output: None,
            stdin: encode_stdin(stdin)?,
            tty: req.tty,
        })
    }

    async fn exec(
        &self,
        req: ExecRequest,
        max_output: u64,
        stdin: Option<Input>,
    ) -> Result<ExecResult> {
        let stdin = Input::into_bytes(stdin, "the remote engine")?;
        let timeout = req.timeout_ms;
        let body = ExecBody {
            max_output: Some(max_output),
            ..RemoteMachine::exec_body(&req, stdin.as_ref())?
        };
        self.exec_at("/exec", &body, timeout, max_output).await
    }

    /// A collected exec at `rest` (`/exec`, `/run`), with a deadline past
    /// the exec's own timeout when it has one; `max_output` is the bound the
    /// body asks for (the server's error does not carry it).
    async fn exec_at(
        &self,
        rest: &str,
        body: &impl serde::Serialize,
        timeout_ms: Option<u64>,
        max_output: u64,
    ) -> Result<ExecResult> {
        let path = self.path(rest);
        let deadline = timeout_ms.map(|ms| Duration::from_millis(ms) + EXEC_GRACE);
        let r = self
            .client()
            .send(false, || {
                let b = self.client().request(Method::POST, &path).json(body);
                match deadline {
                    Some(d) => b.timeout(d),
                    None => b,
                }
            })
            .await?;
        match json::<ExecResultBody>(r).await {
            Err(Error::OutputTooLarge { program, .. }) => Err(Error::OutputTooLarge {
                program,
                limit: max_output,
            }),
            r => r?.into_result(),
        }
    }

    async fn exec_stream(&self, req: ExecRequest, stdin: Option<Input>) -> Result<ExecStream> {
        let stdin = Input::into_bytes(stdin, "the remote engine")?;
        let body = RemoteMachine::exec_body(&req, stdin.as_ref())?;
        self.stream_at("/exec/stream", &body).await
    }

    /// A streamed exec at `rest` (`/exec/stream`, `/run/stream`).
    async fn stream_at(&self, rest: &str, body: &impl serde::Serialize) -> Result<ExecStream> {
        let path = self.path(rest);
        let r = self
            .client()
            .send(false, || {
                self.client().request(Method::POST, &path).json(body)
            })
            .await?;
        let mut lines = ndjson_lines::<StreamEvent>(r);
        // The first line says the program started (or why it did not).
        let pid = match lines.next().await {
            Some(Ok(StreamEvent::Started { pid })) => pid,
            Some(Ok(StreamEvent::Failed { error })) => return Err(error.into_error()),
            Some(Ok(other)) => return Err(bad_answer(format!("a stream began with {other:?}"))),
            Some(Err(e)) => return Err(e),
            None => return Err(bad_answer("an empty stream".into())),
        };
        let keep = self.clone();
        let events = async_stream::stream! {
            let _keep = keep;
            while let Some(line) = lines.next().await {
                let ev = match line {
                    Ok(StreamEvent::Stdout { data }) => crate::api::unb64(&data).map(ExecEvent::Stdout),
                    Ok(StreamEvent::Stderr { data }) => crate::api::unb64(&data).map(ExecEvent::Stderr),
                    Ok(StreamEvent::Exit { code }) => {
                        yield Ok(ExecEvent::Exit(code));
                        break;
                    }
                    Ok(StreamEvent::Error { message }) => Ok(ExecEvent::Error(message)),
                    Ok(StreamEvent::Failed { error }) => Err(error.into_error()),
                    Ok(StreamEvent::Started { .. }) => Err(bad_answer("a second start".into())),
                    Err(e) => Err(e),
                };
                let end = ev.is_err();
                yield ev;
                if end {
                    break;
                }
            }
        };
        Ok(ExecStream::new(pid, Box::pin(events)))
    }

    async fn fork(&self, name: &str) -> Result<RemoteMachine> {
        let path = self.path("/fork");
        let body = ForkBody { name: name.into() };
        let r = self
            .client()
            .send(false, || {
                self.client()
                    .request(Method::POST, &path)
                    .json(&body)
                    .timeout(CREATE_TIMEOUT)
            })
            .await?;
        let m: MachineBody = json(r).await?;
        Ok(RemoteMachine::new(self.client().clone(), m, true))
    }

    async fn pull_image(&self, reference: &str, progress: Option<ProgressFn>) -> Result<ImageInfo> {
        let path = self.path("/images/pull");
        let body = PullBody {
            reference: reference.into(),
        };
        let r = self
            .client()
            .send(false, || {
                self.client().request(Method::POST, &path).json(&body)
            })
            .await?;
        let mut lines = ndjson_lines::<PullLine>(r);
        while let Some(line) = lines.next().await {
            match line? {
                PullLine::Progress { event } => {
                    if let Some(p) = &progress {
                        p(&event);
                    }
                }
                PullLine::Done { image } => return Ok(image),
                PullLine::Failed { error } => return Err(error.into_error()),
            }
        }
        Err(bad_answer("a pull that ended without its result".into()))
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        self.get("/images").await
    }

    fn run_body(image: &str, argv: Vec<String>, options: &ExecOptions) -> Result<RunBody> {
        Ok(RunBody {
            image: image.into(),
            exec: ExecBody::new(argv, options)?,
        })
    }

    async fn write_file(&self, path: &str, mode: Option<u32>, mut src: Source<'_>) -> Result<u64> {
        // The body is a channel fed from `src` in this same future, so that
        // `src` need not be 'static.
        let (tx, rx) = futures::channel::mpsc::channel::<std::io::Result<Bytes>>(4);
        let body = reqwest::Body::wrap_stream(rx);
        let mut query = vec![("path", path.to_string())];
        if let Some(m) = mode {
            query.push(("mode", format!("{m:o}")));
        }
        let req = self
            .client()
            .request(Method::PUT, &self.path("/files"))
            .query(&query)
            .body(body)
            .send();
        let pump = async move {
            let mut tx = tx;
            let mut total = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match src.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        // The body fails, not ends: the server must not
                        // keep a truncated file.
                        let cut = std::io::Error::other("the upload's source failed");
                        let _ = futures::SinkExt::send(&mut tx, Err(cut)).await;
                        return Err(Error::io(format!("reading the data for {path}"), e));
                    }
                };
                if n == 0 {
                    return Ok::<u64, Error>(total);
                }
                buf.truncate(n);
                total += n as u64;
                if futures::SinkExt::send(&mut tx, Ok(Bytes::from(buf)))
                    .await
                    .is_err()
                {
                    // The request ended early; its answer says why.
                    return Ok(total);
                }
            }
        };
        let (sent, answer) = tokio::join!(pump, req);
        // The source's own failure first: it is why the request broke.
        let total = sent?;
        let answer = answer.map_err(|e| self.client().unreachable(e))?;
        let written: WrittenBody = json(check(answer).await?).await?;
        if written.size != total {
            return Err(bad_answer(format!(
                "sent {total} bytes, the server wrote {}",
                written.size
            )));
        }
        Ok(written.size)
    }

    async fn read_file_stream(&self, path: &str) -> Result<FileStream> {
        let url = self.path("/files");
        let r = self
            .client()
            .send(true, || {
                self.client()
                    .request(Method::GET, &url)
                    .query(&[("path", path)])
            })
            .await?;
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = header(SIZE_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mode = header(MODE_HEADER)
            .and_then(|v| u32::from_str_radix(&v, 8).ok())
            .unwrap_or(0o644);
        let keep = self.clone();
        let base = self.client().base.clone();
        let chunks = r.bytes_stream().map(move |c| {
            let _ = &keep;
            c.map_err(|e| Error::Remote {
                code: "unreachable".into(),
                message: format!("{base}: reading the file: {e}"),
            })
        });
        Ok(FileStream::new(size, mode, chunks.boxed()))
    }
}

fn bad_answer(message: String) -> Error {
    Error::Remote {
        code: "bad_answer".into(),
        message,
    }
}

/// The events of an NDJSON answer, line by line, each at most [`MAX_LINE`].
fn ndjson_lines<T: serde::de::DeserializeOwned + Send + 'static>(
    r: Response,
) -> futures::stream::BoxStream<'static, Result<T>> {
    let mut bytes = r.bytes_stream();
    async_stream::stream! {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let line = &line[..line.len() - 1];
                if line.is_empty() {
                    continue;
                }
                yield serde_json::from_slice::<T>(line)
                    .map_err(|e| bad_answer(format!("a stream line that is not the expected JSON: {e}")));
            }
            if buf.len() > MAX_LINE {
                yield Err(bad_answer(format!("a stream line over {MAX_LINE} bytes")));
                return;
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    yield Err(Error::Remote {
                        code: "unreachable".into(),
                        message: format!("the stream broke: {e}"),
                    });
                    return;
                }
                None => {
                    if !buf.is_empty() {
                        yield Err(bad_answer("a stream that ends mid-line".into()));
                    }
                    return;
                }
            }
        }
    }
    .boxed()
}

impl Backend for RemoteMachine {
    fn name(&self) -> &str {
        &self.owned.id
    }

    fn config(&self) -> &MachineConfig {
        &self.owned.config
    }

    fn dir(&self) -> Option<&Path> {
        None
    }

    fn console_log_path(&self) -> Option<&Path> {
        None
    }

    fn state(&self) -> Call<'_, MachineState> {
        async { Ok(self.info().await?.state) }.boxed()
    }

    fn boot_timings(&self) -> Call<'_, Option<BootTimings>> {
        async { Ok(None) }.boxed()
    }

    fn start(&self) -> Call<'_, ()> {
        self.lifecycle("start").boxed()
    }

    fn stop(&self) -> Call<'_, ()> {
        self.lifecycle("stop").boxed()
    }

    fn delete(&self) -> Call<'_, ()> {
        RemoteMachine::delete(self).boxed()
    }

    /// The server's listeners: addresses on the server's host.
    fn ports(&self) -> Call<'_, Vec<crate::PortMapping>> {
        self.get("/ports").boxed()
    }

    /// The first forwarded port at the host this client reaches the
    /// server by (the server listens for it on its own address).
    fn url(&self) -> Call<'_, Option<String>> {
        async {
            let ports: Vec<crate::PortMapping> = self.get("/ports").await?;
            let Some(first) = ports.first() else {
                return Ok(None);
            };
            Ok(Some(port_url(&self.client().base, first.host)?))
        }
        .boxed()
    }

    fn exec(
        &self,
        req: ExecRequest,
        max_output: u64,
        stdin: Option<Input>,
    ) -> Call<'_, ExecResult> {
        RemoteMachine::exec(self, req, max_output, stdin).boxed()
    }

    fn exec_stream(&self, req: ExecRequest, stdin: Option<Input>) -> Call<'_, ExecStream> {
        RemoteMachine::exec_stream(self, req, stdin).boxed()
    }

    fn spawn(&self, _req: ExecRequest, _stdin: Option<Input>) -> Call<'_, crate::Process> {
        async {
            Err(Error::Unsupported(
                "Machine::spawn on the remote engine (input while a command runs needs a \
                 two-way stream; exec with ExecOptions::stdin works there)"
                    .into(),
            ))
        }
        .boxed()
    }

    fn write_file<'a>(
        &'a self,
        path: &'a str,
        mode: Option<u32>,
        src: Source<'a>,
    ) -> Call<'a, u64> {
        RemoteMachine::write_file(self, path, mode, src).boxed()
    }

    fn read_file<'a>(&'a self, path: &'a str) -> Call<'a, Bytes> {
        async move { self.read_file_stream(path).await?.bytes().await }.boxed()
    }

    fn read_file_stream<'a>(&'a self, path: &'a str) -> Call<'a, FileStream> {
        RemoteMachine::read_file_stream(self, path).boxed()
    }

    fn pull_image<'a>(
        &'a self,
        reference: &'a str,
        progress: Option<ProgressFn>,
    ) -> Call<'a, ImageInfo> {
        RemoteMachine::pull_image(self, reference, progress).boxed()
    }

    fn list_images(&self) -> Call<'_, Vec<ImageInfo>> {
        RemoteMachine::list_images(self).boxed()
    }

    fn run<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecResult> {
        async move {
            let timeout = options
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
            let body = RemoteMachine::run_body(image, argv, &options)?;
            self.exec_at("/run", &body, timeout, options.output_limit())
                .await
        }
        .boxed()
    }

    fn run_stream<'a>(
        &'a self,
        image: &'a str,
        argv: Vec<String>,
        options: ExecOptions,
    ) -> Call<'a, ExecStream> {
        async move {
            let body = RemoteMachine::run_body(image, argv, &options)?;
            self.stream_at("/run/stream", &body).await
        }
        .boxed()
    }

    fn snapshot<'a>(&'a self, _dir: &'a Path) -> Call<'a, crate::SnapshotTimings> {
        async {
            Err(Error::Unsupported(
                "snapshot to a local directory of a remote machine".into(),
            ))
        }
        .boxed()
    }

    fn fork<'a>(&'a self, name: &'a str) -> Call<'a, Arc<dyn Backend>> {
        async move {
            let clone = RemoteMachine::fork(self, name).await?;
            Ok(Arc::new(clone) as Arc<dyn Backend>)
        }
        .boxed()
    }
}

/// `http://<the endpoint's host>:<port>/`.
fn port_url(endpoint: &str, port: u16) -> Result<String> {
    let url = reqwest::Url::parse(endpoint).map_err(|e| Error::InvalidArgument {
        what: "endpoint",
        reason: format!("{endpoint:?}: {e}"),
    })?;
    // An IPv6 host comes with its brackets.
    let host = url.host_str().ok_or_else(|| Error::InvalidArgument {
        what: "endpoint",
        reason: format!("{endpoint:?} has no host"),
    })?;
    Ok(format!("http://{host}:{port}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_url_is_at_the_endpoints_host() {
        assert_eq!(
            port_url("http://127.0.0.1:7100", 40123).unwrap(),
            "http://127.0.0.1:40123/"
        );
        assert_eq!(
            port_url("https://smol.example:443/", 8080).unwrap(),
            "http://smol.example:8080/"
        );
        assert_eq!(port_url("http://[::1]:7100", 9).unwrap(), "http://[::1]:9/");
        assert!(port_url("not a url", 1).is_err());
    }
}
