//! Parsing of image indexes, manifests and configs (OCI and Docker v2
//! schema 2). The bytes come from registries and archives: untrusted, so
//! every problem is a `BadManifest` naming what was wrong, never a panic.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::store::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The annotation an OCI layout's index.json uses to tag a manifest.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Every manifest media type a pull accepts.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Layer media types the guest can unpack (tar, optionally gzip).
const LAYER_TYPES: &[&str] = &[
    OCI_LAYER_TAR,
    OCI_LAYER_GZIP,
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// A content descriptor: what a manifest says about a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// One entry of an image index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub descriptor: Descriptor,
    /// `os/architecture[/variant]` when the entry says.
    pub platform: Option<String>,
    /// The `org.opencontainers.image.ref.name` annotation (OCI layouts).
    pub ref_name: Option<String>,
}

/// The largest manifest or index read (a registry's own limit is 4 MiB
/// as well): past it, a pull stops reading with a named error.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The largest image config fetched and parsed.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Most layers of one image (overlayfs stacks far fewer).
pub const MAX_LAYERS: usize = 1024;
/// Most entries of one image index.
pub const MAX_INDEX_ENTRIES: usize = 1024;

/// An image manifest: one config and its layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

impl ImageManifest {
    /// The bytes of the layers, as their descriptors announce them.
    /// `parse_manifest` refuses a manifest whose sizes overflow; this
    /// saturates for one built elsewhere.
    pub fn layer_bytes(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.size))
    }

    /// The layers' and the config's bytes.
    pub fn total_bytes(&self) -> u64 {
        self.layer_bytes().saturating_add(self.config.size)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Index(Vec<IndexEntry>),
    Image(ImageManifest),
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<Vec<RawIndexEntry>>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
struct RawIndexEntry {
    #[serde(flatten)]
    descriptor: RawDescriptor,
    platform: Option<RawPlatform>,
    annotations: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

fn bad(what: &'static str, reason: impl Into<String>) -> ImageError {
    ImageError::BadManifest {
        what,
        reason: reason.into(),
    }
}

fn descriptor(
    what: &'static str,
    raw: RawDescriptor,
    default_type: &str,
) -> Result<Descriptor, ImageError> {
    let digest = Digest::parse(&raw.digest)
        .map_err(|_| bad(what, format!("bad digest {:?}", raw.digest)))?;
    let size =
        u64::try_from(raw.size).map_err(|_| bad(what, format!("negative size {}", raw.size)))?;
    Ok(Descriptor {
        media_type: raw.media_type.unwrap_or_else(|| default_type.to_string()),
        digest,
        size,
    })
}

/// Parses an index or an image manifest. `content_type` (the HTTP header,
/// or a descriptor's media type) is used when the body does not say.
pub fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ImageError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(bad(
            "manifest",
            format!(
                "{} bytes, larger than the {MAX_MANIFEST_BYTES} a manifest may have",
                bytes.len()
            ),
        ));
    }
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| bad("manifest", e.to_string()))?;
    if let Some(v) = raw.schema_version {
        if v != 2 {
            return Err(bad(
                "manifest",
                format!("schema version {v}, only 2 is supported"),
            ));
        }
    }
    let media_type = raw.media_type.as_deref().or(content_type).unwrap_or("");
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        // No (or a generic) type: decide by shape.
        _ if raw.manifests.is_some() => true,
        _ if raw.layers.is_some() => false,
        other => {
            return Err(ImageError::UnsupportedMediaType {
                what: "manifest",
                media_type: other.to_string(),
            });
        }
    };
    if is_index {
        let entries = raw
            .manifests
            .ok_or_else(|| bad("image index", "no manifests"))?;
        if entries.len() > MAX_INDEX_ENTRIES {
            return Err(bad(
                "image index",
                format!("{} entries, at most {MAX_INDEX_ENTRIES}", entries.len()),
            ));
        }
        let entries = entries
            .into_iter()
            .map(|e| {
                Ok(IndexEntry {
                    descriptor: descriptor("image index", e.descriptor, OCI_MANIFEST)?,
                    platform: e.platform.map(|p| match p.variant {
                        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                        None => format!("{}/{}", p.os, p.architecture),
                    }),
                    ref_name: e.annotations.and_then(|mut a| a.remove(REF_NAME)),
                })
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        return Ok(Manifest::Index(entries));
    }
    let config = descriptor(
        "image manifest",
        raw.config
            .ok_or_else(|| bad("image manifest", "no config"))?,
        OCI_CONFIG,
    )?;
    if config.size > MAX_CONFIG_BYTES {
        return Err(bad(
            "image manifest",
            format!(
                "a config of {} bytes, larger than the {MAX_CONFIG_BYTES} a config may have",
                config.size
            ),
        ));
    }
    let layers = raw
        .layers
        .ok_or_else(|| bad("image manifest", "no layers"))?;
    if layers.len() > MAX_LAYERS {
        return Err(bad(
            "image manifest",
            format!("{} layers, at most {MAX_LAYERS}", layers.len()),
        ));
    }
    let layers = layers
        .into_iter()
        .map(|l| descriptor("image manifest", l, OCI_LAYER_GZIP))
        .collect::<Result<Vec<_>, ImageError>>()?;
    for l in &layers {
        if !LAYER_TYPES.contains(&l.media_type.as_str()) {
            return Err(ImageError::UnsupportedMediaType {
                what: "layer",
                media_type: l.media_type.clone(),
            });
        }
    }
    let total = layers
        .iter()
        .try_fold(config.size, |sum, l| sum.checked_add(l.size));
    if total.is_none() {
        return Err(bad("image manifest", "its layer sizes add up past 2^64"));
    }
    Ok(Manifest::Image(ImageManifest { config, layers }))
}

/// The linux/amd64 entry of an index, or `NoPlatform` listing what there is.
pub fn select_platform<'a>(
    reference: &str,
    entries: &'a [IndexEntry],
) -> Result<&'a IndexEntry, ImageError> {
    let amd64 = |e: &&IndexEntry| {
        e.platform
            .as_deref()
            .is_some_and(|p| p == "linux/amd64" || p.starts_with("linux/amd64/"))
    };
    if let Some(e) = entries.iter().find(amd64) {
        return Ok(e);
    }
    // An index without platforms and one manifest (e.g. an OCI layout) is that manifest.
    if entries.len() == 1 && entries[0].platform.is_none() {
        return Ok(&entries[0]);
    }
    let found: Vec<&str> = entries
        .iter()
        .map(|e| e.platform.as_deref().unwrap_or("unknown"))
        .collect();
    Err(ImageError::NoPlatform {
        reference: reference.to_string(),
        found: if found.is_empty() {
            "nothing".into()
        } else {
            found.join(", ")
        },
    })
}

