//! Images in a machine, over its agent: `pull_image`, `list_images` and
//! `run` (a command in a container of an image, through the exec path).
//!
//! A pull gets the image into the host's blob cache (shared by every
//! machine of the same `SMOL_HOME`), sends the machine only the layers it
//! lacks (one vsock connection per layer, the blob in Data frames), then
//! records the image in the machine. `run` uses an image the machine
//! already has without asking the registry (as `docker run` does) and
//! pulls it otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use smol_protocol::{AgentError, FrameKind, Request, Response, DATA_CHUNK};
use tokio::io::AsyncReadExt;

use super::{parse, unexpected, within, AgentLink};
use crate::error::{Error, GuestErrorKind, Result};
use crate::exec::{ExecOptions, ExecResult};
use crate::image::{
    BlobStore, ContainerSpec, Descriptor, Digest, ImageError, ImageInfo, ImageRecord,
    ImageResolver, ImageSource, ProgressFn, PullEvent, PROGRESS_STEP,
};

/// Longest wait for the agent to confirm a layer after its last byte: it
/// may still be writing the layer's last files (minutes for a large layer
/// where the guest kernel is emulated).
const LAYER_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Layers sent to one machine at once.
const CONCURRENT_SENDS: usize = 2;

/// One resolver per blob store, shared by every machine using it (so that
/// registry clients and their tokens are reused).
fn resolver_for(root: &Path) -> Result<Arc<ImageResolver>> {
    static RESOLVERS: OnceLock<Mutex<HashMap<PathBuf, Arc<ImageResolver>>>> = OnceLock::new();
    let mut map = RESOLVERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(r) = map.get(root) {
        return Ok(r.clone());
    }
    let r = Arc::new(ImageResolver::new(BlobStore::open(root)?)?);
    map.insert(root.to_path_buf(), r.clone());
    Ok(r)
}

/// Whether a guest error names `prefix` (the agent's image error messages).
fn agent_says(e: &AgentError, prefix: &str) -> bool {
    e.message.starts_with(prefix) || e.message.contains(&format!(": {prefix}"))
}

pub(crate) async fn pull_image<L: AgentLink>(
    link: &L,
    reference: &str,
    progress: Option<ProgressFn>,
) -> Result<ImageInfo> {
    let source = ImageSource::parse(reference)?;
    let record = pull_record(link, &source, progress).await?;
    Ok(ImageInfo::from(&record))
}

pub(crate) async fn run_collect<L: AgentLink>(
    link: &L,
    image: &str,
    argv: Vec<String>,
    options: ExecOptions,
) -> Result<ExecResult> {
    let limit = options.output_limit();
    let req = container_request(link, image, argv, options.clone()).await?;
    let stdin = options.take_input()?;
    super::exec::exec(link, req, limit, stdin).await
}

/// The exec request of a `run`: the image's config applied, the container
/// target set. An image the machine has is used as it is.
pub(crate) async fn container_request<L: AgentLink>(
    link: &L,
    image: &str,
    argv: Vec<String>,
    options: ExecOptions,
) -> Result<smol_protocol::ExecRequest> {
    let record = match Digest::parse(image) {
        // A manifest digest names an image the machine already has.
        Ok(d) => find_record(link, d.as_str())
            .await?
            .ok_or_else(|| ImageError::NotFound {
                reference: image.into(),
            })?,
        Err(_) => {
            let source = ImageSource::parse(image)?;
            match find_record(link, &source.to_string()).await? {
                Some(r) => r,
                None => pull_record(link, &source, None).await?,
            }
        }
    };
    let cmd = record
        .config
        .resolve(&argv, &options.env, options.workdir.as_deref())
        .map_err(|e| Error::InvalidArgument {
            what: "argv",
            reason: format!("{e} (image {image})"),
        })?;
    let opts = ExecOptions {
        env: cmd.env,
        workdir: Some(cmd.workdir),
        ..options
    };
    let mut req = opts.request(cmd.argv)?;
    req.container = Some(ContainerSpec {
        image: record.digest.clone(),
        user: cmd.user,
        hostname: None,
    });
    Ok(req)
}

/// One request, one answer, on a fresh connection.
async fn ask<L: AgentLink, T>(
    link: &L,
    req: Request,
    what: &str,
    pick: impl FnOnce(Response) -> std::result::Result<T, Box<Response>>,
) -> Result<T> {
    let asked = async {
        let mut conn = link.request(&req).await?;
        pick(conn.response_within(None, what).await?).map_err(|other| unexpected(what, &other))
    };
    match asked.await {
        Ok(t) => Ok(t),
        Err(e) => Err(link.explain(e).await),
    }
}

pub(crate) async fn list_images<L: AgentLink>(link: &L) -> Result<Vec<ImageInfo>> {
    let records = image_records(link).await?;
    Ok(records.iter().map(ImageInfo::from).collect())
}

/// A `run` whose output streams; the stream holds `link`.
pub(crate) async fn run_stream<L>(
    link: &L,
    image: &str,
    argv: Vec<String>,
    options: ExecOptions,
) -> Result<crate::exec::ExecStream>
where
    L: AgentLink + Clone + Send + 'static,
{
    let req = container_request(link, image, argv, options.clone()).await?;
    let stdin = options.take_input()?;
    super::exec::exec_stream(link, req, stdin).await
}

pub(crate) async fn image_records<L: AgentLink>(link: &L) -> Result<Vec<ImageRecord>> {
    ask(link, Request::ListImages, "list images", |r| match r {
        Response::Images { images } => Ok(images),
        other => Err(Box::new(other)),
    })
    .await
}

