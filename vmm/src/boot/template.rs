//! Boot images prepared once per process and mapped copy-on-write.
//!
//! Copying the kernel (about 10 MiB of segments) and the initramfs into
//! every VM's memory costs milliseconds: each page is allocated and
//! filled, and on nested hosts every fresh page is also a fault one level
//! down. Instead the first VM that boots a given file prepares it in a
//! sealed memfd: the kernel laid out at its guest physical addresses (file
//! offset = guest address), the initramfs as it is. Every VM then maps it
//! `MAP_PRIVATE` over its RAM ([`GuestRam::map_private`]): the guest reads
//! the shared pages, its writes (the kernel's data and bss, the initramfs
//! pages it frees and reuses) are copied on first touch, and the prepared
//! image never changes.
//!
//! A file is known by its device, inode, size and modification and change
//! times (from `fstat` of the opened file), so rebuilding a kernel in place
//! or replacing it prepares a new image. The few most recent images of each
//! kind are kept; a VM's mapping keeps its image alive past eviction.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use crate::memory::GuestRam;

/// How many prepared images of each kind a process keeps.
const KEEP: usize = 4;

/// The identity of an opened file's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    pub fn of(file: &File) -> io::Result<FileKey> {
        let m = file.metadata()?;
        Ok(FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The file's size when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A small most-recently-used cache of prepared images.
pub struct Cache<T> {
    entries: Mutex<Vec<(FileKey, Arc<T>)>>,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Cache<T> {
    pub const fn new() -> Self {
        Cache {
            entries: Mutex::new(Vec::new()),
        }
    }

    /// The image for `key`, prepared by `build` if it is not cached. The
    /// lock is not held while building (a kernel and an initramfs prepare
    /// in parallel); two threads preparing the same file both succeed and
    /// the later one's image is kept.
    pub fn get_or_build<E>(
        &self,
        key: FileKey,
        build: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        if let Some(hit) = self.lock().iter().find(|(k, _)| *k == key) {
            return Ok(hit.1.clone());
        }
        let built = Arc::new(build()?);
        let mut entries = self.lock();
        entries.retain(|(k, _)| *k != key);
        entries.insert(0, (key, built.clone()));
        entries.truncate(KEEP);
        Ok(built)
    }

    /// Forgets every image (VMs mapping one keep it alive).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(FileKey, Arc<T>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A prepared kernel: its segments at file offset = guest address.
pub struct KernelImage {
    pub file: File,
    /// First page of the lowest segment.
    pub start: u64,
    /// First byte above the image (text, data, bss).
    pub end: u64,
    /// The PVH entry point.
    pub entry: u64,
}

/// A prepared initramfs: its bytes from `offset` (page aligned),
/// zero-padded to a page.
pub struct InitramfsImage {
    pub file: File,
    pub offset: u64,
    pub size: u64,
}

pub static KERNELS: Cache<KernelImage> = Cache::new();
pub static INITRAMFS: Cache<InitramfsImage> = Cache::new();

/// Seals a prepared memfd: no write, no resize, no further seals. Private
/// mappings (what VMs use) stay allowed.
pub fn seal(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int argument; the fd is open.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new empty memfd that can be sealed.
pub fn memfd(name: &std::ffi::CStr) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated and the flags are valid; the result
    // is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Takes the memfd out of a `GuestRam` used as a scratch layout, cut to
/// `len` bytes and sealed. The RAM's own mapping is gone once `ram` is
/// dropped here, so the seal against writing can be applied.
pub fn seal_ram(ram: GuestRam, len: u64) -> io::Result<File> {
    let file = ram.file().clone();
    drop(ram);
    let file = Arc::try_unwrap(file)
        .map_err(|_| io::Error::other("the scratch memory file is still shared"))?;
    file.set_len(len)?;
    seal(&file)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cache_builds_once_per_file_and_keeps_a_few() {
        let cache: Cache<u32> = Cache::new();
        let files: Vec<tempfile::NamedTempFile> = (0..KEEP + 1)
            .map(|i| {
                let mut f = tempfile::NamedTempFile::new().unwrap();
                write!(f, "{i}").unwrap();
                f
            })
            .collect();
        let key = |i: usize| FileKey::of(files[i].as_file()).unwrap();
        let mut builds = 0;
        for _ in 0..3 {
            let got = cache
                .get_or_build(key(0), || {
                    builds += 1;
                    Ok::<_, ()>(7)
                })
                .unwrap();
            assert_eq!(*got, 7);
        }
        assert_eq!(builds, 1);
        // A failed build caches nothing.
        assert!(cache.get_or_build(key(1), || Err("no")).is_err());
        for i in 1..=KEEP {
            cache
                .get_or_build(key(i), || Ok::<_, ()>(i as u32))
                .unwrap();
        }
        assert_eq!(cache.lock().len(), KEEP);
        // The oldest was evicted and is built again.
        let mut rebuilt = false;
        cache
            .get_or_build(key(0), || {
                rebuilt = true;
                Ok::<_, ()>(7)
            })
            .unwrap();
        assert!(rebuilt);
        cache.clear();
        assert!(cache.lock().is_empty());
    }

    #[test]
    fn sealed_image_refuses_writes_and_resizes() {
        let f = memfd(c"smol-test").unwrap();
        f.set_len(4096).unwrap();
        seal(&f).unwrap();
        use std::os::unix::fs::FileExt;
        assert!(f.write_at(b"x", 0).is_err());
        assert!(f.set_len(8192).is_err());
    }
}