/// The parts of an image config a container needs (OCI `config` object).
pub use smol_protocol::image::ImageConfig;

/// A parsed image config file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConfigFile {
    pub created: Option<String>,
    pub architecture: Option<String>,
    pub os: Option<String>,
    pub config: ImageConfig,
    /// Digests of the uncompressed layers.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawConfigFile {
    created: Option<String>,
    architecture: Option<String>,
    os: Option<String>,
    config: Option<RawRunConfig>,
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRootfs {
    diff_ids: Option<Vec<String>>,
}

/// Parses an image config; an image for another platform is `NoPlatform`.
pub fn parse_config(reference: &str, bytes: &[u8]) -> Result<ConfigFile, ImageError> {
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(bad(
            "image config",
            format!(
                "{} bytes, larger than the {MAX_CONFIG_BYTES} a config may have",
                bytes.len()
            ),
        ));
    }
    let raw: RawConfigFile =
        serde_json::from_slice(bytes).map_err(|e| bad("image config", e.to_string()))?;
    if let (Some(os), Some(arch)) = (&raw.os, &raw.architecture) {
        if os != "linux" || arch != "amd64" {
            return Err(ImageError::NoPlatform {
                reference: reference.to_string(),
                found: format!("{os}/{arch}"),
            });
        }
    }
    let run = raw.config.unwrap_or(RawRunConfig {
        env: None,
        working_dir: None,
        user: None,
        entrypoint: None,
        cmd: None,
    });
    let diff_ids = raw
        .rootfs
        .and_then(|r| r.diff_ids)
        .unwrap_or_default()
        .iter()
        .map(|d| Digest::parse(d).map_err(|_| bad("image config", format!("bad diff id {d:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ConfigFile {
        created: raw.created,
        architecture: raw.architecture,
        os: raw.os,
        config: ImageConfig {
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
        },
        diff_ids,
    })
}

/// Serialises an OCI image manifest (used for images imported from docker
/// archives, which carry none). Field order is fixed, so the digest is stable.
pub fn write_manifest(config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
        #[serde(rename = "mediaType")]
        media_type: &'static str,
        config: &'a Descriptor,
        layers: &'a [Descriptor],
    }
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(&Out {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config,
        layers,
    })
    .expect("manifest serializes")
}

