//! Unpacking one OCI layer (a tar stream, optionally gzip) into a directory
//! that becomes an overlayfs lower layer.
//!
//! The stream is untrusted. Every file is created with `*at` calls relative
//! to a directory fd that was reached from the layer root one component at
//! a time with `O_NOFOLLOW`, so neither `..`, absolute paths, nor symlinks
//! (whatever their target) can make a write land outside the root: `..`
//! is refused, a leading `/` is dropped, and a symlink met as a parent
//! directory is refused. Symlink targets are stored as they are and never
//! followed here; inside a container they resolve within its root.
//!
//! OCI whiteouts become overlayfs whiteouts: `.wh.<name>` a 0/0 character
//! device `<name>`, `.wh..wh..opq` the `trusted.overlay.opaque` xattr on its
//! directory. Ownership, modes (set after ownership, so setuid bits stay),
//! and mtimes are applied; directories last, deepest first.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{
    self, fchmod, fstatat, futimens, mknodat, utimensat, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use super::ImageError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What one unpack did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    /// Bytes of regular file contents written.
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Whether ownership changes are possible (root); unprivileged unpacks
/// (host tests) keep their own uid and skip device nodes' real numbers.
fn privileged() -> bool {
    Uid::effective().is_root()
}

/// Unpacks a layer stream into `dest`, an existing, empty directory.
/// Gzip is detected by its magic bytes; zstd is refused by name.
pub fn unpack_layer<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, ImageError> {
    let mut buffered = BufReader::with_capacity(64 * 1024, reader);
    let head = buffered
        .fill_buf()
        .map_err(|e| ImageError::NotATar(format!("reading the layer: {e}")))?;
    if head.is_empty() {
        return Err(ImageError::NotATar("the layer is empty".into()));
    }
    if head.starts_with(&ZSTD_MAGIC) {
        return Err(ImageError::Unsupported("zstd-compressed layers".into()));
    }
    if head.starts_with(&GZIP_MAGIC) {
        unpack_tar(flate2::bufread::MultiGzDecoder::new(buffered), dest)
    } else {
        unpack_tar(buffered, dest)
    }
}

/// Unpacks an uncompressed tar stream into `dest`.
pub fn unpack_tar<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, ImageError> {
    let root = nix::fcntl::open(dest.as_os_str(), DIR_FLAGS, Mode::empty())
        .map_err(|e| ImageError::io("open layer root", dest, io::Error::from(e)))?;
    let mut u = Unpacker {
        root,
        dest: dest.to_path_buf(),
        cached: None,
        dirs: HashMap::new(),
        stats: UnpackStats::default(),
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| ImageError::NotATar(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| not_a_tar(&u, e))?;
        u.entry(&mut entry)?;
    }
    u.finish_dirs()?;
    Ok(u.stats)
}

fn not_a_tar(u: &Unpacker, e: io::Error) -> ImageError {
    if u.stats.entries == 0 {
        ImageError::NotATar(e.to_string())
    } else {
        ImageError::NotATar(format!("after {} entries: {e}", u.stats.entries))
    }
}

/// Metadata applied to a directory once everything inside it exists.
#[derive(Clone, Copy)]
struct DirMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

struct Unpacker {
    root: OwnedFd,
    dest: PathBuf,
    /// The last parent directory walked to, reused for runs of entries in
    /// one directory (each walk step is a syscall, slow in a guest).
    cached: Option<(Vec<OsString>, OwnedFd)>,
    dirs: HashMap<Vec<OsString>, DirMeta>,
    stats: UnpackStats,
}

