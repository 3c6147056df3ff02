//! Images from local sources: an OCI image layout directory and a
//! `docker save` archive, imported into the blob store.
//!
//! Blocking code: the resolver runs it on a blocking thread.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path};

use serde::Deserialize;

use super::error::ImageError;
use super::manifest::{
    self, parse_manifest, select_platform, Descriptor, ImageManifest, IndexEntry, Manifest,
    OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_TAR,
};
use super::reference::ImageRef;
use super::store::{BlobStore, Digest};
use super::PullStats;

/// An image found in a local source, its blobs now in the store.
pub(crate) struct Imported {
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
}

fn src_err(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::LocalSource {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Copies `blobs/sha256/<hex>` of a layout into the store (verified),
/// unless the store has it.
fn import_layout_blob(
    store: &BlobStore,
    dir: &Path,
    d: &Digest,
    stats: &mut PullStats,
) -> Result<(), ImageError> {
    if store.contains(d) {
        stats.blobs_cached += 1;
        return Ok(());
    }
    let path = dir.join("blobs/sha256").join(d.hex());
    let file = File::open(&path).map_err(|e| src_err(&path, format!("missing blob {d}: {e}")))?;
    let (_, size, _) = store.import(BufReader::new(file), Some(d))?;
    stats.blobs_fetched += 1;
    stats.bytes_fetched += size;
    Ok(())
}

/// Imports the image `tag` (or the only one) of the OCI layout at `dir`.
pub(crate) fn import_oci_layout(
    store: &BlobStore,
    dir: &Path,
    tag: Option<&str>,
    stats: &mut PullStats,
) -> Result<Imported, ImageError> {
    let layout_file = dir.join("oci-layout");
    let layout = fs::read(&layout_file)
        .map_err(|_| src_err(dir, "not an OCI image layout (no oci-layout file)"))?;
    #[derive(Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let l: Layout =
        serde_json::from_slice(&layout).map_err(|e| src_err(&layout_file, e.to_string()))?;
    if !l.version.starts_with("1.") {
        return Err(src_err(
            &layout_file,
            format!("unsupported layout version {}", l.version),
        ));
    }
    let index_path = dir.join("index.json");
    let index = fs::read(&index_path).map_err(|e| src_err(&index_path, e.to_string()))?;
    let Manifest::Index(entries) = parse_manifest(&index, Some(manifest::OCI_INDEX))? else {
        return Err(src_err(&index_path, "index.json is not an image index"));
    };
    let label = dir.display().to_string();
    let candidates: Vec<IndexEntry> = match tag {
        Some(t) => entries
            .into_iter()
            .filter(|e| {
                e.ref_name
                    .as_deref()
                    .is_some_and(|n| n == t || n.ends_with(&format!(":{t}")))
            })
            .collect(),
        None => entries,
    };
    let entry = match candidates.len() {
        0 => {
            return Err(match tag {
                Some(t) => ImageError::TagNotFound {
                    repository: label,
                    tag: t.to_string(),
                },
                None => src_err(dir, "the layout holds no image"),
            })
        }
        1 => candidates[0].clone(),
        _ if tag.is_none() && candidates.iter().all(|e| e.platform.is_none()) => {
            let names: Vec<&str> = candidates
                .iter()
                .map(|e| e.ref_name.as_deref().unwrap_or("untagged"))
                .collect();
            return Err(src_err(
                dir,
                format!(
                    "the layout holds several images, pick one: {}",
                    names.join(", ")
                ),
            ));
        }
        _ => select_platform(&label, &candidates)?.clone(),
    };
    let mut descriptor = entry.descriptor;
    let mut depth = 0;
    loop {
        import_layout_blob(store, dir, &descriptor.digest, stats)?;
        let bytes = store.read(&descriptor.digest)?;
        match parse_manifest(&bytes, Some(&descriptor.media_type))? {
            Manifest::Image(m) => {
                import_layout_blob(store, dir, &m.config.digest, stats)?;
                for l in &m.layers {
                    import_layout_blob(store, dir, &l.digest, stats)?;
                }
                return Ok(Imported {
                    manifest_digest: descriptor.digest,
                    manifest: m,
                });
            }
            Manifest::Index(nested) => {
                depth += 1;
                if depth > 4 {
                    return Err(src_err(dir, "image indexes nested too deep"));
                }
                descriptor = select_platform(&label, &nested)?.descriptor.clone();
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Opens a docker archive, gzip-compressed or not.
fn open_archive(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, ImageError> {
    let file = File::open(path).map_err(|e| src_err(path, e.to_string()))?;
    let mut r = BufReader::new(file);
    let head = r.fill_buf().map_err(|e| src_err(path, e.to_string()))?;
    let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else {
        Box::new(r)
    };
    Ok(tar::Archive::new(reader))
}

/// A path inside the archive, normalised (`./a/../b` → `b`).
fn archive_path(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.join("/")
}

/// Whether `wanted` names one of `tags` (`busybox:1` matches
/// `docker.io/library/busybox:1` and the other way round).
fn tag_matches(tags: &[String], wanted: &str) -> bool {
    let canon = |s: &str| ImageRef::parse(s).map(|r| r.to_string()).ok();
    let w = canon(wanted);
    tags.iter()
        .any(|t| t == wanted || (w.is_some() && canon(t) == w))
}

/// Captures the first bytes of a stream as it is read.
struct Sniff<R> {
    inner: R,
    head: Vec<u8>,
}

impl<R: Read> Read for Sniff<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.head.len() < 2 {
            let take = (2 - self.head.len()).min(n);
            self.head.extend_from_slice(&buf[..take]);
        }
        Ok(n)
    }
}

/// Imports the image `tag` (or the only one) of a `docker save` archive,
/// computing the digests of its layers and writing it an OCI manifest.
pub(crate) fn import_docker_archive(
    store: &BlobStore,
    path: &Path,
    tag: Option<&str>,
    stats: &mut PullStats,
) -> Result<Imported, ImageError> {
    // Pass 1: manifest.json.
    let mut list: Option<Vec<ArchiveImage>> = None;
    let mut archive = open_archive(path)?;
    for entry in archive
        .entries()
        .map_err(|e| src_err(path, e.to_string()))?
    {
        let mut entry = entry.map_err(|e| src_err(path, format!("not a tar archive: {e}")))?;
        let name = archive_path(&entry.path().map_err(|e| src_err(path, e.to_string()))?);
        if name == "manifest.json" {
            let mut buf = Vec::new();
            entry
                .by_ref()
                .take(16 << 20)
                .read_to_end(&mut buf)
                .map_err(|e| src_err(path, e.to_string()))?;
            list = Some(
                serde_json::from_slice(&buf)
                    .map_err(|e| src_err(path, format!("malformed manifest.json: {e}")))?,
            );
            break;
        }
    }
    let list = list.ok_or_else(|| src_err(path, "not a docker save archive (no manifest.json)"))?;
    let label = path.display().to_string();
    let all_tags = || {
        let t: Vec<String> = list
            .iter()
            .flat_map(|i| i.repo_tags.clone().unwrap_or_default())
            .collect();
        if t.is_empty() {
            "untagged images".to_string()
        } else {
            t.join(", ")
        }
    };
    let image = match tag {
        Some(t) => list
            .iter()
            .find(|i| {
                i.repo_tags
                    .as_deref()
                    .is_some_and(|tags| tag_matches(tags, t))
            })
            .ok_or_else(|| ImageError::TagNotFound {
                repository: label.clone(),
                tag: t.to_string(),
            })?,
        None if list.len() == 1 => &list[0],
        None if list.is_empty() => return Err(src_err(path, "the archive holds no image")),
        None => {
            return Err(src_err(
                path,
                format!("the archive holds several images, pick one: {}", all_tags()),
            ))
        }
    };

    // Pass 2: the config and the layers.
    let config_name = archive_path(Path::new(&image.config));
    let layer_names: Vec<String> = image
        .layers
        .iter()
        .map(|l| archive_path(Path::new(l)))
        .collect();
    let mut config: Option<Vec<u8>> = None;
    let mut found: HashMap<String, Descriptor> = HashMap::new();
    let mut aliases: HashMap<String, String> = HashMap::new();
    let mut archive = open_archive(path)?;
    for entry in archive
        .entries()
        .map_err(|e| src_err(path, e.to_string()))?
    {
        let mut entry = entry.map_err(|e| src_err(path, format!("not a tar archive: {e}")))?;
        let entry_path = entry
            .path()
            .map_err(|e| src_err(path, e.to_string()))?
            .into_owned();
        let name = archive_path(&entry_path);
        let kind = entry.header().entry_type();
        if name == config_name {
            let mut buf = Vec::new();
            entry
                .by_ref()
                .take(16 << 20)
                .read_to_end(&mut buf)
                .map_err(|e| src_err(path, e.to_string()))?;
            config = Some(buf);
        } else if layer_names.contains(&name) && !found.contains_key(&name) {
            if kind.is_symlink() || kind.is_hard_link() {
                // `docker save` links a layer shared by two image ids.
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .into_owned();
                let target = if kind.is_symlink() {
                    archive_path(&entry_path.parent().unwrap_or(Path::new("")).join(target))
                } else {
                    archive_path(&target)
                };
                aliases.insert(name, target);
                continue;
            }
            let mut sniff = Sniff {
                inner: &mut entry,
                head: Vec::new(),
            };
            let (digest, size, new) = store.import(&mut sniff, None)?;
            let media_type = if sniff.head == [0x1f, 0x8b] {
                OCI_LAYER_GZIP
            } else {
                OCI_LAYER_TAR
            };
            if new {
                stats.blobs_fetched += 1;
                stats.bytes_fetched += size;
            } else {
                stats.blobs_cached += 1;
            }
            found.insert(
                name,
                Descriptor {
                    media_type: media_type.to_string(),
                    digest,
                    size,
                },
            );
        }
    }
    // Layers named only through links take their target's descriptor.
    for (name, target) in aliases {
        if let Some(d) = found.get(&target).cloned() {
            found.insert(name, d);
        }
    }
    let config = config.ok_or_else(|| {
        src_err(
            path,
            format!("config {} missing from the archive", image.config),
        )
    })?;
    let config_digest = Digest::of(&config);
    store.write_bytes(&config_digest, &config)?;
    let layers = layer_names
        .iter()
        .map(|n| {
            found
                .get(n)
                .cloned()
                .ok_or_else(|| src_err(path, format!("layer {n} missing from the archive")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config_desc = Descriptor {
        media_type: OCI_CONFIG.to_string(),
        digest: config_digest,
        size: config.len() as u64,
    };
    let manifest_bytes = manifest::write_manifest(&config_desc, &layers);
    let manifest_digest = Digest::of(&manifest_bytes);
    store.write_bytes(&manifest_digest, &manifest_bytes)?;
    Ok(Imported {
        manifest_digest,
        manifest: ImageManifest {
            config: config_desc,
            layers,
        },
    })
}
