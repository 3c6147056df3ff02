//! The image half of the [`Machine`] API: `pull_image`, `list_images` and
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
use smol_agent::protocol::{AgentError, FrameKind, Request, Response, DATA_CHUNK};
use tokio::io::AsyncReadExt;

use super::{
    ContainerSpec, Descriptor, Digest, ImageError, ImageInfo, ImageRecord, ImageResolver,
    ImageSource,
};
use crate::agent_conn::unexpected;
use crate::error::{Error, Result};
use crate::exec::{ExecOptions, ExecResult, ExecStream, RunningExec};
use crate::machine::Machine;
use crate::GuestErrorKind;

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
    let r = Arc::new(ImageResolver::new(super::BlobStore::open(root)?)?);
    map.insert(root.to_path_buf(), r.clone());
    Ok(r)
}

/// Whether a guest error names `prefix` (the agent's image error messages).
fn agent_says(e: &AgentError, prefix: &str) -> bool {
    e.message.starts_with(prefix) || e.message.contains(&format!(": {prefix}"))
}

impl Machine {
    /// The blob cache of this machine's store: `<home>/images`, next to
    /// `<home>/machines/<name>`.
    fn images_root(&self) -> PathBuf {
        match self.dir().parent().and_then(Path::parent) {
            Some(home) => home.join("images"),
            None => super::BlobStore::default_root(),
        }
    }

    /// Pulls `reference` (a registry reference, `oci-layout:<dir>[:<tag>]`,
    /// `docker-archive:<file>[:<tag>]`, or a path to either) into the host's
    /// blob cache when needed, sends the layers this machine lacks, and
    /// records the image in the machine.
    pub async fn pull_image(&self, reference: &str) -> Result<ImageInfo> {
        let source = ImageSource::parse(reference)?;
        let record = self.pull_record(&source).await?;
        Ok(ImageInfo::from(&record))
    }

