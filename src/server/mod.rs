//! `smol serve`: the local engine behind an HTTP API (axum over hyper), so
//! that the same [`Machine`] API drives it from elsewhere through the
//! remote backend. The API is described in [`crate::api`].
//!
//! Each request needs a current API key ([`keys`]); a key sees only the
//! machines it created, another key's machine answers 404. The OpenAPI
//! document is at `/v1/openapi.json` (no key needed). Streams (exec
//! output, file bodies) flow as the guest produces or takes them, with no
//! size cap and bounded memory. On shutdown the server stops accepting,
//! lets the requests in flight end, then deletes its non-persistent
//! machines and stops the persistent ones.

pub mod keys;
mod openapi;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use crate::api::{
    CreateMachine, ErrorBody, ExecBody, ExecResultBody, ForkBody, MachineBody, PullBody, PullLine,
    RunBody, StreamEvent, WrittenBody, MODE_HEADER, SIZE_HEADER,
};
use crate::config::ConnectOptions;
use crate::error::{Error, Result};
use crate::exec::ExecStream;
use crate::image::{Digest, ImageInfo, ImageSource};
use crate::machine::Machine;
use keys::KeyStore;

/// The name of the key a request came with.
#[derive(Clone)]
struct Owner(String);

struct Entry {
    machine: Machine,
    owner: String,
}

#[derive(Clone)]
struct AppState {
    home: PathBuf,
    keys: KeyStore,
    /// The address the server listens on: machines' forwarded ports
    /// listen there too, where the server's clients reach them.
    listen_ip: std::net::IpAddr,
    machines: Arc<Mutex<HashMap<String, Entry>>>,
}

impl AppState {
    /// Keeps a new machine of `owner`'s and describes it.
    async fn adopt(&self, m: Machine, owner: Owner) -> Result<Json<MachineBody>, ApiError> {
        let body = describe(&m).await?;
        self.machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                body.id.clone(),
                Entry {
                    machine: m,
                    owner: owner.0,
                },
            );
        Ok(Json(body))
    }

    fn lookup(&self, owner: &Owner, id: &str) -> Result<Machine, ApiError> {
        let machines = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        match machines.get(id) {
            Some(e) if e.owner == owner.0 => Ok(e.machine.clone()),
            // Another key's machine is as absent as a missing one.
            _ => Err(ApiError(Error::NotFound { name: id.into() })),
        }
    }
}

/// The machine a request's `{id}` names, when the request's key owns it
/// (another key's machine is as absent as a missing one).
struct Target(Machine);

impl FromRequestParts<AppState> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, s)
            .await
            .map_err(|e| {
                ApiError(Error::InvalidArgument {
                    what: "id",
                    reason: e.to_string(),
                })
            })?;
        let owner = parts
            .extensions
            .get::<Owner>()
            .cloned()
            .ok_or_else(|| ApiError(Error::Unauthorized("no key".into())))?;
        Ok(Target(s.lookup(&owner, &id)?))
    }
}

/// An [`Error`] as an HTTP answer: its status and [`ErrorBody`].
struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = ErrorBody::of(&self.0);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(body)).into_response()
    }
}

/// A JSON request body, refused with a named error when it is not one.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(Error::InvalidArgument {
            what: "body",
            reason: format!("not the expected JSON: {e}"),
        })
    })
}

/// Serves the API on `listener` until `shutdown` completes; machines live
/// in the store under `home` (`SMOL_HOME`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    home: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listen_ip = listener
        .local_addr()
        .map_err(|e| Error::io("the server's listen address", e))?
        .ip();
    let state = AppState {
        keys: KeyStore::new(&home),
        listen_ip,
        home,
        machines: Arc::default(),
    };
    let app = router(state.clone());
    let sweeper = tokio::spawn(sweep(state.clone()));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    // Machines are the server's to clean up, whatever ended the serving.
    let entries: Vec<Entry> = state
        .machines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, e)| e)
        .collect();
    for e in entries {
        let persistent = e.machine.config().persistent;
        let r = if persistent {
            e.machine.stop().await
        } else {
            e.machine.delete().await
        };
        if let Err(err) = r {
            tracing::warn!(target: "smol::serve", machine = %e.machine.name(), "at shutdown: {err}");
        }
    }
    served.map_err(|e| Error::io("serving HTTP", e))
}

/// How often the server forgets machines that are gone (a `ttl_seconds`
/// passed), so that its table does not grow.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

async fn sweep(state: AppState) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let all: Vec<(String, Machine)> = state
            .machines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, e)| (id.clone(), e.machine.clone()))
            .collect();
        for (id, m) in all {
            // By its directory, not by asking it: a question would count
            // as a request and keep an idle machine from its auto-stop.
            if m.dir().is_some_and(|d| !d.exists()) {
                state
                    .machines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
        }
    }
}

fn exec_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(crate::api::MAX_EXEC_BODY)
}

