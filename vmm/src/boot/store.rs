//! Prepared boot images kept on disk, across processes.
//!
//! Preparing the kernel (laying its segments out at their guest addresses)
//! and the initramfs costs the first VM of every process some 15 ms here;
//! every CLI call and fresh test process would pay it. With a store
//! directory ([`crate::VmConfig::image_cache`]) the first process on a host
//! that boots a given file prepares it and writes the result there; later
//! processes map the stored file `MAP_PRIVATE` as they would the memfd.
//!
//! A stored image is one file, `<kind>-<hash>.img`: a JSON header in the
//! first page, then the image. A kernel's bytes sit at file offset = guest
//! address (its lowest segment is above 1 MiB, clear of the header); an
//! initramfs's bytes start at the second page. The header names the source
//! file's identity ([`FileKey`]), this crate's version and the layout's
//! format, and an image whose header does not match, or whose file is
//! shorter than the header says, is prepared again. Files are written under
//! a temporary name, synced and renamed into place, and never written
//! again: a VM mapping one never sees it change. The few newest of each
//! kind are kept.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::template::{FileKey, InitramfsImage, KernelImage};

/// The header's room: the first page.
const HEADER: u64 = 4096;
/// Bumped whenever what is stored, or where, changes.
const FORMAT: u32 = 1;
/// How many images of each kind the directory keeps.
const KEEP: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Kernel,
    Initramfs,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel-",
            Kind::Initramfs => "initramfs-",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    format: u32,
    vmm: String,
    kind: Kind,
    source: FileKey,
    /// The file's whole length.
    len: u64,
    /// Kernel: the first page of its lowest segment, the end of its image,
    /// its PVH entry. Initramfs: its size in `end`, `start` and `entry` 0.
    start: u64,
    end: u64,
    entry: u64,
}

impl Header {
    fn new(kind: Kind, source: FileKey, len: u64, start: u64, end: u64, entry: u64) -> Header {
        Header {
            format: FORMAT,
            vmm: env!("CARGO_PKG_VERSION").to_string(),
            kind,
            source,
            len,
            start,
            end,
            entry,
        }
    }

    /// What a stored file for `kind` and `source` must say, but for what
    /// only the image knows.
    fn matches(&self, kind: Kind, source: &FileKey) -> bool {
        self.format == FORMAT
            && self.vmm == env!("CARGO_PKG_VERSION")
            && self.kind == kind
            && self.source == *source
    }
}

/// The stored file's name for `kind` and `source`: a hash of what the
/// header must match (FNV-1a, stable across builds).
fn file_name(kind: Kind, source: &FileKey) -> String {
    let id = format!(
        "{FORMAT}/{}/{kind:?}/{}",
        env!("CARGO_PKG_VERSION"),
        serde_json::to_string(source).unwrap_or_default()
    );
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}{h:016x}.img", kind.prefix())
}

/// The stored image for `kind` and `source` in `dir`, with its header, if
/// there is a valid one.
fn open(dir: &Path, kind: Kind, source: &FileKey) -> Option<(File, Header)> {
    let path = dir.join(file_name(kind, source));
    let file = File::open(&path).ok()?;
    let mut page = vec![0u8; HEADER as usize];
    let n = file.read_at(&mut page, 0).ok()?;
    let text = &page[..n];
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    let header: Header = serde_json::from_slice(text).ok()?;
    let len = file.metadata().ok()?.len();
    if !header.matches(kind, source) || header.len != len {
        tracing::debug!(path = %path.display(), "stored boot image does not match; preparing it again");
        return None;
    }
    Some((file, header))
}

/// The stored kernel prepared from the file `source` names, if any.
pub fn load_kernel(dir: &Path, source: &FileKey) -> Option<KernelImage> {
    let (file, h) = open(dir, Kind::Kernel, source)?;
    let page_end = h.end.div_ceil(HEADER) * HEADER;
    let sane = h.start >= HEADER && h.start % HEADER == 0 && h.end > h.start && h.len >= page_end;
    sane.then_some(KernelImage {
        file,
        start: h.start,
        end: h.end,
        entry: h.entry,
    })
}

/// The stored initramfs copied from the file `source` names, if any.
pub fn load_initramfs(dir: &Path, source: &FileKey) -> Option<InitramfsImage> {
    let (file, h) = open(dir, Kind::Initramfs, source)?;
    let sane = h.end == source.size() && h.len == HEADER + h.end.div_ceil(HEADER) * HEADER;
    sane.then_some(InitramfsImage {
        file,
        offset: HEADER,
        size: h.end,
    })
}

/// Stores a kernel prepared from the file `source` names. Failing to store
/// costs the next process the preparation, nothing more: the error is the
/// caller's to log.
pub fn save_kernel(dir: &Path, source: &FileKey, image: &KernelImage) -> io::Result<()> {
    let len = image.end.div_ceil(HEADER) * HEADER;
    let header = Header::new(
        Kind::Kernel,
        *source,
        len,
        image.start,
        image.end,
        image.entry,
    );
    let ranges = crate::sparse::data_extents(&image.file, image.start, len)?
        .into_iter()
        .map(|(a, b)| (a, a, b - a))
        .collect::<Vec<_>>();
    save(dir, &header, &image.file, &ranges)
}

