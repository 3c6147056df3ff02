//! Pulls from registries with oci-client: the manifest (through an image
//! index to its linux/amd64 entry), the config and the layers, each blob
//! into the store once.

use std::sync::{Arc, Once};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use oci_client::RegistryOperation;

use super::error::ImageError;
use super::manifest::{
    parse_manifest, select_platform, Descriptor, ImageManifest, Manifest, ACCEPTED_MANIFESTS,
    MAX_MANIFEST_BYTES,
};
use super::progress::{Reporter, PROGRESS_STEP};
use super::reference::ImageRef;
use super::store::Digest;
use super::{ImageResolver, PullEvent, PullStats};

/// Layers fetched at once.
const CONCURRENT_LAYERS: usize = 3;
/// The most of an error response's body read (for its message).
const MAX_ERROR_BODY: usize = 64 << 10;
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

/// The HTTP client of manifest GETs (see `get_manifest`), with the
/// deadlines of [`client_for`]'s.
fn manifest_http() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            install_crypto_provider();
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(15))
                .read_timeout(Duration::from_secs(120))
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
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
            bytes: manifest.layer_bytes(),
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
        let bytes = self.get_manifest(client, auth, oref, r).await?;
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
        Ok((bytes, actual))
    }

    /// GETs a manifest, reading at most [`MAX_MANIFEST_BYTES`] of it (and
    /// [`MAX_ERROR_BODY`] of an error): oci-client's `pull_manifest_raw`
    /// reads whatever the registry sends. oci-client still does the
    /// authentication (the challenge and the token), and its error mapping
    /// names what went wrong.
    async fn get_manifest(
        &self,
        client: &Client,
        auth: &RegistryAuth,
        oref: &oci_client::Reference,
        r: &ImageRef,
    ) -> Result<Vec<u8>, ImageError> {
        let token = client
            .auth(oref, auth, RegistryOperation::Pull)
            .await
            .map_err(|e| map_error(e, r))?;
        let scheme = if r.is_insecure(&self.insecure) {
            "http"
        } else {
            "https"
        };
        let url = format!(
            "{scheme}://{}/v2/{}/manifests/{}",
            oref.resolve_registry(),
            oref.repository(),
            oref.digest().or(oref.tag()).unwrap_or("latest")
        );
        let http = manifest_http().map_err(|reason| ImageError::Network {
            registry: r.registry.clone(),
            reason,
        })?;
        let mut req = http
            .get(&url)
            .header(reqwest::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "));
        req = match (token, auth) {
            (Some(token), _) => req.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => req.basic_auth(user, Some(password)),
            (None, _) => req,
        };
        let network = |e: reqwest::Error| map_error(OciDistributionError::RequestError(e), r);
        let mut res = req.send().await.map_err(network)?;
        let status = res.status();
        let limit = if status.is_success() {
            MAX_MANIFEST_BYTES
        } else {
            MAX_ERROR_BODY
        };
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(network)? {
            if body.len() + chunk.len() > limit {
                if !status.is_success() {
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    break;
                }
                return Err(ImageError::BadManifest {
                    what: "manifest",
                    reason: format!(
                        "{url} sends more than the {MAX_MANIFEST_BYTES} bytes a manifest may have"
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if status == reqwest::StatusCode::OK {
            return Ok(body);
        }
        let e = if status == reqwest::StatusCode::UNAUTHORIZED {
            OciDistributionError::UnauthorizedError { url }
        } else if status.is_client_error() {
            match serde_json::from_slice::<OciEnvelope>(&body) {
                Ok(envelope) => OciDistributionError::RegistryError { envelope, url },
                Err(_) => OciDistributionError::ServerError {
                    code: status.as_u16(),
                    url,
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            }
        } else {
            OciDistributionError::ServerError {
                code: status.as_u16(),
                url,
                message: String::from_utf8_lossy(&body).into_owned(),
            }
        };
        Err(map_error(e, r))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::store::BlobStore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A registry that answers `/v2/` and, for manifests, what `route`
    /// says: (status, body length, body byte). Bodies are sent in 64 KiB
    /// writes, as far as the client reads them.
    async fn hostile_registry(route: fn(&str) -> (u16, usize, u8)) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req);
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let (status, len, byte) = if path == "/v2/" {
                        (200, 2, b'{')
                    } else {
                        route(&path)
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {len}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![byte; 64 << 10];
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                });
            }
        });
        addr.to_string()
    }

    fn resolver(registry: &str) -> (ImageResolver, tempfile::TempDir) {
        let t = tempfile::tempdir().unwrap();
        let store = BlobStore::open(t.path().join("images")).unwrap();
        let r = ImageResolver::new(store)
            .unwrap()
            .with_insecure_registries(vec![registry.to_string()])
            .with_credentials(Default::default());
        (r, t)
    }

    /// Issue 15: a registry that sends a manifest without end is cut off
    /// at the cap with a named error; its error bodies are read only in
    /// part, and still named.
    #[tokio::test]
    async fn manifests_from_a_registry_are_bounded() {
        let registry = hostile_registry(|path| {
            if path.ends_with("/manifests/huge") {
                (200, 64 << 20, b' ')
            } else if path.ends_with("/manifests/gone") {
                (404, 0, b' ')
            } else {
                (500, 32 << 20, b'x')
            }
        })
        .await;
        let (r, _t) = resolver(&registry);
        let err = r.pull(&format!("{registry}/x:huge")).await.unwrap_err();
        assert!(
            matches!(&err, ImageError::BadManifest { what: "manifest", reason } if reason.contains("more than the 4194304")),
            "{err}"
        );
        let err = r.pull(&format!("{registry}/x:gone")).await.unwrap_err();
        // The tag list fails too: the repository is unknown.
        assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
        let err = r.pull(&format!("{registry}/x:broken")).await.unwrap_err();
        match err {
            ImageError::Registry { status, body, .. } => {
                assert_eq!(status, 500);
                assert!(body.len() < 1000 && body.starts_with("xxx"), "{body}");
            }
            other => panic!("{other}"),
        }
    }
}
