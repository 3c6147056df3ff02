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
use super::progress::Reporter;
use super::reference::ImageRef;
use super::store::{BlobStore, Digest};
use super::{PullEvent, PullStats};

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
/// unless the store has it; returns whether it had. `layer`: the reporter,
/// index and size of a layer, whose progress is reported.
fn import_layout_blob(
    store: &BlobStore,
    dir: &Path,
    d: &Digest,
    stats: &mut PullStats,
    layer: Option<(&Reporter, usize, u64)>,
) -> Result<bool, ImageError> {
    if store.contains(d) {
        stats.blobs_cached += 1;
        return Ok(true);
    }
    let path = dir.join("blobs/sha256").join(d.hex());
    let file = File::open(&path).map_err(|e| src_err(&path, format!("missing blob {d}: {e}")))?;
    let file = BufReader::new(file);
    let (_, size, _) = match layer {
        Some((reporter, index, total)) => {
            store.import(reporter.reading(file, index, total), Some(d))?
        }
        None => store.import(file, Some(d))?,
    };
    stats.blobs_fetched += 1;
    stats.bytes_fetched += size;
    Ok(false)
}

/// The `Resolved` event of a local image.
fn report_resolved(reporter: &Reporter, label: &str, digest: Option<&Digest>, layer_sizes: &[u64]) {
    reporter.report(&PullEvent::Resolved {
        reference: label.to_string(),
        digest: digest.cloned(),
        layers: layer_sizes.len(),
        bytes: layer_sizes.iter().sum(),
    });
}