/// Splits an entry path into plain components; `..` is refused.
fn components(path: &Path) -> Result<Vec<OsString>, ImageError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(ImageError::UnsafePath(format!(
                    "{} climbs out with ..",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

fn open_dir_nofollow<Fd: AsFd>(dir: Fd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(dir, name, DIR_FLAGS, Mode::empty())
}

fn display(comps: &[OsString]) -> String {
    comps
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

impl Unpacker {
    fn io(&self, what: &'static str, comps: &[OsString], e: impl Into<io::Error>) -> ImageError {
        ImageError::io(what, self.dest.join(display(comps)), e.into())
    }

    /// Opens the directory `comps` (relative to the root) without following
    /// any symlink; missing directories are created when `create` is set.
    fn walk(&mut self, comps: &[OsString], create: bool) -> Result<OwnedFd, ImageError> {
        if let Some((path, fd)) = &self.cached {
            if path.as_slice() == comps {
                return fd.try_clone().map_err(|e| self.io("dup", comps, e));
            }
        }
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| self.io("dup", comps, e))?;
        for (i, c) in comps.iter().enumerate() {
            let next = match open_dir_nofollow(&cur, c) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match stat::mkdirat(&cur, c.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(self.io("create directory", &comps[..=i], e)),
                    }
                    open_dir_nofollow(&cur, c)
                        .map_err(|e| self.io("open directory", &comps[..=i], e))?
                }
                Err(Errno::ELOOP) => {
                    return Err(ImageError::UnsafePath(format!(
                        "{} is a symlink used as a directory",
                        display(&comps[..=i])
                    )));
                }
                Err(Errno::ENOTDIR) => {
                    return Err(ImageError::UnsafePath(format!(
                        "{} is not a directory",
                        display(&comps[..=i])
                    )));
                }
                Err(e) => return Err(self.io("open directory", &comps[..=i], e)),
            };
            cur = next;
        }
        let keep = cur.try_clone().map_err(|e| self.io("dup", comps, e))?;
        self.cached = Some((comps.to_vec(), keep));
        Ok(cur)
    }

    /// Removes whatever is at `name` in `parent` (a directory recursively),
    /// so an entry can take its place. Absence is fine.
    fn remove_existing(&mut self, parent: &OwnedFd, comps: &[OsString]) -> Result<(), ImageError> {
        let name = comps.last().map(OsString::as_os_str).unwrap_or_default();
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.io("stat", comps, e)),
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
                // Its parents were just walked without following symlinks, so
                // this path names exactly that directory; std's remove_dir_all
                // never follows symlinks inside it.
                self.cached = None;
                self.dirs.retain(|k, _| !k.starts_with(comps));
                let path = self.dest.join(display(comps));
                std::fs::remove_dir_all(&path).map_err(|e| ImageError::io("remove", &path, e))
            }
            Ok(_) => unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| self.io("remove", comps, e)),
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let path = entry
            .path()
            .map_err(|e| ImageError::NotATar(format!("bad entry path: {e}")))?
            .into_owned();
        let comps = components(&path)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        self.stats.entries += 1;
        let Some((name, parent_comps)) = comps.split_last() else {
            // The layer root itself ("./"): its metadata belongs to the image root.
            return Ok(());
        };
        let meta = self.meta(entry)?;
        let name_bytes = name.as_bytes();

        if name_bytes == OPAQUE.as_bytes() {
            let dir = self.walk(parent_comps, true)?;
            set_xattr(&dir, "trusted.overlay.opaque", b"y")
                .map_err(|e| self.io("mark opaque", parent_comps, e))?;
            self.stats.whiteouts += 1;
            return Ok(());
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) || hidden.is_empty() {
                // Other `.wh..wh.` names are aufs bookkeeping, not content.
                return Ok(());
            }
            let mut target = parent_comps.to_vec();
            target.push(OsStr::from_bytes(hidden).to_os_string());
            if hidden == b"." || hidden == b".." {
                return Err(ImageError::UnsafePath(format!(
                    "whiteout {}",
                    path.display()
                )));
            }
            let parent = self.walk(parent_comps, true)?;
            self.remove_existing(&parent, &target)?;
            mknodat(
                &parent,
                OsStr::from_bytes(hidden),
                SFlag::S_IFCHR,
                Mode::empty(),
                stat::makedev(0, 0),
            )
            .map_err(|e| self.io("create whiteout", &target, e))?;
            self.stats.whiteouts += 1;
            return Ok(());
        }

        let parent = self.walk(parent_comps, true)?;
        match kind {
            tar::EntryType::Directory => {
                match fstatat(&parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st)
                        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
                            == SFlag::S_IFDIR => {}
                    Ok(_) => {
                        self.remove_existing(&parent, &comps)?;
                        self.mkdir(&parent, &comps)?;
                    }
                    Err(Errno::ENOENT) => self.mkdir(&parent, &comps)?,
                    Err(e) => return Err(self.io("stat", &comps, e)),
                }
                self.dirs.insert(comps.clone(), meta);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.remove_existing(&parent, &comps)?;
                let fd = openat(
                    &parent,
                    name.as_os_str(),
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| self.io("create", &comps, e))?;
                let mut file = File::from(fd);
                let n = io::copy(entry, &mut file).map_err(|e| {
                    if e.raw_os_error().is_some() {
                        self.io("write", &comps, e)
                    } else {
                        ImageError::NotATar(format!(
                            "truncated contents of {}: {e}",
                            path.display()
                        ))
                    }
                })?;
                self.stats.bytes += n;
                if let Ok(Some(xattrs)) = entry
                    .pax_extensions()
                    .map(|p| p.map(|p| p.collect::<Vec<_>>()))
                {
                    for ext in xattrs.into_iter().flatten() {
                        if let (Ok(key), value) = (ext.key(), ext.value_bytes()) {
                            if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                                // Best effort: a filesystem without xattrs loses them.
                                let _ = set_xattr(&file, attr, value);
                            }
                        }
                    }
                }
                self.own_and_mode(file.as_fd(), &meta, &comps)?;
                let t = TimeSpec::new(meta.mtime as i64, 0);
                futimens(&file, &t, &t).map_err(|e| self.io("set times", &comps, e))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| ImageError::NotATar(format!("bad link name: {e}")))?
                    .ok_or_else(|| {
                        ImageError::NotATar(format!("symlink {} without target", path.display()))
                    })?;
                self.remove_existing(&parent, &comps)?;
                symlinkat(target.as_os_str(), &parent, name.as_os_str())
                    .map_err(|e| self.io("symlink", &comps, e))?;
                if privileged() {
                    fchownat(
                        &parent,
                        name.as_os_str(),
                        Some(Uid::from_raw(meta.uid as u32)),
                        Some(Gid::from_raw(meta.gid as u32)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.io("chown", &comps, e))?;
                }
                let t = TimeSpec::new(meta.mtime as i64, 0);
                utimensat(
                    &parent,
                    name.as_os_str(),
                    &t,
                    &t,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| self.io("set times", &comps, e))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| ImageError::NotATar(format!("bad link name: {e}")))?
                    .ok_or_else(|| {
                        ImageError::NotATar(format!("hard link {} without target", path.display()))
                    })?
                    .into_owned();
                let tcomps = components(&target)?;
                let Some((tname, tparent_comps)) = tcomps.split_last() else {
                    return Err(ImageError::UnsafePath(format!(
                        "hard link {} to the root",
                        path.display()
                    )));
                };
                if tcomps == comps {
                    return Ok(());
                }
                let tparent =
                    self.walk(tparent_comps, false)
                        .map_err(|_| ImageError::HardLinkTarget {
                            path: path.display().to_string(),
                            target: target.display().to_string(),
                        })?;
                let parent = self.walk(parent_comps, true)?;
                self.remove_existing(&parent, &comps)?;
                linkat(
                    &tparent,
                    tname.as_os_str(),
                    &parent,
                    name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| match e {
                    Errno::ENOENT | Errno::EPERM => ImageError::HardLinkTarget {
                        path: path.display().to_string(),
                        target: target.display().to_string(),
                    },
                    e => self.io("link", &comps, e),
                })?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.remove_existing(&parent, &comps)?;
                let (kind_flag, dev) = match kind {
                    tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    k => {
                        let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                        let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                        let flag = if k == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, stat::makedev(major.into(), minor.into()))
                    }
                };
                mknodat(
                    &parent,
                    name.as_os_str(),
                    kind_flag,
                    Mode::from_bits_truncate(meta.mode & 0o7777),
                    dev,
                )
                .map_err(|e| self.io("create node", &comps, e))?;
                if privileged() {
                    fchownat(
                        &parent,
                        name.as_os_str(),
                        Some(Uid::from_raw(meta.uid as u32)),
                        Some(Gid::from_raw(meta.gid as u32)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.io("chown", &comps, e))?;
                }
                // mknod honours the umask: set the mode the entry asks for. The
                // node was just created by us, so following is not a concern.
                stat::fchmodat(
                    &parent,
                    name.as_os_str(),
                    Mode::from_bits_truncate(meta.mode & 0o7777),
                    stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| self.io("chmod", &comps, e))?;
            }
            // Other kinds (GNU volume labels, unknown types) carry no file.
            _ => {}
        }
        Ok(())
    }

    fn mkdir(&mut self, parent: &OwnedFd, comps: &[OsString]) -> Result<(), ImageError> {
        let name = comps.last().map(OsString::as_os_str).unwrap_or_default();
        // Owner-writable until the final pass applies the entry's own mode.
        stat::mkdirat(parent, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| self.io("create directory", comps, e))
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<DirMeta, ImageError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| {
            ImageError::NotATar(format!("bad {what} in an entry header: {e}"))
        };
        let mut meta = DirMeta {
            mode: h.mode().map_err(|e| bad("mode", e))?,
            uid: h.uid().map_err(|e| bad("uid", e))?,
            gid: h.gid().map_err(|e| bad("gid", e))?,
            mtime: h.mtime().unwrap_or(0),
        };
        // PAX records override the header's (large ids, precise times).
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                let (Ok(key), Ok(value)) = (ext.key(), ext.value()) else {
                    continue;
                };
                match key {
                    "uid" => meta.uid = value.parse().unwrap_or(meta.uid),
                    "gid" => meta.gid = value.parse().unwrap_or(meta.gid),
                    "mtime" => {
                        meta.mtime = value
                            .split('.')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(meta.mtime)
                    }
                    _ => {}
                }
            }
        }
        if meta.uid > u64::from(u32::MAX - 1) || meta.gid > u64::from(u32::MAX - 1) {
            return Err(ImageError::NotATar(format!(
                "owner {}:{} out of range",
                meta.uid, meta.gid
            )));
        }
        Ok(meta)
    }

    /// chown then chmod (chown clears setuid/setgid bits).
    fn own_and_mode(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        meta: &DirMeta,
        comps: &[OsString],
    ) -> Result<(), ImageError> {
        if privileged() {
            fchown(
                fd,
                Some(Uid::from_raw(meta.uid as u32)),
                Some(Gid::from_raw(meta.gid as u32)),
            )
            .map_err(|e| self.io("chown", comps, e))?;
        }
        fchmod(fd, Mode::from_bits_truncate(meta.mode & 0o7777))
            .map_err(|e| self.io("chmod", comps, e))
    }

    /// Applies directory metadata, deepest first, so that setting a parent's
    /// mtime or a read-only mode comes after everything inside it.
    fn finish_dirs(&mut self) -> Result<(), ImageError> {
        self.cached = None;
        let mut dirs: Vec<(Vec<OsString>, DirMeta)> = self.dirs.drain().collect();
        dirs.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        for (comps, meta) in dirs {
            let fd = self.walk(&comps, false)?;
            self.cached = None;
            self.own_and_mode(fd.as_fd(), &meta, &comps)?;
            let t = TimeSpec::new(meta.mtime as i64, 0);
            futimens(&fd, &t, &t).map_err(|e| self.io("set times", &comps, e))?;
        }
        Ok(())
    }
}