fn router(state: AppState) -> Router {
    let machines = Router::new()
        .route("/machines", post(create).get(list))
        .route("/machines/{id}", get(info).delete(delete))
        .route("/machines/{id}/start", post(start))
        .route("/machines/{id}/stop", post(stop))
        // Exec and run bodies carry stdin, past axum's default 2 MiB.
        .route("/machines/{id}/exec", post(exec).layer(exec_limit()))
        .route(
            "/machines/{id}/exec/stream",
            post(exec_stream).layer(exec_limit()),
        )
        .route("/machines/{id}/files", get(read_file).put(write_file))
        .route("/machines/{id}/fork", post(fork))
        .route("/machines/{id}/ports", get(ports))
        .route("/machines/{id}/images", get(list_images))
        .route("/machines/{id}/images/pull", post(pull_image))
        .route("/machines/{id}/run", post(run).layer(exec_limit()))
        .route(
            "/machines/{id}/run/stream",
            post(run_stream).layer(exec_limit()),
        )
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        // Added after the key check: the document needs no key.
        .route("/openapi.json", get(|| async { Json(openapi::document()) }))
        .with_state(state);
    Router::new()
        .nest("/v1", machines)
        .fallback(|| async {
            ApiError(Error::NotFound {
                name: "no such API path".into(),
            })
        })
        .layer(middleware::from_fn(log))
}

/// One line per request: method, path, status, time. No header is logged
/// (the key is in one).
async fn log(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let begin = Instant::now();
    let r = next.run(req).await;
    tracing::info!(
        target: "smol::serve",
        %method,
        %path,
        status = r.status().as_u16(),
        ms = begin.elapsed().as_millis() as u64,
        "request"
    );
    r
}