#[cfg(test)]
mod tests {
    /// Issue 15: what a hostile registry or layout can put in a manifest
    /// is bounded, and sizes are added with checks.
    #[test]
    fn manifests_are_bounded() {
        let d = |size: u64| {
            serde_json::json!({
                "mediaType": OCI_LAYER_GZIP,
                "digest": format!("sha256:{}", "a".repeat(64)),
                "size": size,
            })
        };
        let manifest = |config: serde_json::Value, layers: Vec<serde_json::Value>| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config,
                "layers": layers,
            }))
            .unwrap()
        };
        let ok = manifest(
            serde_json::json!({"mediaType": OCI_CONFIG, "digest": format!("sha256:{}", "b".repeat(64)), "size": 10}),
            vec![d(5), d(7)],
        );
        let Manifest::Image(m) = parse_manifest(&ok, None).unwrap() else {
            panic!("an image manifest")
        };
        assert_eq!((m.layer_bytes(), m.total_bytes()), (12, 22));

        let cfg = |size: u64| serde_json::json!({"mediaType": OCI_CONFIG, "digest": format!("sha256:{}", "b".repeat(64)), "size": size});
        let err = parse_manifest(&manifest(cfg(10), vec![d(i64::MAX as u64); 3]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("add up"), "{err}");
        let err = parse_manifest(&manifest(cfg(MAX_CONFIG_BYTES + 1), vec![d(1)]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("config of 8388609 bytes"), "{err}");
        let err = parse_manifest(&manifest(cfg(1), vec![d(1); MAX_LAYERS + 1]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1025 layers"), "{err}");
        let huge = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let err = parse_manifest(&huge, None).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        let err = parse_config("r", &vec![b' '; MAX_CONFIG_BYTES as usize + 1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("image config"), "{err}");
    }

    use super::*;
    use rand::{Rng, SeedableRng};

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn index_and_platform_selection() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":10,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":11,"platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":12,"platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let Manifest::Index(entries) = parse_manifest(index.as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(
            select_platform("x", &entries)
                .unwrap()
                .descriptor
                .digest
                .to_string(),
            d('b')
        );
        let err = select_platform("x", &entries[..1]).unwrap_err();
        assert!(err.to_string().contains("linux/arm64/v8"), "{err}");
    }

    #[test]
    fn docker_manifest_and_config() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
              "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":5}},
              "layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","digest":"{}","size":7}}]}}"#,
            d('a'),
            d('b')
        );
        let Manifest::Image(m) = parse_manifest(m.as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(m.layers[0].size, 7);
        let c = br#"{"created":"2024-01-01T00:00:00Z","architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/bin","A=b"],"WorkingDir":"/w","User":"1000:1000","Entrypoint":["/bin/sh","-c"],"Cmd":null},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = parse_config("x", c).unwrap();
        assert_eq!(c.config.env, vec!["PATH=/bin", "A=b"]);
        assert_eq!(c.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.config.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.config.entrypoint, vec!["/bin/sh", "-c"]);
        assert!(c.config.cmd.is_empty());
        let arm = br#"{"architecture":"arm64","os":"linux"}"#;
        assert!(matches!(
            parse_config("x", arm),
            Err(ImageError::NoPlatform { .. })
        ));
    }

    #[test]
    fn bad_manifests_are_named() {
        let cases: Vec<String> = vec![
            "not json".into(),
            r#"{"schemaVersion":1}"#.into(),
            r#"{"schemaVersion":2,"mediaType":"text/plain"}"#.into(),
            format!(r#"{{"config":{{"digest":"sha256:00","size":1}},"layers":[]}}"#),
            format!(
                r#"{{"config":{{"digest":"{}","size":-1}},"layers":[]}}"#,
                d('a')
            ),
            format!(
                r#"{{"config":{{"digest":"{}","size":1}},"layers":[{{"mediaType":"application/zip","digest":"{}","size":1}}]}}"#,
                d('a'),
                d('b')
            ),
        ];
        for c in cases {
            let err = parse_manifest(c.as_bytes(), None).unwrap_err();
            assert!(
                matches!(
                    err,
                    ImageError::BadManifest { .. } | ImageError::UnsupportedMediaType { .. }
                ),
                "{c}: {err}"
            );
        }
    }

    #[test]
    fn written_manifest_parses_back() {
        let cfg = Descriptor {
            media_type: OCI_CONFIG.into(),
            digest: Digest::of(b"c"),
            size: 1,
        };
        let l = Descriptor {
            media_type: OCI_LAYER_TAR.into(),
            digest: Digest::of(b"l"),
            size: 2,
        };
        let bytes = write_manifest(&cfg, std::slice::from_ref(&l));
        let Manifest::Image(m) = parse_manifest(&bytes, None).unwrap() else {
            panic!()
        };
        assert_eq!((m.config, m.layers), (cfg, vec![l]));
    }

    /// Fuzz-equivalent: random and mutated manifests never panic the parsers.
    #[test]
    fn random_bytes_never_panic() {
        let seed = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}],
               "config":{{"digest":"{}","size":1}},"layers":[{{"digest":"{}","size":1}}],"Env":["A"]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..5000 {
            let mut b = seed.as_bytes().to_vec();
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                match rng.random_range(0..3) {
                    0 => b[i] = rng.random(),
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, rng.random()),
                }
            }
            let _ = parse_manifest(&b, None);
            let _ = parse_config("x", &b);
        }
    }
}
