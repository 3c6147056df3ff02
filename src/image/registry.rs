//! Pulls from registries with oci-client: the manifest (through an image
//! index to its linux/amd64 entry), the config and the layers, each blob
//! into the store once.

use std::sync::{Arc, Once};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

use super::error::ImageError;
use super::manifest::{
    parse_manifest, select_platform, Descriptor, ImageManifest, Manifest, ACCEPTED_MANIFESTS,
};
use super::progress::{Reporter, PROGRESS_STEP};
use super::reference::ImageRef;
use super::store::Digest;
use super::{ImageResolver, PullEvent, PullStats};

/// Layers fetched at once.
const CONCURRENT_LAYERS: usize = 3;
const MAX_INDEX_DEPTH: usize = 4;

/// reqwest is built without a default TLS provider (to avoid aws-lc's C
/// build): install ring's, once, before the first client.
pub(crate) fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A client for one registry (plain HTTP when insecure).
pub(crate) fn client_for(insecure: bool) -> Client {
    install_crypto_provider();
    Client::new(ClientConfig {
        protocol: if insecure {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    })
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Turns oci-client's errors into named ones.
pub(crate) fn map_error(e: OciDistributionError, r: &ImageRef) -> ImageError {
    let not_found = || match (&r.tag, &r.digest) {
        (Some(tag), None) => ImageError::TagNotFound {
            repository: r.name(),
            tag: tag.clone(),
        },
        _ => ImageError::NotFound {
            reference: r.to_string(),
        },
    };
    let unauthorized = || ImageError::Unauthorized {
        registry: r.registry.clone(),
        reference: r.to_string(),
    };
    match e {
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.contains(&&OciErrorCode::NameUnknown) {
                ImageError::NotFound {
                    reference: r.to_string(),
                }
            } else if codes.contains(&&OciErrorCode::ManifestUnknown)
                || codes.contains(&&OciErrorCode::NotFound)
            {
                not_found()
            } else if codes.contains(&&OciErrorCode::Unauthorized)
                || codes.contains(&&OciErrorCode::Denied)
            {
                unauthorized()
            } else {
                let status = match codes.first() {
                    Some(OciErrorCode::Toomanyrequests) => 429,
                    Some(OciErrorCode::BlobUnknown) => 404,
                    Some(OciErrorCode::Unsupported) => 405,
                    _ => 400,
                };
                ImageError::Registry {
                    registry: r.registry.clone(),
                    status,
                    body: snippet(&envelope.to_string()),
                }
            }
        }
        OciDistributionError::UnauthorizedError { .. } => unauthorized(),
        OciDistributionError::AuthenticationFailure(msg) => ImageError::Registry {
            registry: r.registry.clone(),
            status: 401,
            body: snippet(&msg),
        },
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::ServerError { code, message, .. } => ImageError::Registry {
            registry: r.registry.clone(),
            status: code,
            body: snippet(&message),
        },
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => ImageError::DigestMismatch { expected, actual },
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RequestError(e) => {
            let mut reason = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                reason = format!("{reason}: {s}");
                src = s.source();
            }
            ImageError::Network {
                registry: r.registry.clone(),
                reason,
            }
        }
        other => ImageError::Registry {
            registry: r.registry.clone(),
            status: 0,
            body: snippet(&other.to_string()),
        },
    }
}

/// A blob stream error: oci-client reports a digest mismatch as an I/O error.
fn map_stream_error(e: std::io::Error, r: &ImageRef) -> ImageError {
    if let Some(oci_client::errors::DigestError::VerificationError { expected, actual }) = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<oci_client::errors::DigestError>())
    {
        return ImageError::DigestMismatch {
            expected: expected.clone(),
            actual: actual.clone(),
        };
    }
    ImageError::Network {
        registry: r.registry.clone(),
        reason: format!("reading a blob: {e}"),
    }
}

