//! OCI images, host side: references, the content-addressed blob cache
//! shared by every machine (`$SMOL_HOME/images`), pulls from registries
//! (oci-client) and imports from local sources (`oci-layout` directories,
//! `docker save` archives).
//!
//! The result of a pull is a [`ResolvedImage`]: its manifest digest, config
//! and layers, all in the [`BlobStore`]. Unpacking and containers happen in
//! the guest (`smol_agent::image`), which receives the layer blobs.
//!
//! Registries on loopback (`127.0.0.0/8`, `localhost`, `[::1]`) and those
//! listed in `SMOL_INSECURE_REGISTRIES` (comma-separated `host:port`) are
//! reached over plain HTTP; credentials come from `~/.docker/config.json`
//! (or `$DOCKER_CONFIG/config.json`) when present.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use progress::Reporter;
use serde::{Deserialize, Serialize};

mod auth;
mod error;
mod local;
pub mod manifest;
mod progress;
mod reference;
mod registry;
mod store;

pub use auth::{docker_config_path, DockerCredentials};
pub use error::ImageError;
pub use manifest::{ConfigFile, Descriptor, ImageConfig};
pub(crate) use progress::PROGRESS_STEP;
pub use progress::{ProgressFn, PullEvent};
pub use reference::{is_loopback, ImageRef, ImageSource};
/// Also for the remote engine's client: the same reqwest, without a default TLS provider.
pub(crate) use registry::install_crypto_provider;
pub use smol_protocol::image::{ContainerSpec, ImageRecord, LayerRecord};
pub use store::{smol_home, BlobLock, BlobStore, Digest};

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub digest: String,
    pub media_type: String,
    /// Compressed size in bytes.
    pub size: u64,
}

/// An OCI image as `pull_image` and `list_images` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The reference it was pulled by (canonical: `docker.io/library/busybox:latest`).
    pub reference: String,
    /// The manifest digest.
    pub digest: String,
    /// Compressed layers plus config, in bytes.
    pub size: u64,
    /// Bottom layer first.
    pub layers: Vec<LayerInfo>,
    /// The image config's creation time (RFC 3339), when it says.
    pub created: Option<String>,
}

impl From<&ImageRecord> for ImageInfo {
    fn from(r: &ImageRecord) -> ImageInfo {
        ImageInfo {
            reference: r.references.first().cloned().unwrap_or_default(),
            digest: r.digest.clone(),
            size: r.size,
            layers: r
                .layers
                .iter()
                .map(|l| LayerInfo {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
            created: r.created.clone(),
        }
    }
}

/// An image whose manifest, config and layers are all in the blob store.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedImage {
    /// The canonical reference or local source it was pulled by.
    pub reference: String,
    /// The manifest digest.
    pub digest: Digest,
    pub config_digest: Digest,
    pub config: ImageConfig,
    /// Bottom layer first.
    pub layers: Vec<Descriptor>,
    pub created: Option<String>,
    /// Compressed layers plus config, in bytes.
    pub size: u64,
}

impl ResolvedImage {
    pub fn info(&self) -> ImageInfo {
        ImageInfo::from(&self.record())
    }

    /// What the guest records for it.
    pub fn record(&self) -> ImageRecord {
        ImageRecord {
            digest: self.digest.to_string(),
            references: vec![self.reference.clone()],
            layers: self
                .layers
                .iter()
                .map(|l| LayerRecord {
                    digest: l.digest.to_string(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                })
                .collect(),
            config: self.config.clone(),
            created: self.created.clone(),
            size: self.size,
        }
    }
}

/// What a pull did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PullStats {
    /// Blobs (config and layers) downloaded or imported.
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
    /// Blobs (config and layers) already in the store.
    pub blobs_cached: usize,
    /// Manifests and indexes fetched from a registry.
    pub manifests_fetched: usize,
}

impl PullStats {
    fn add(&mut self, (cached, bytes): (bool, u64)) {
        if cached {
            self.blobs_cached += 1;
        } else {
            self.blobs_fetched += 1;
            self.bytes_fetched += bytes;
        }
    }
}

/// A pulled image and what pulling it cost.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub image: ResolvedImage,
    pub stats: PullStats,
}

/// Pulls images into a [`BlobStore`]. Cheap to share; keeps one registry
/// client (and its auth tokens) per registry.
pub struct ImageResolver {
    store: BlobStore,
    insecure: Vec<String>,
    credentials: DockerCredentials,
    clients: Mutex<HashMap<String, Arc<oci_client::Client>>>,
    progress: Option<ProgressFn>,
}