    /// The images in this machine's storage.
    pub async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        Ok(self
            .image_records()
            .await?
            .iter()
            .map(ImageInfo::from)
            .collect())
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
        let req = self.container_request(image, argv, options).await?;
        let conn = self.agent().await?;
        let run = async { RunningExec::start(conn, req).await?.collect().await };
        match run.await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.explain(e).await),
        }
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
        let req = self.container_request(image, argv, options).await?;
        let conn = self.agent().await?;
        match RunningExec::start(conn, req).await {
            Ok(running) => Ok(running.into_stream(self.clone())),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// The exec request of a `run`: the image's config applied, the
    /// container target set.
    async fn container_request<I, S>(
        &self,
        image: &str,
        argv: I,
        options: ExecOptions,
    ) -> Result<smol_agent::protocol::ExecRequest>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let argv: Vec<String> = argv.into_iter().map(|a| a.as_ref().to_string()).collect();
        let record = match Digest::parse(image) {
            // A manifest digest names an image the machine already has.
            Ok(d) => self
                .find_record(d.as_str())
                .await?
                .ok_or_else(|| ImageError::NotFound {
                    reference: image.into(),
                })?,
            Err(_) => {
                let source = ImageSource::parse(image)?;
                match self.find_record(&source.to_string()).await? {
                    Some(r) => r,
                    None => self.pull_record(&source).await?,
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

    async fn image_records(&self) -> Result<Vec<ImageRecord>> {
        let mut conn = self.agent().await?;
        let asked = async {
            conn.send(&Request::ListImages).await?;
            match conn.response(None).await? {
                Response::Images { images } => Ok(images),
                other => Err(unexpected("list images", &other)),
            }
        };
        match asked.await {
            Ok(images) => Ok(images),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// The machine's record of `key` (a canonical reference or a digest).
    async fn find_record(&self, key: &str) -> Result<Option<ImageRecord>> {
        Ok(self
            .image_records()
            .await?
            .into_iter()
            .find(|r| r.digest == key || r.references.iter().any(|x| x == key)))
    }

    async fn pull_record(&self, source: &ImageSource) -> Result<ImageRecord> {
        let begin = Instant::now();
        let resolver = resolver_for(&self.images_root())?;
        let pulled = resolver.pull_source(source).await?;
        let image = pulled.image;
        let digests: Vec<String> = image.layers.iter().map(|l| l.digest.to_string()).collect();
        let missing = self.missing_layers(&digests).await?;
        let to_send: Vec<&Descriptor> = image
            .layers
            .iter()
            .filter(|l| missing.contains(&l.digest.to_string()))
            .collect();
        tracing::info!(
            target: "smol::image",
            machine = self.name(),
            image = %image.reference,
            fetched = pulled.stats.blobs_fetched,
            sending = to_send.len(),
            "pulled into the blob cache"
        );
        let store = resolver.store().clone();
        futures::stream::iter(to_send)
            .map(|l| {
                let path = store.path(&l.digest);
                async move { self.send_layer(l, &path).await }
            })
            .buffer_unordered(CONCURRENT_SENDS)
            .try_collect::<Vec<()>>()
            .await?;

        let mut conn = self.agent().await?;
        let recorded = async {
            conn.send(&Request::RecordImage(image.record())).await?;
            match conn.response(None).await? {
                Response::Image(r) => Ok(r),
                other => Err(unexpected("record image", &other)),
            }
        };
        let record = match recorded.await {
            Ok(r) => r,
            Err(e) => return Err(self.explain(e).await),
        };
        tracing::info!(
            target: "smol::image",
            machine = self.name(),
            image = %image.reference,
            digest = %image.digest,
            elapsed_ms = begin.elapsed().as_millis() as u64,
            "image ready"
        );
        Ok(record)
    }

    async fn missing_layers(&self, digests: &[String]) -> Result<Vec<String>> {
        let mut conn = self.agent().await?;
        let asked = async {
            conn.send(&Request::MissingLayers {
                digests: digests.to_vec(),
            })
            .await?;
            match conn.response(None).await? {
                Response::MissingLayers { digests } => Ok(digests),
                other => Err(unexpected("missing layers", &other)),
            }
        };
        match asked.await {
            Ok(d) => Ok(d),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Streams one layer blob from the cache into the machine.
    async fn send_layer(&self, layer: &Descriptor, path: &Path) -> Result<()> {
        let begin = Instant::now();
        let digest = layer.digest.to_string();
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(format!("opening cached blob {}", path.display()), e))?;
        let mut conn = self.agent().await?;
        let sent = async {
            conn.send(&Request::PutLayer {
                digest: digest.clone(),
                size: layer.size,
            })
            .await?;
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::io(format!("reading cached blob {}", path.display()), e))?;
                if n == 0 {
                    break;
                }
                conn.write(FrameKind::Data, &buf[..n]).await?;
            }
            conn.write(FrameKind::Eof, &[]).await?;
            // Read the answer raw: image errors get their own names.
            let f = conn.next().await?;
            match f.kind {
                FrameKind::Response => {
                    match crate::agent_conn::parse::<Response>(&f, "response")? {
                        Response::LayerStored { .. } => Ok(()),
                        other => Err(unexpected("put layer", &other)),
                    }
                }
                FrameKind::Error => {
                    Err(self.layer_error(&digest, crate::agent_conn::parse(&f, "error")?))
                }
                other => Err(Error::Protocol(format!(
                    "expected a response frame, got {other:?}"
                ))),
            }
        };
        match sent.await {
            Ok(()) => {
                tracing::info!(
                    target: "smol::image",
                    machine = self.name(),
                    digest = %digest,
                    bytes = layer.size,
                    elapsed_ms = begin.elapsed().as_millis() as u64,
                    "layer sent"
                );
                Ok(())
            }
            Err(e) => Err(self.explain(e).await),
        }
    }

    fn layer_error(&self, digest: &str, e: AgentError) -> Error {
        let reason = crate::error::sanitize(&e.message);
        if e.kind == GuestErrorKind::NoSpace {
            return ImageError::NoSpace {
                what: format!("layer {digest} in machine {:?}", self.name()),
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
}