/// The machine's record of `key` (a canonical reference or a digest).
async fn find_record<L: AgentLink>(link: &L, key: &str) -> Result<Option<ImageRecord>> {
    Ok(image_records(link)
        .await?
        .into_iter()
        .find(|r| r.digest == key || r.references.iter().any(|x| x == key)))
}

async fn pull_record<L: AgentLink>(
    link: &L,
    source: &ImageSource,
    progress: Option<ProgressFn>,
) -> Result<ImageRecord> {
    let begin = Instant::now();
    let resolver = resolver_for(&link.images_root())?;
    let pulled = match &progress {
        Some(p) => {
            resolver
                .pull_source_with_progress(source, p.clone())
                .await?
        }
        None => resolver.pull_source(source).await?,
    };
    let report = |ev: PullEvent| {
        if let Some(p) = &progress {
            p(&ev);
        }
    };
    let image = pulled.image;
    let digests: Vec<String> = image.layers.iter().map(|l| l.digest.to_string()).collect();
    let missing = ask(
        link,
        Request::MissingLayers { digests },
        "missing layers",
        |r| match r {
            Response::MissingLayers { digests } => Ok(digests),
            other => Err(Box::new(other)),
        },
    )
    .await?;
    let to_send: Vec<(usize, &Descriptor)> = image
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| missing.contains(&l.digest.to_string()))
        .collect();
    report(PullEvent::Sending {
        layers: to_send.len(),
        bytes: to_send
            .iter()
            .fold(0u64, |sum, (_, l)| sum.saturating_add(l.size)),
    });
    tracing::info!(
        target: "smol::image",
        machine = link.label(),
        image = %image.reference,
        fetched = pulled.stats.blobs_fetched,
        sending = to_send.len(),
        "pulled into the blob cache"
    );
    // Futures built in a loop, not in a closure: combinator closures over
    // borrowed items make the whole future not provably Send.
    let mut sends = Vec::with_capacity(to_send.len());
    for (index, l) in to_send {
        let (layer, path) = (l.clone(), resolver.store().path(&l.digest));
        let report = &report;
        sends.push(async move {
            let sent = |done| {
                report(PullEvent::LayerProgress {
                    index,
                    done,
                    total: layer.size,
                })
            };
            send_layer(link, &layer, &path, &sent).await?;
            report(PullEvent::LayerSent {
                index,
                digest: layer.digest.clone(),
                size: layer.size,
            });
            Ok::<(), Error>(())
        });
    }
    futures::stream::iter(sends)
        .buffer_unordered(CONCURRENT_SENDS)
        .try_collect::<Vec<()>>()
        .await?;
    let record = ask(
        link,
        Request::RecordImage(image.record()),
        "record image",
        |r| match r {
            Response::Image(r) => Ok(r),
            other => Err(Box::new(other)),
        },
    )
    .await?;
    tracing::info!(
        target: "smol::image",
        machine = link.label(),
        image = %image.reference,
        digest = %image.digest,
        elapsed_ms = begin.elapsed().as_millis() as u64,
        "image ready"
    );
    Ok(record)
}

/// Streams one layer blob from the cache into the machine; `progress` gets
/// the bytes sent (at the start, then every [`PROGRESS_STEP`]).
async fn send_layer<L: AgentLink>(
    link: &L,
    layer: &Descriptor,
    path: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<()> {
    let begin = Instant::now();
    let digest = layer.digest.to_string();
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io(format!("opening cached blob {}", path.display()), e))?;
    let sent = async {
        let put = Request::PutLayer {
            digest: digest.clone(),
            size: layer.size,
        };
        let mut conn = link.request(&put).await?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let (mut sent, mut next_report) = (0u64, PROGRESS_STEP);
        progress(0);
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| Error::io(format!("reading cached blob {}", path.display()), e))?;
            if n == 0 {
                break;
            }
            conn.write(FrameKind::Data, &buf[..n]).await?;
            sent += n as u64;
            if sent >= next_report || sent == layer.size {
                next_report = sent + PROGRESS_STEP;
                progress(sent);
            }
        }
        conn.write(FrameKind::Eof, &[]).await?;
        // Read the answer raw: image errors get their own names. The agent
        // may still be unpacking the layer's last files.
        let step = format!("storing layer {digest}");
        let f = within(LAYER_ANSWER_TIMEOUT, || step, conn.next()).await?;
        match f.kind {
            FrameKind::Response => match parse::<Response>(&f, "response")? {
                Response::LayerStored { .. } => Ok(()),
                other => Err(unexpected("put layer", &other)),
            },
            FrameKind::Error => Err(layer_error(link.label(), &digest, parse(&f, "error")?)),
            other => Err(Error::Protocol(format!(
                "expected a response frame, got {other:?}"
            ))),
        }
    };
    match sent.await {
        Ok(()) => {
            tracing::info!(
                target: "smol::image",
                machine = link.label(),
                digest = %digest,
                bytes = layer.size,
                elapsed_ms = begin.elapsed().as_millis() as u64,
                "layer sent"
            );
            Ok(())
        }
        Err(e) => Err(link.explain(e).await),
    }
}

fn layer_error(machine: &str, digest: &str, e: AgentError) -> Error {
    let reason = crate::error::sanitize(&e.message);
    if e.kind == GuestErrorKind::NoSpace {
        return ImageError::NoSpace {
            what: format!("layer {digest} in machine {machine:?}"),
        }
        .into();
    }
    if agent_says(&e, "not a tar archive") {
        return ImageError::NotATar {
            digest: digest.to_string(),
            reason,
        }
        .into();
    }
    if agent_says(&e, "digest mismatch") {
        return ImageError::DigestMismatch {
            expected: digest.to_string(),
            actual: reason,
        }
        .into();
    }
    Error::from_agent(e, None)
}

#[cfg(test)]
mod tests;