impl std::fmt::Debug for ImageResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageResolver")
            .field("store", &self.store)
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// `SMOL_INSECURE_REGISTRIES`: comma-separated `host:port` entries.
pub fn insecure_registries_from_env() -> Vec<String> {
    std::env::var("SMOL_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

impl ImageResolver {
    /// A resolver over `store`, configured from the environment
    /// (`SMOL_INSECURE_REGISTRIES`, the docker config's credentials).
    pub fn new(store: BlobStore) -> Result<ImageResolver, ImageError> {
        let credentials = match docker_config_path() {
            Some(p) => DockerCredentials::load(&p)?,
            None => DockerCredentials::default(),
        };
        store.clean_temp();
        Ok(ImageResolver {
            store,
            insecure: insecure_registries_from_env(),
            credentials,
            clients: Mutex::new(HashMap::new()),
            progress: None,
        })
    }

    /// The resolver over the default store, `$SMOL_HOME/images`.
    pub fn open_default() -> Result<ImageResolver, ImageError> {
        ImageResolver::new(BlobStore::open(BlobStore::default_root())?)
    }

    pub fn with_insecure_registries(mut self, registries: Vec<String>) -> Self {
        self.insecure = registries;
        self
    }

    pub fn with_credentials(mut self, credentials: DockerCredentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Sends every pull's [`PullEvent`]s to `progress` (as well as to the
    /// one given to [`ImageResolver::pull_source_with_progress`]).
    pub fn with_progress(mut self, progress: ProgressFn) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// Parses `source` ([`ImageSource::parse`]) and pulls it.
    pub async fn pull(&self, source: &str) -> Result<Pulled, ImageError> {
        self.pull_source(&ImageSource::parse(source)?).await
    }

    /// Gets every blob of the image into the store, each verified, and
    /// returns the resolved image. Blobs already there are not fetched.
    pub async fn pull_source(&self, source: &ImageSource) -> Result<Pulled, ImageError> {
        self.pull_reporting(source, Reporter::new(self.progress.clone()))
            .await
    }

    /// [`ImageResolver::pull_source`], sending this pull's [`PullEvent`]s
    /// to `progress` too.
    pub async fn pull_source_with_progress(
        &self,
        source: &ImageSource,
        progress: ProgressFn,
    ) -> Result<Pulled, ImageError> {
        let sinks = self.progress.clone().into_iter().chain([progress]);
        self.pull_reporting(source, Reporter::new(sinks)).await
    }

    async fn pull_reporting(
        &self,
        source: &ImageSource,
        reporter: Reporter,
    ) -> Result<Pulled, ImageError> {
        let mut stats = PullStats::default();
        let (digest, manifest) = match source {
            ImageSource::Registry(r) => self.pull_registry(r, &mut stats, &reporter).await?,
            ImageSource::OciLayout { dir, tag } => {
                let (store, dir, tag) = (self.store.clone(), dir.clone(), tag.clone());
                let label = source.to_string();
                let (imported, s) = tokio::task::spawn_blocking(move || {
                    let mut s = PullStats::default();
                    local::import_oci_layout(
                        &store,
                        &dir,
                        tag.as_deref(),
                        &label,
                        &mut s,
                        &reporter,
                    )
                    .map(|i| (i, s))
                })
                .await
                .map_err(|e| {
                    ImageError::io("import", self.store.root(), std::io::Error::other(e))
                })??;
                stats = s;
                (imported.manifest_digest, imported.manifest)
            }
            ImageSource::DockerArchive { path, tag } => {
                let (store, path, tag) = (self.store.clone(), path.clone(), tag.clone());
                let label = source.to_string();
                let (imported, s) = tokio::task::spawn_blocking(move || {
                    let mut s = PullStats::default();
                    local::import_docker_archive(
                        &store,
                        &path,
                        tag.as_deref(),
                        &label,
                        &mut s,
                        &reporter,
                    )
                    .map(|i| (i, s))
                })
                .await
                .map_err(|e| {
                    ImageError::io("import", self.store.root(), std::io::Error::other(e))
                })??;
                stats = s;
                (imported.manifest_digest, imported.manifest)
            }
        };
        let image = self.assemble(source.to_string(), digest, manifest)?;
        Ok(Pulled { image, stats })
    }

    /// Reads the config of a manifest whose blobs are in the store.
    fn assemble(
        &self,
        reference: String,
        digest: Digest,
        manifest: manifest::ImageManifest,
    ) -> Result<ResolvedImage, ImageError> {
        let config_bytes = self.store.read(&manifest.config.digest)?;
        let config = manifest::parse_config(&reference, &config_bytes)?;
        if !config.diff_ids.is_empty() && config.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::BadManifest {
                what: "image config",
                reason: format!(
                    "{} diff ids for {} layers",
                    config.diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        let size = manifest.total_bytes();
        Ok(ResolvedImage {
            reference,
            digest,
            config_digest: manifest.config.digest,
            config: config.config,
            layers: manifest.layers,
            created: config.created,
            size,
        })
    }
}
