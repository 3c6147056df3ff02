//! Builds smol's guest base root filesystem: an uncompressed newc cpio
//! (initramfs) holding the agent as `/init` and a busybox userland.
//!
//! The output is deterministic: entries are sorted by path, inode numbers are
//! assigned in that order, and every timestamp is [`MTIME`], so the same
//! inputs always give the same bytes (and the same content hash).

use std::collections::BTreeMap;
use std::io::{self, Write};

pub mod newc;

pub use newc::{Archive, EntryKind};

/// Bumped whenever the layout or the archive format changes, so that cached
/// images built by an older builder are not reused.
pub const FORMAT_VERSION: &str = "smol-rootfs-4";

/// Where the archive lists busybox's applets, one path per line (as
/// `busybox --list-full` prints them): the agent resolves an applet that
/// has no link through it, and the host links them on a machine's disk.
pub const APPLET_LIST: &str = "etc/smol/applets";

/// The applets linked in the archive itself; every other applet is linked
/// on the machine disk by the host before the first boot. Each entry of
/// the archive costs the guest kernel ~33 ms to unpack on a kvm_pvm host
/// (its 268 applet links took 9 s of a 41 s boot), while links the host
/// writes into the disk image cost the guest nothing. `/bin/sh` serves
/// `#!/bin/sh` scripts and `/usr/bin/env` the `#!/usr/bin/env` ones, disk
/// or not.
pub const LINKED_APPLETS: &[&str] = &["bin/sh", "usr/bin/env"];

/// The fixed modification time of every entry (2024-01-01T00:00:00Z).
pub const MTIME: u32 = 1_704_067_200;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid archive path {0:?}")]
    BadPath(String),
    #[error("duplicate archive entry {0:?}")]
    Duplicate(String),
    #[error("parent of {0:?} is not a directory")]
    ParentNotDir(String),
    #[error("entry {path:?} is too large ({size} bytes)")]
    TooLarge { path: String, size: usize },
    #[error("bad applet path {0:?} in the busybox list")]
    BadApplet(String),
    #[error("writing the archive")]
    Io(#[from] io::Error),
}

/// Inputs of the base root filesystem.
pub struct BaseRootfs<'a> {
    /// The static agent binary, installed as `/init`.
    pub agent: &'a [u8],
    /// The static busybox binary, installed as `/bin/busybox`.
    pub busybox: &'a [u8],
    /// Applet paths as printed by `busybox --list-full` (e.g. `usr/bin/awk`).
    pub applets: &'a [String],
    /// Written to `/etc/hostname`.
    pub hostname: &'a str,
}

/// Where the busybox binary goes.
pub const BUSYBOX: &str = "bin/busybox";