/// Sets an extended attribute on an open file or directory.
fn set_xattr<Fd: AsRawFd>(fd: &Fd, name: &str, value: &[u8]) -> io::Result<()> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the fd is open for the duration of the call; name is a valid
    // NUL-terminated string and value a valid buffer of value.len() bytes.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The file [`confinement_sandbox`] puts next to the layer root.
#[doc(hidden)]
pub const SANDBOX_MARKER: &str = "marker";
const MARKER_CONTENTS: &[u8] = b"untouched";
const MARKER_MODE: u32 = 0o644;

/// Test support, shared by the unit tests and the fuzz target (`fuzz/`):
/// creates `<parent>/root`, an empty layer root, next to a marker file,
/// and returns the root. Unpack into it, then call [`check_confined`].
#[doc(hidden)]
pub fn confinement_sandbox(parent: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = parent.join("root");
    std::fs::create_dir(&root)?;
    let marker = parent.join(SANDBOX_MARKER);
    std::fs::write(&marker, MARKER_CONTENTS)?;
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(MARKER_MODE))?;
    Ok(root)
}

/// Test support: whether an unpack into `root` (made by
/// [`confinement_sandbox`]) stayed inside it. Next to the root there must
/// be nothing but the root itself, still a real directory, and the marker,
/// a regular file with its contents and mode unchanged and no second link
/// (a hard link to it from inside the root would be an escape too).
///
/// Symlinks inside the root may point anywhere: they are stored, never
/// followed, and resolve within the container's root when used.
#[doc(hidden)]
pub fn check_confined(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let parent = root
        .parent()
        .ok_or_else(|| format!("{} has no parent", root.display()))?;
    let root_name = root
        .file_name()
        .ok_or_else(|| format!("{} has no name", root.display()))?;
    let mut names: Vec<OsString> = std::fs::read_dir(parent)
        .and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect())
        .map_err(|e| format!("listing {}: {e}", parent.display()))?;
    names.sort();
    let mut expected = vec![root_name.to_os_string(), OsString::from(SANDBOX_MARKER)];
    expected.sort();
    if names != expected {
        return Err(format!(
            "{} holds {names:?}, expected only {expected:?}",
            parent.display()
        ));
    }
    let root_meta =
        std::fs::symlink_metadata(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if !root_meta.file_type().is_dir() {
        return Err(format!("{} is no longer a directory", root.display()));
    }
    let marker = parent.join(SANDBOX_MARKER);
    let meta =
        std::fs::symlink_metadata(&marker).map_err(|e| format!("{}: {e}", marker.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!("{} is no longer a regular file", marker.display()));
    }
    if meta.nlink() != 1 {
        return Err(format!(
            "{} has {} links: one was made from inside the root",
            marker.display(),
            meta.nlink()
        ));
    }
    if meta.mode() & 0o7777 != MARKER_MODE {
        return Err(format!(
            "{} mode changed to {:o}",
            marker.display(),
            meta.mode() & 0o7777
        ));
    }
    let contents = std::fs::read(&marker).map_err(|e| format!("{}: {e}", marker.display()))?;
    if contents != MARKER_CONTENTS {
        return Err(format!("{} was rewritten", marker.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