/// Stores an initramfs copied from the file `source` names (see
/// [`save_kernel`]).
pub fn save_initramfs(dir: &Path, source: &FileKey, image: &InitramfsImage) -> io::Result<()> {
    let len = HEADER + image.size.div_ceil(HEADER) * HEADER;
    let header = Header::new(Kind::Initramfs, *source, len, 0, image.size, 0);
    save(
        dir,
        &header,
        &image.file,
        &[(image.offset, HEADER, image.size)],
    )
}

/// Writes `header` and the `(from, to, len)` ranges of `src` into a new
/// file, synced, then renames it into place and drops the oldest images of
/// its kind past [`KEEP`].
fn save(dir: &Path, header: &Header, src: &File, ranges: &[(u64, u64, u64)]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let name = file_name(header.kind, &header.source);
    let tmp = dir.join(format!(
        ".{name}.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&tmp)?;
        let text = serde_json::to_vec(header).map_err(io::Error::other)?;
        if text.len() as u64 >= HEADER {
            return Err(io::Error::other("boot image header too long"));
        }
        out.set_len(header.len)?;
        out.write_all_at(&text, 0)?;
        for &(from, to, len) in ranges {
            out.seek(SeekFrom::Start(to))?;
            crate::memory::sendfile_all(&out, src, from, len)?;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, dir.join(&name))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    prune(dir, header.kind);
    Ok(())
}

/// Keeps the [`KEEP`] newest images of `kind`; VMs mapping a removed one
/// keep it alive through their mappings.
fn prune(dir: &Path, kind: Kind) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(kind.prefix()) && name.ends_with(".img")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    images.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in images.into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn source(contents: &[u8]) -> (tempfile::NamedTempFile, FileKey) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents).unwrap();
        let key = FileKey::of(f.as_file()).unwrap();
        (f, key)
    }

    fn initramfs(bytes: &[u8]) -> InitramfsImage {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(bytes, 0).unwrap();
        InitramfsImage {
            file: f,
            offset: 0,
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn a_stored_initramfs_comes_back_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (_src, key) = source(&bytes);
        assert!(load_initramfs(dir.path(), &key).is_none());
        save_initramfs(dir.path(), &key, &initramfs(&bytes)).unwrap();
        let got = load_initramfs(dir.path(), &key).expect("stored");
        assert_eq!((got.offset, got.size), (HEADER, bytes.len() as u64));
        let mut back = vec![0u8; bytes.len()];
        got.file.read_exact_at(&mut back, got.offset).unwrap();
        assert_eq!(back, bytes);
        // Nothing but the image is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_stored_kernel_keeps_its_layout_and_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (_src, key) = source(b"vmlinux");
        let f = tempfile::tempfile().unwrap();
        let start = 0x100_0000u64;
        f.set_len(start + 3 * HEADER).unwrap();
        f.write_all_at(b"text", start).unwrap();
        f.write_all_at(b"data", start + 2 * HEADER).unwrap();
        let image = KernelImage {
            file: f,
            start,
            end: start + 2 * HEADER + 100,
            entry: start + 0x40,
        };
        save_kernel(dir.path(), &key, &image).unwrap();
        let got = load_kernel(dir.path(), &key).expect("stored");
        assert_eq!(
            (got.start, got.end, got.entry),
            (image.start, image.end, image.entry)
        );
        let mut b = [0u8; 4];
        got.file.read_exact_at(&mut b, start).unwrap();
        assert_eq!(&b, b"text");
        got.file.read_exact_at(&mut b, start + 2 * HEADER).unwrap();
        assert_eq!(&b, b"data");
        got.file.read_exact_at(&mut b, start + HEADER).unwrap();
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn a_changed_source_or_a_damaged_file_is_prepared_again() {
        let dir = tempfile::tempdir().unwrap();
        let (src, key) = source(b"0123456789");
        save_initramfs(dir.path(), &key, &initramfs(b"0123456789")).unwrap();
        let path = dir.path().join(file_name(Kind::Initramfs, &key));

        // The source rewritten: its identity changes, so no stored image.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(src.path(), b"9876543210").unwrap();
        let changed = FileKey::of(&File::open(src.path()).unwrap()).unwrap();
        assert_ne!(changed, key);
        assert!(load_initramfs(dir.path(), &changed).is_none());

        // Truncated.
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER + 1).unwrap();
        assert!(load_initramfs(dir.path(), &key).is_none());

        // A header that is not JSON.
        f.set_len(2 * HEADER).unwrap();
        f.write_all_at(b"\x7fELF garbage", 0).unwrap();
        assert!(load_initramfs(dir.path(), &key).is_none());

        // A kernel's name asked for an initramfs's key finds nothing.
        assert!(load_kernel(dir.path(), &key).is_none());
    }

    #[test]
    fn the_directory_keeps_the_newest_few() {
        let dir = tempfile::tempdir().unwrap();
        let sources: Vec<_> = (0..KEEP + 2)
            .map(|i| source(format!("initramfs {i}").as_bytes()))
            .collect();
        for (_, key) in &sources {
            save_initramfs(dir.path(), key, &initramfs(b"abc")).unwrap();
            // Distinct modification times.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let kept: Vec<bool> = sources
            .iter()
            .map(|(_, key)| dir.path().join(file_name(Kind::Initramfs, key)).exists())
            .collect();
        assert_eq!(kept.iter().filter(|k| **k).count(), KEEP);
        assert!(!kept[0] && !kept[1], "the oldest go: {kept:?}");
    }
}