async fn auth(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| k.trim().to_string());
    let owner = match key {
        Some(k) => {
            let keys = s.keys.clone();
            tokio::task::spawn_blocking(move || keys.verify(&k))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    match owner {
        Some(o) => {
            req.extensions_mut().insert(Owner(o));
            next.run(req).await
        }
        None => ApiError(Error::Unauthorized(
            "a current API key is needed (Authorization: Bearer smk_…; `smol key create NAME`)"
                .into(),
        ))
        .into_response(),
    }
}

async fn describe(m: &Machine) -> Result<MachineBody, ApiError> {
    Ok(MachineBody {
        id: m.name().to_string(),
        state: m.state().await?,
        config: m.config().clone(),
    })
}

async fn create(
    State(s): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Bytes,
) -> Result<Json<MachineBody>, ApiError> {
    let CreateMachine { mut config } = parse(&body)?;
    for p in &mut config.ports {
        if p.address.is_some() {
            return Err(ApiError(Error::InvalidConfig {
                field: "ports",
                reason:
                    "a remote client cannot choose the address: ports listen on the server's own"
                        .into(),
            }));
        }
        p.address = Some(s.listen_ip);
    }
    if !config.mounts.is_empty() {
        return Err(ApiError(Error::InvalidConfig {
            field: "mounts",
            reason: "a remote client cannot share directories: its paths would name \
                     directories of the server's host, not its own (mounts are for the local engine)"
                .into(),
        }));
    }
    let m = Machine::create_with(config, ConnectOptions::local().home(&s.home)).await?;
    s.adopt(m, owner).await
}

async fn list(
    State(s): State<AppState>,
    Extension(owner): Extension<Owner>,
) -> Result<Json<Vec<MachineBody>>, ApiError> {
    let mine: Vec<Machine> = {
        let machines = s.machines.lock().unwrap_or_else(|p| p.into_inner());
        machines
            .values()
            .filter(|e| e.owner == owner.0)
            .map(|e| e.machine.clone())
            .collect()
    };
    let mut out = Vec::with_capacity(mine.len());
    for m in &mine {
        out.push(describe(m).await?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(out))
}

async fn info(Target(m): Target) -> Result<Json<MachineBody>, ApiError> {
    Ok(Json(describe(&m).await?))
}

async fn delete(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Target(m): Target,
) -> Result<StatusCode, ApiError> {
    m.delete().await?;
    s.machines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    Ok(StatusCode::NO_CONTENT)
}

async fn start(Target(m): Target) -> Result<Json<MachineBody>, ApiError> {
    m.start().await?;
    Ok(Json(describe(&m).await?))
}

async fn stop(Target(m): Target) -> Result<Json<MachineBody>, ApiError> {
    m.stop().await?;
    Ok(Json(describe(&m).await?))
}

async fn exec(Target(m): Target, body: Bytes) -> Result<Json<ExecResultBody>, ApiError> {
    let req: ExecBody = parse(&body)?;
    let r = m.exec_with(&req.argv, req.options()?).await?;
    Ok(Json(ExecResultBody::from(&r)))
}

fn ndjson(ev: &impl serde::Serialize) -> Bytes {
    let mut line = serde_json::to_vec(ev).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn exec_stream(Target(m): Target, body: Bytes) -> Result<Response, ApiError> {
    let req: ExecBody = parse(&body)?;
    // A program that cannot start is an error answer, not a stream.
    let stream = m.exec_stream_with(&req.argv, req.options()?).await?;
    Ok(stream_response(stream))
}

/// A running exec as chunked NDJSON: `started`, then its events live.
fn stream_response(stream: ExecStream) -> Response {
    let started = ndjson(&StreamEvent::Started { pid: stream.pid() });
    let events = stream.map(|ev| match ev {
        Ok(ev) => ndjson(&StreamEvent::from_event(&ev)),
        Err(e) => ndjson(&StreamEvent::Failed {
            error: ErrorBody::of(&e).1,
        }),
    });
    let lines = futures::stream::once(async move { started }).chain(events);
    ndjson_response(lines)
}

fn ndjson_response(lines: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    let mut r = Response::new(Body::from_stream(lines.map(Ok::<_, Infallible>)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

#[derive(Deserialize)]
struct FileQuery {
    path: String,
    /// Octal permission bits, e.g. `755`.
    mode: Option<String>,
}

/// The query of a file request, refused with our error body (not axum's
/// plain text) when it is not one.
fn file_query(q: Result<Query<FileQuery>, QueryRejection>) -> Result<FileQuery, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError(Error::InvalidArgument {
            what: "path",
            reason: format!("the query must be ?path=<guest path>[&mode=<octal>]: {e}"),
        })
    })
}

async fn write_file(
    Target(m): Target,
    q: Result<Query<FileQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<WrittenBody>, ApiError> {
    let q = file_query(q)?;
    let mode = match &q.mode {
        Some(text) => Some(u32::from_str_radix(text, 8).map_err(|_| {
            ApiError(Error::InvalidArgument {
                what: "mode",
                reason: format!("{text:?} is not octal permission bits"),
            })
        })?),
        None => None,
    };
    let data = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(data);
    let size = m.write_file_from(&q.path, reader, mode).await?;
    Ok(Json(WrittenBody { size }))
}

async fn read_file(
    Target(m): Target,
    q: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = file_query(q)?;
    let file = m.read_file_stream(&q.path).await?;
    let (size, mode) = (file.size(), file.mode());
    let chunks = file.map_err(|e| std::io::Error::other(e.to_string()));
    let mut r = Response::new(Body::from_stream(chunks));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
        h.insert(SIZE_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:o}", mode & 0o7777)) {
        h.insert(MODE_HEADER, v);
    }
    Ok(r)
}

/// Images come from registries: a reference naming the server's own files
/// (an OCI layout, a `docker save` archive) is refused.
fn check_remote_image(reference: &str) -> Result<(), ApiError> {
    if Digest::parse(reference).is_ok() {
        return Ok(());
    }
    match ImageSource::parse(reference).map_err(Error::from)? {
        ImageSource::Registry(_) => Ok(()),
        _ => Err(ApiError(Error::InvalidArgument {
            what: "image",
            reason: format!(
                "{reference:?} names a file of the server; remote clients pull from registries"
            ),
        })),
    }
}

async fn fork(
    State(s): State<AppState>,
    Extension(owner): Extension<Owner>,
    Target(m): Target,
    body: Bytes,
) -> Result<Json<MachineBody>, ApiError> {
    let ForkBody { name } = parse(&body)?;
    let clone = m.fork(&name).await?;
    s.adopt(clone, owner).await
}

async fn ports(Target(m): Target) -> Result<Json<Vec<crate::PortMapping>>, ApiError> {
    Ok(Json(m.ports().await?))
}

async fn list_images(Target(m): Target) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    Ok(Json(m.list_images().await?))
}

/// Progress lines a slow client has not read yet; beyond, progress events
/// are dropped (never the final line).
const PULL_BACKLOG: usize = 256;

async fn pull_image(Target(m): Target, body: Bytes) -> Result<Response, ApiError> {
    let PullBody { reference } = parse(&body)?;
    check_remote_image(&reference)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(PULL_BACKLOG);
    let progress = tx.clone();
    // The pull runs to its end even if the client goes away (the machine
    // then has the image); it holds the machine meanwhile.
    tokio::spawn(async move {
        let pulled = m
            .pull_image_with_progress(&reference, move |ev| {
                let _ = progress.try_send(ndjson(&PullLine::Progress { event: ev.clone() }));
            })
            .await;
        let last = match pulled {
            Ok(image) => PullLine::Done { image },
            Err(e) => PullLine::Failed {
                error: ErrorBody::of(&e).1,
            },
        };
        let _ = tx.send(ndjson(&last)).await;
    });
    Ok(ndjson_response(tokio_stream_of(rx)))
}

fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    async_stream::stream! {
        while let Some(b) = rx.recv().await {
            yield b;
        }
    }
}

async fn run(Target(m): Target, body: Bytes) -> Result<Json<ExecResultBody>, ApiError> {
    let req: RunBody = parse(&body)?;
    check_remote_image(&req.image)?;
    let r = m
        .run_with(&req.image, &req.exec.argv, req.exec.options()?)
        .await?;
    Ok(Json(ExecResultBody::from(&r)))
}

async fn run_stream(Target(m): Target, body: Bytes) -> Result<Response, ApiError> {
    let req: RunBody = parse(&body)?;
    check_remote_image(&req.image)?;
    let stream = m
        .run_stream_with(&req.image, &req.exec.argv, req.exec.options()?)
        .await?;
    Ok(stream_response(stream))
}
