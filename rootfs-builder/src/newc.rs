//! A minimal writer (and reader, for checks) of the newc cpio format the
//! Linux kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 fields of 8 hex
//! digits), the NUL-terminated name padded to 4 bytes, then the data padded
//! to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

use std::collections::BTreeMap;
use std::io::Write;

use crate::{Error, MTIME};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: EntryKind,
    /// Permission bits only (the type comes from `kind`).
    perm: u32,
}

/// An in-memory archive keyed by path (no leading `/`); written sorted.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn check_path(path: &str) -> Result<String, Error> {
    let p = path.trim_start_matches('/');
    let bad = p.is_empty()
        || p.ends_with('/')
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || p == TRAILER;
    if bad {
        return Err(Error::BadPath(path.to_string()));
    }
    Ok(p.to_string())
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    fn insert(&mut self, path: &str, kind: EntryKind, perm: u32) -> Result<(), Error> {
        let p = check_path(path)?;
        if let Some((parent, _)) = p.rsplit_once('/') {
            match self.entries.get(parent) {
                Some(Entry {
                    kind: EntryKind::Dir,
                    ..
                })
                | None => {}
                Some(_) => return Err(Error::ParentNotDir(p)),
            }
        }
        if self.entries.contains_key(&p) {
            return Err(Error::Duplicate(p));
        }
        self.entries.insert(
            p,
            Entry {
                kind,
                perm: perm & 0o7777,
            },
        );
        Ok(())
    }

    /// Adds the directories leading to `path` (not `path` itself) that are
    /// missing, with mode 0755.
    pub fn ensure_dirs(&mut self, path: &str) -> Result<(), Error> {
        let p = check_path(path)?;
        let mut prefix = String::new();
        let comps: Vec<&str> = p.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if !self.entries.contains_key(&prefix) {
                self.dir(&prefix.clone(), 0o755)?;
            }
        }
        Ok(())
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        self.insert(path, EntryKind::Dir, perm)
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, perm: u32) -> Result<(), Error> {
        if data.len() > u32::MAX as usize {
            return Err(Error::TooLarge {
                path: path.to_string(),
                size: data.len(),
            });
        }
        self.insert(path, EntryKind::File(data), perm)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Error> {
        if target.is_empty() || target.contains('\0') {
            return Err(Error::BadPath(target.to_string()));
        }
        self.insert(path, EntryKind::Symlink(target.to_string()), 0o777)
    }

    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), Error> {
        self.insert(path, EntryKind::CharDevice { major, minor }, perm)
    }

    /// Writes the archive: entries sorted by path (so parents precede their
    /// children), inodes numbered in that order, fixed mtimes, root-owned.
    pub fn write_newc<W: Write>(&self, mut w: W) -> Result<(), Error> {
        let mut ino = 0u32;
        for (path, e) in &self.entries {
            // Every parent must exist in the archive: the kernel does not
            // create missing directories.
            if let Some((parent, _)) = path.rsplit_once('/') {
                if !self.entries.contains_key(parent) {
                    return Err(Error::BadPath(format!("{path} (missing parent {parent})")));
                }
            }
            ino += 1;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.kind {
                EntryKind::Dir => (S_IFDIR | e.perm, 2, &[], (0, 0)),
                EntryKind::File(d) => (S_IFREG | e.perm, 1, d, (0, 0)),
                EntryKind::Symlink(t) => (S_IFLNK | 0o777, 1, t.as_bytes(), (0, 0)),
                EntryKind::CharDevice { major, minor } => {
                    (S_IFCHR | e.perm, 1, &[], (*major, *minor))
                }
            };
            write_entry(&mut w, path, ino, mode, nlink, MTIME, data, rdev)?;
        }
        write_entry(&mut w, TRAILER, 0, 0, 1, 0, &[], (0, 0))?;
        w.flush()?;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn write_entry<W: Write>(
    w: &mut W,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<(), Error> {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        mtime,
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        namesize as u32,
        0, // check
    ];
    let mut head = Vec::with_capacity(HEADER_LEN + namesize + 3);
    head.extend_from_slice(MAGIC);
    for f in fields {
        head.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    head.extend_from_slice(name.as_bytes());
    head.push(0);
    head.resize(head.len() + pad4(HEADER_LEN + namesize), 0);
    w.write_all(&head)?;
    w.write_all(data)?;
    w.write_all(&[0u8; 3][..pad4(data.len())])?;
    Ok(())
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer (used to check what we wrote).
pub fn parse(mut buf: &[u8]) -> Result<Vec<ParsedEntry>, Error> {
    let bad = |m: &str| Error::BadPath(format!("corrupt archive: {m}"));
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        if buf.len() < HEADER_LEN || &buf[..6] != MAGIC {
            return Err(bad("bad header"));
        }
        let field = |i: usize| -> Result<u32, Error> {
            let s = std::str::from_utf8(&buf[6 + i * 8..6 + (i + 1) * 8])
                .map_err(|_| bad("non-ascii field"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("non-hex field"))
        };
        let (ino, mode, nlink, mtime, size) = (
            field(0)?,
            field(1)?,
            field(4)?,
            field(5)?,
            field(6)? as usize,
        );
        let (rmaj, rmin, namesize) = (field(9)?, field(10)?, field(11)? as usize);
        let name_end = HEADER_LEN + namesize;
        if namesize == 0 || buf.len() < name_end {
            return Err(bad("short name"));
        }
        let name = std::str::from_utf8(&buf[HEADER_LEN..name_end - 1])
            .map_err(|_| bad("name not utf-8"))?
            .to_string();
        let data_start = name_end + pad4(offset + name_end);
        let data_end = data_start + size;
        if buf.len() < data_end {
            return Err(bad("short data"));
        }
        let data = buf[data_start..data_end].to_vec();
        let next = data_end + pad4(offset + data_end);
        if name == TRAILER {
            return Ok(out);
        }
        out.push(ParsedEntry {
            name,
            ino,
            mode,
            nlink,
            mtime,
            rdev_major: rmaj,
            rdev_minor: rmin,
            data,
        });
        offset += next.min(buf.len());
        buf = &buf[next.min(buf.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_padding() {
        let mut a = Archive::new();
        a.dir("d", 0o755).unwrap();
        a.file("d/f", b"hello".to_vec(), 0o644).unwrap();
        let mut out = Vec::new();
        a.write_newc(&mut out).unwrap();
        // Every entry starts 4-byte aligned with the magic.
        assert_eq!(&out[..6], MAGIC);
        assert_eq!(out.len() % 4, 0);
        // First entry "d": header 110 + "d\0" = 112, aligned, no data.
        assert_eq!(&out[112..118], MAGIC);
        let hdr = std::str::from_utf8(&out[..HEADER_LEN]).unwrap();
        assert_eq!(&hdr[6..14], "00000001"); // ino
        assert_eq!(&hdr[14..22], "000041ed"); // dir 0755
        assert_eq!(&hdr[46..54], "65920080"); // mtime
        let entries = parse(&out).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].name, "d/f");
        assert_eq!(entries[1].data, b"hello");
        assert_eq!(entries[1].mode, 0o100644);
    }

    #[test]
    fn sorted_parents_first_and_trailer() {
        let mut a = Archive::new();
        a.dir("a", 0o755).unwrap();
        a.dir("a-b", 0o755).unwrap();
        a.file("a/z", vec![1, 2, 3], 0o600).unwrap();
        a.symlink("a/l", "/a/z").unwrap();
        a.char_device("c", 0o600, 5, 1).unwrap();
        let mut out = Vec::new();
        a.write_newc(&mut out).unwrap();
        let names: Vec<_> = parse(&out).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a", "a-b", "a/l", "a/z", "c"]);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut a = Archive::new();
        for p in ["", "/", "a/../b", "a//b", "./a", "a/", "TRAILER!!!"] {
            assert!(matches!(a.dir(p, 0o755), Err(Error::BadPath(_))), "{p:?}");
        }
        a.file("f", vec![], 0o644).unwrap();
        assert!(matches!(
            a.file("f", vec![], 0o644),
            Err(Error::Duplicate(_))
        ));
        assert!(matches!(
            a.file("f/g", vec![], 0o644),
            Err(Error::ParentNotDir(_))
        ));
    }

    #[test]
    fn missing_parent_is_an_error_at_write() {
        let mut a = Archive::new();
        a.file("x/y", vec![], 0o644).unwrap();
        assert!(a.write_newc(Vec::new()).is_err());
        a.ensure_dirs("x/y").unwrap();
        assert!(a.write_newc(Vec::new()).is_ok());
    }

    #[test]
    fn leading_slash_is_stripped() {
        let mut a = Archive::new();
        a.dir("/etc", 0o755).unwrap();
        assert!(a.contains("etc"));
        assert!(a.contains("/etc"));
    }
}