impl ImageResolver {
    /// Pulls `r` into the store; returns the manifest digest and manifest.
    pub(crate) async fn pull_registry(
        &self,
        r: &ImageRef,
        stats: &mut PullStats,
        reporter: &Reporter,
    ) -> Result<(Digest, ImageManifest), ImageError> {
        let client = self.client(r);
        let auth = self.credentials.for_registry(&r.registry);
        let oref = r.to_oci();
        let label = r.to_string();

        let first = self
            .fetch_manifest(&client, &auth, &oref, r.digest.as_ref(), r, stats)
            .await;
        let (mut bytes, mut digest) = match first {
            Ok(m) => m,
            // Registries answer MANIFEST_UNKNOWN for an unknown repository
            // too: the tag list tells the two apart.
            Err(ImageError::TagNotFound { repository, tag }) => {
                return Err(match client.list_tags(&oref, &auth, None, None).await {
                    Ok(_) => ImageError::TagNotFound { repository, tag },
                    Err(_) => ImageError::NotFound {
                        reference: r.to_string(),
                    },
                });
            }
            Err(e) => return Err(e),
        };
        let mut media_type: Option<String> = None;
        let mut depth = 0;
        let manifest = loop {
            match parse_manifest(&bytes, media_type.as_deref())? {
                Manifest::Image(m) => break m,
                Manifest::Index(entries) => {
                    depth += 1;
                    if depth > MAX_INDEX_DEPTH {
                        return Err(ImageError::BadManifest {
                            what: "image index",
                            reason: "nested too deep".into(),
                        });
                    }
                    let entry = select_platform(&label, &entries)?;
                    let d = entry.descriptor.digest.clone();
                    media_type = Some(entry.descriptor.media_type.clone());
                    let by_digest = oref.clone_with_digest(d.to_string());
                    (bytes, digest) = self
                        .fetch_manifest(&client, &auth, &by_digest, Some(&d), r, stats)
                        .await?;
                }
            }
        };
        reporter.report(&PullEvent::Resolved {
            reference: label.clone(),
            digest: Some(digest.clone()),
            layers: manifest.layers.len(),
            bytes: manifest.layers.iter().map(|l| l.size).sum::<u64>(),
        });

        self.fetch_blob(&client, &oref, &manifest.config, None, r, reporter)
            .await
            .map(|c| stats.add(c))?;
        // Futures built in a loop, not in a closure: combinator closures over
        // borrowed items make the whole pull future not provably Send.
        let mut fetches = Vec::with_capacity(manifest.layers.len());
        for (i, layer) in manifest.layers.iter().enumerate() {
            fetches.push(self.fetch_blob(&client, &oref, layer, Some(i), r, reporter));
        }
        let results: Vec<(bool, u64)> = futures::stream::iter(fetches)
            .buffered(CONCURRENT_LAYERS)
            .try_collect()
            .await?;
        for c in results {
            stats.add(c);
        }
        Ok((digest, manifest))
    }

    /// Fetches a manifest (or takes it from the store when its digest is
    /// known and present), verifies and stores it.
    async fn fetch_manifest(
        &self,
        client: &Client,
        auth: &RegistryAuth,
        oref: &oci_client::Reference,
        expected: Option<&Digest>,
        r: &ImageRef,
        stats: &mut PullStats,
    ) -> Result<(Vec<u8>, Digest), ImageError> {
        if let Some(d) = expected {
            if self.store.contains(d) {
                return Ok((self.store.read(d)?, d.clone()));
            }
        }
        let (bytes, _) = client
            .pull_manifest_raw(oref, auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| map_error(e, r))?;
        stats.manifests_fetched += 1;
        let actual = Digest::of(&bytes);
        if let Some(d) = expected {
            if d != &actual {
                return Err(ImageError::DigestMismatch {
                    expected: d.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        self.store.write_bytes(&actual, &bytes)?;
        Ok((bytes.to_vec(), actual))
    }

    /// Makes sure the blob is in the store; returns (was cached, bytes
    /// fetched). `layer`: its index when it is a layer (progress is
    /// reported for layers only).
    async fn fetch_blob(
        &self,
        client: &Client,
        oref: &oci_client::Reference,
        desc: &Descriptor,
        layer: Option<usize>,
        r: &ImageRef,
        reporter: &Reporter,
    ) -> Result<(bool, u64), ImageError> {
        let d = &desc.digest;
        let total = desc.size;
        let progress = |done: u64| {
            if let Some(index) = layer {
                reporter.report(&PullEvent::LayerProgress { index, done, total });
            }
        };
        let done = |cached: bool, size: u64| {
            if let Some(index) = layer {
                reporter.report(&PullEvent::LayerDone {
                    index,
                    digest: d.clone(),
                    size,
                    cached,
                });
            }
        };
        if self.store.contains(d) {
            done(true, desc.size);
            return Ok((true, 0));
        }
        let _lock = self.store.lock(d).await?;
        // Another pull may have fetched it while we waited for the lock.
        if self.store.contains(d) {
            done(true, desc.size);
            return Ok((true, 0));
        }
        let oci_desc = OciDescriptor {
            media_type: desc.media_type.clone(),
            digest: d.to_string(),
            size: desc.size as i64,
            ..Default::default()
        };
        let stream = client
            .pull_blob_stream(oref, &oci_desc)
            .await
            .map_err(|e| map_error(e, r))?;
        let stream = stream.map(|c| c.map_err(|e| map_stream_error(e, r)));
        progress(0);
        let mut next_report = PROGRESS_STEP;
        let n = self
            .store
            .write_stream(d, Some(total), stream, |bytes| {
                if bytes >= next_report || bytes == total {
                    next_report = bytes + PROGRESS_STEP;
                    progress(bytes);
                }
            })
            .await?;
        done(false, n);
        Ok((false, n))
    }

    fn client(&self, r: &ImageRef) -> Arc<Client> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(r.registry.clone())
            .or_insert_with(|| Arc::new(client_for(r.is_insecure(&self.insecure))))
            .clone()
    }
}