/// Directories every guest has, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("home", 0o755),
    ("lib", 0o755),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("srv", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("usr/local/sbin", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
    ("var/log", 0o755),
    ("var/tmp", 0o1777),
    ("workspace", 0o755),
];

impl BaseRootfs<'_> {
    /// Lays out the archive.
    pub fn archive(&self) -> Result<Archive, Error> {
        let mut a = Archive::new();
        for (dir, mode) in DIRS {
            a.dir(dir, *mode)?;
        }
        // The kernel opens /dev/console before running /init; without it
        // init starts with no stdin/stdout/stderr and its output is lost.
        a.char_device("dev/console", 0o600, 5, 1)?;
        a.file("init", self.agent.to_vec(), 0o755)?;
        a.file(BUSYBOX, self.busybox.to_vec(), 0o755)?;
        a.file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            0o644,
        )?;
        a.file("etc/group", b"root:x:0:\n".to_vec(), 0o644)?;
        a.file("etc/shadow", b"root:*:19723:0:99999:7:::\n".to_vec(), 0o600)?;
        a.file(
            "etc/hostname",
            format!("{}\n", self.hostname).into_bytes(),
            0o644,
        )?;
        a.file(
            "etc/hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n",
                self.hostname
            )
            .into_bytes(),
            0o644,
        )?;
        a.file("etc/shells", b"/bin/sh\n/bin/ash\n".to_vec(), 0o644)?;
        a.symlink("etc/mtab", "/proc/self/mounts")?;
        let applets = self.applet_paths()?;
        for path in &applets {
            if LINKED_APPLETS.contains(&path.as_str()) && !a.contains(path) {
                a.ensure_dirs(path)?;
                a.symlink(path, "/bin/busybox")?;
            }
        }
        a.ensure_dirs(APPLET_LIST)?;
        a.file(APPLET_LIST, applet_list_text(&applets).into_bytes(), 0o644)?;
        Ok(a)
    }

    /// The applet paths of the busybox list, checked: `dir/name` paths
    /// under the root, without `linuxrc` or duplicates, in order.
    pub fn applet_paths(&self) -> Result<Vec<String>, Error> {
        let mut paths: Vec<String> = Vec::new();
        for applet in self.applets {
            let path = applet.trim().trim_start_matches('/');
            // busybox prints `linuxrc` at the top level, and itself: a link
            // at its own path would shadow the binary.
            if path.is_empty() || path == "linuxrc" || path == BUSYBOX {
                continue;
            }
            let plain = path.contains('/')
                && path
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..")
                && path
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
            if !plain {
                return Err(Error::BadApplet(applet.clone()));
            }
            if !paths.iter().any(|p| p == path) {
                paths.push(path.to_string());
            }
        }
        Ok(paths)
    }

    /// The text of [`APPLET_LIST`]: what the archive holds there, and what
    /// the assets publish beside it for the host.
    pub fn applet_list(&self) -> Result<String, Error> {
        Ok(applet_list_text(&self.applet_paths()?))
    }

    /// Writes the newc archive to `w`.
    pub fn write<W: Write>(&self, w: W) -> Result<(), Error> {
        self.archive()?.write_newc(w)
    }
}

fn applet_list_text(paths: &[String]) -> String {
    let mut text = paths.join("\n");
    text.push('\n');
    text
}

/// Parses the output of `busybox --list-full`: one applet path per line.
pub fn parse_applet_list(text: &str) -> Vec<String> {
    let mut set: BTreeMap<String, ()> = BTreeMap::new();
    for line in text.lines() {
        let l = line.trim();
        if !l.is_empty() {
            set.insert(l.to_string(), ());
        }
    }
    set.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<u8> {
        let applets = parse_applet_list(
            "bin/sh\nbin/ls\nusr/bin/awk\nsbin/init\nlinuxrc\nbin/sh\nbin/busybox\n",
        );
        let r = BaseRootfs {
            agent: b"AGENT",
            busybox: b"BUSYBOX",
            applets: &applets,
            hostname: "smol",
        };
        let mut out = Vec::new();
        r.write(&mut out).unwrap();
        out
    }

    #[test]
    fn layout_has_init_console_and_applets() {
        let out = base();
        let entries = newc::parse(&out).unwrap();
        let get = |p: &str| {
            entries
                .iter()
                .find(|e| e.name == p)
                .unwrap_or_else(|| panic!("missing {p}"))
        };
        assert_eq!(get("init").data, b"AGENT");
        assert_eq!(get("init").mode, 0o100755);
        let console = get("dev/console");
        assert_eq!(console.mode, 0o020600);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        // Only the few linked applets are links in the archive; the list
        // names them all.
        assert_eq!(get("bin/sh").data, b"/bin/busybox");
        assert_eq!(get("bin/sh").mode & 0o170000, 0o120000);
        assert!(entries
            .iter()
            .all(|e| e.name != "bin/ls" && e.name != "usr/bin/awk"));
        assert_eq!(
            get(APPLET_LIST).data,
            b"bin/ls\nbin/sh\nsbin/init\nusr/bin/awk\n"
        );
        assert_eq!(get("tmp").mode, 0o041777);
        assert_eq!(get("etc/hostname").data, b"smol\n");
        assert!(entries.iter().all(|e| e.name != "linuxrc"));
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(base(), base());
    }

    #[test]
    fn rejects_escaping_applet_paths() {
        let applets = vec!["../etc/evil".to_string()];
        let r = BaseRootfs {
            agent: b"",
            busybox: b"",
            applets: &applets,
            hostname: "h",
        };
        assert!(matches!(r.archive(), Err(Error::BadApplet(_))));
    }
}