/// Imports the image `tag` (or the only one) of the OCI layout at `dir`;
/// `source` names it in progress events.
pub(crate) fn import_oci_layout(
    store: &BlobStore,
    dir: &Path,
    tag: Option<&str>,
    source: &str,
    stats: &mut PullStats,
    reporter: &Reporter,
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
        import_layout_blob(store, dir, &descriptor.digest, stats, None)?;
        let bytes = store.read(&descriptor.digest)?;
        match parse_manifest(&bytes, Some(&descriptor.media_type))? {
            Manifest::Image(m) => {
                import_layout_blob(store, dir, &m.config.digest, stats, None)?;
                let sizes: Vec<u64> = m.layers.iter().map(|l| l.size).collect();
                report_resolved(reporter, source, Some(&descriptor.digest), &sizes);
                for (index, l) in m.layers.iter().enumerate() {
                    let layer = Some((reporter, index, l.size));
                    let cached = import_layout_blob(store, dir, &l.digest, stats, layer)?;
                    reporter.report(&PullEvent::LayerDone {
                        index,
                        digest: l.digest.clone(),
                        size: l.size,
                        cached,
                    });
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

/// Where a link entry of the archive points (normalised).
fn link_target(entry: &tar::Entry<'_, impl Read>, entry_path: &Path) -> String {
    let target = entry
        .link_name()
        .ok()
        .flatten()
        .unwrap_or_default()
        .into_owned();
    if entry.header().entry_type().is_symlink() {
        archive_path(&entry_path.parent().unwrap_or(Path::new("")).join(target))
    } else {
        archive_path(&target)
    }
}

/// The sizes of an archive's files, links followed.
#[derive(Default)]
struct EntrySizes {
    files: HashMap<String, u64>,
    links: HashMap<String, String>,
}

impl EntrySizes {
    fn get(&self, name: &str) -> Option<u64> {
        let mut name = name;
        // A few hops: `docker save` links a shared layer to its first copy.
        for _ in 0..8 {
            if let Some(s) = self.files.get(name) {
                return Some(*s);
            }
            name = self.links.get(name)?;
        }
        None
    }
}

/// Imports the image `tag` (or the only one) of a `docker save` archive,
/// computing the digests of its layers and writing it an OCI manifest;
/// `source` names it in progress events.
pub(crate) fn import_docker_archive(
    store: &BlobStore,
    path: &Path,
    tag: Option<&str>,
    source: &str,
    stats: &mut PullStats,
    reporter: &Reporter,
) -> Result<Imported, ImageError> {
    // Pass 1: manifest.json, and the layers' sizes for progress (on until
    // they are all known: `docker save` writes manifest.json last anyway).
    let mut list: Option<Vec<ArchiveImage>> = None;
    let mut sizes = EntrySizes::default();
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
        if kind.is_symlink() || kind.is_hard_link() {
            sizes
                .links
                .insert(name.clone(), link_target(&entry, &entry_path));
        } else {
            sizes.files.insert(name.clone(), entry.size());
        }
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
        }
        let all_known = |l: &Vec<ArchiveImage>| {
            l.iter()
                .flat_map(|i| &i.layers)
                .all(|n| sizes.get(&archive_path(Path::new(n))).is_some())
        };
        if list.as_ref().is_some_and(all_known) {
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
    let layer_sizes: Vec<u64> = layer_names
        .iter()
        .map(|n| sizes.get(n).unwrap_or(0))
        .collect();
    // No manifest digest yet: smol writes the manifest once the layers are read.
    report_resolved(reporter, source, None, &layer_sizes);
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
                aliases.insert(name, link_target(&entry, &entry_path));
                continue;
            }
            let indices: Vec<usize> = (0..layer_names.len())
                .filter(|i| layer_names[*i] == name)
                .collect();
            let total = entry.size();
            let mut sniff = Sniff {
                inner: reporter.reading(&mut entry, indices[0], total),
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
            for index in indices {
                reporter.report(&PullEvent::LayerDone {
                    index,
                    digest: digest.clone(),
                    size,
                    cached: !new,
                });
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
            for index in (0..layer_names.len()).filter(|i| layer_names[*i] == name) {
                reporter.report(&PullEvent::LayerDone {
                    index,
                    digest: d.digest.clone(),
                    size: d.size,
                    cached: true,
                });
            }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::image::ProgressFn;

    fn add(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    /// manifest.json first, a layer shared through a symlink: the sizes
    /// are still known up front and every layer is reported done once.
    #[test]
    fn archive_progress_with_manifest_first_and_a_linked_layer() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (vec![1u8; 3000], vec![2u8; 5000]);
        let manifest = serde_json::json!([{
            "Config": "config.json",
            "RepoTags": ["smol/t:1"],
            "Layers": ["a/layer.tar", "b/layer.tar", "c/layer.tar"],
        }]);
        let mut b = tar::Builder::new(Vec::new());
        add(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        add(&mut b, "a/layer.tar", &one);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "c/layer.tar", "../a/layer.tar")
            .unwrap();
        add(&mut b, "b/layer.tar", &two);
        add(&mut b, "config.json", b"{}");
        let archive = dir.path().join("t.tar");
        std::fs::write(&archive, b.into_inner().unwrap()).unwrap();

        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let reporter =
            Reporter::new([
                Arc::new(move |e: &PullEvent| sink.lock().unwrap().push(e.clone())) as ProgressFn,
            ]);
        let store = BlobStore::open(dir.path().join("images")).unwrap();
        let mut stats = PullStats::default();
        let imported =
            import_docker_archive(&store, &archive, None, "t", &mut stats, &reporter).unwrap();
        assert_eq!(imported.manifest.layers.len(), 3);

        let ev = events.lock().unwrap();
        assert_eq!(
            ev[0],
            PullEvent::Resolved {
                reference: "t".into(),
                digest: None,
                layers: 3,
                bytes: 3000 + 5000 + 3000,
            }
        );
        let mut done: Vec<(usize, u64, bool)> = ev
            .iter()
            .filter_map(|e| match e {
                PullEvent::LayerDone {
                    index,
                    size,
                    cached,
                    ..
                } => Some((*index, *size, *cached)),
                _ => None,
            })
            .collect();
        done.sort();
        assert_eq!(
            done,
            vec![(0, 3000, false), (1, 5000, false), (2, 3000, true)]
        );
    }
}
