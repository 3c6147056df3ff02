use super::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use rand::{Rng, SeedableRng};

/// Builds tar entries byte by byte, so that paths the `tar` crate's own
/// builder would refuse (`..`, absolute) can be written.
struct Tar {
    b: tar::Builder<Vec<u8>>,
}

impl Tar {
    fn new() -> Tar {
        Tar {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        link: Option<&str>,
        mode: u32,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name = [0; 100];
            gnu.name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                gnu.linkname = [0; 100];
                gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(path, tar::EntryType::Regular, None, 0o644, data)
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.raw(path, tar::EntryType::Directory, None, mode, b"")
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path, tar::EntryType::Symlink, Some(target), 0o777, b"")
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path, tar::EntryType::Link, Some(target), 0o644, b"")
    }

    fn bytes(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

/// Directories may have been left read-only by an entry's mode.
fn make_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&e.path());
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A sandbox: `<tmp>/root` is the layer root, `<tmp>/marker` must never change.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        confinement_sandbox(dir.path()).unwrap();
        Sandbox { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn unpack(&self, data: &[u8]) -> Result<UnpackStats, ImageError> {
        unpack_layer(data, &self.root())
    }
    /// Nothing but `root` and an unchanged `marker` next to the root.
    fn assert_contained(&self) {
        if let Err(e) = check_confined(&self.root()) {
            panic!("escaped the layer root: {e}");
        }
    }
    fn reset(&self) {
        let root = self.root();
        make_writable(&root);
        fs::remove_dir_all(&root).unwrap();
        fs::create_dir(&root).unwrap();
    }
}

#[test]
fn files_dirs_links_modes_owners_times() {
    let s = Sandbox::new();
    let data = Tar::new()
        .dir("./", 0o755)
        .dir("./bin/", 0o755)
        .file("./bin/busybox", b"\x7fELF fake")
        .symlink("./bin/sh", "busybox")
        .symlink("./bin/abs", "/bin/busybox")
        .hardlink("./bin/hard", "./bin/busybox")
        .raw("./bin/suid", tar::EntryType::Regular, None, 0o4755, b"s")
        .dir("./etc/ro", 0o555)
        .file("./etc/ro/inside", b"x")
        .file("deep/implied/parents/f", b"y")
        .bytes();
    let stats = s.unpack(&data).unwrap();
    assert_eq!(stats.entries, 10);
    let r = s.root();
    assert_eq!(fs::read(r.join("bin/busybox")).unwrap(), b"\x7fELF fake");
    assert_eq!(
        fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(r.join("bin/abs")).unwrap(),
        Path::new("/bin/busybox")
    );
    let a = fs::metadata(r.join("bin/busybox")).unwrap();
    let b = fs::metadata(r.join("bin/hard")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(a.mode() & 0o7777, 0o644);
    assert_eq!(a.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(r.join("bin/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    let ro = fs::metadata(r.join("etc/ro")).unwrap();
    assert_eq!(ro.mode() & 0o7777, 0o555);
    assert_eq!(ro.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(r.join("deep/implied")).unwrap().mode() & 0o777,
        0o755
    );
    if privileged() {
        assert_eq!((a.uid(), a.gid()), (1000, 1001));
        assert_eq!(fs::symlink_metadata(r.join("bin/sh")).unwrap().uid(), 1000);
        assert_eq!(fs::metadata(r.join("bin/suid")).unwrap().uid(), 1000);
    }
    s.assert_contained();
}

#[test]
fn gzip_is_detected() {
    let s = Sandbox::new();
    let data = gzip(&Tar::new().file("a", b"zipped").bytes());
    s.unpack(&data).unwrap();
    assert_eq!(fs::read(s.root().join("a")).unwrap(), b"zipped");
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    if !privileged() {
        eprintln!("skipped: whiteouts need root (mknod, trusted xattrs)");
        return;
    }
    let s = Sandbox::new();
    let data = Tar::new()
        .file("etc/.wh.motd", b"")
        .dir("var/cache", 0o755)
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"n")
        .file(".wh..wh.plnk", b"")
        .bytes();
    let stats = s.unpack(&data).unwrap();
    assert_eq!(stats.whiteouts, 2);
    let wh = fs::symlink_metadata(s.root().join("etc/motd")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!s.root().join("etc/.wh.motd").exists());
    let mut buf = [0u8; 8];
    let dir = File::open(s.root().join("var/cache")).unwrap();
    let name = CString::new("trusted.overlay.opaque").unwrap();
    // SAFETY: valid fd, NUL-terminated name, buffer of buf.len() bytes.
    let n = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], b"y");
    assert!(!s.root().join(".wh..wh.plnk").exists());
}

#[test]
fn later_entries_replace_earlier_ones() {
    let s = Sandbox::new();
    let data = Tar::new()
        .file("a", b"first")
        .file("a", b"second")
        .file("d/x", b"1")
        .file("d", b"now a file")
        .symlink("l", "a")
        .file("l", b"plain")
        .bytes();
    s.unpack(&data).unwrap();
    let r = s.root();
    assert_eq!(fs::read(r.join("a")).unwrap(), b"second");
    assert_eq!(fs::read(r.join("d")).unwrap(), b"now a file");
    assert!(fs::symlink_metadata(r.join("l"))
        .unwrap()
        .file_type()
        .is_file());
    assert_eq!(fs::read(r.join("a")).unwrap(), b"second");
}

#[test]
fn traversal_is_refused_and_nothing_escapes() {
    let s = Sandbox::new();
    let outside = s.dir.path().to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dot-dot file",
            Tar::new().file("../../etc/passwd", b"pwned").bytes(),
        ),
        ("dot-dot dir", Tar::new().dir("a/../../x", 0o755).bytes()),
        (
            "symlink parent, absolute",
            Tar::new()
                .symlink("evil", &outside)
                .file("evil/marker", b"pwned")
                .bytes(),
        ),
        (
            "symlink parent, relative",
            Tar::new()
                .symlink("up", "..")
                .file("up/marker", b"pwned")
                .bytes(),
        ),
        (
            "symlink chain",
            Tar::new()
                .dir("d", 0o755)
                .symlink("d/l", "../..")
                .file("d/l/marker", b"pwned")
                .bytes(),
        ),
        (
            "hard link out",
            Tar::new().hardlink("h", "../marker").bytes(),
        ),
        (
            "hard link via symlink",
            Tar::new()
                .symlink("s", &outside)
                .hardlink("h", "s/marker")
                .bytes(),
        ),
        (
            "whiteout via symlink",
            Tar::new()
                .symlink("s", &outside)
                .file("s/.wh.marker", b"")
                .bytes(),
        ),
        ("whiteout dot-dot", Tar::new().file("a/.wh...", b"").bytes()),
        (
            "opaque via symlink",
            Tar::new()
                .symlink("s", &outside)
                .file("s/.wh..wh..opq", b"")
                .bytes(),
        ),
    ];
    for (what, data) in cases {
        let r = s.unpack(&data);
        assert!(r.is_err(), "{what}: unpacked");
        s.assert_contained();
        s.reset();
    }
    // An absolute path lands inside the root; a symlink to outside is kept as
    // a link (never followed), and a later plain entry through it is refused.
    s.unpack(
        &Tar::new()
            .file("/abs/file", b"in")
            .symlink("out", &format!("{outside}/marker"))
            .bytes(),
    )
    .unwrap();
    assert_eq!(fs::read(s.root().join("abs/file")).unwrap(), b"in");
    assert!(fs::symlink_metadata(s.root().join("out"))
        .unwrap()
        .file_type()
        .is_symlink());
    s.assert_contained();
    // A file entry named like an existing outside-pointing symlink replaces the link.
    s.unpack(
        &Tar::new()
            .symlink("out", &format!("{outside}/marker"))
            .file("out", b"replaced")
            .bytes(),
    )
    .unwrap();
    s.assert_contained();
}

#[test]
fn not_a_tar_and_zstd_are_named() {
    let s = Sandbox::new();
    let junk = b"hello, this is definitely not a tar archive".repeat(30);
    assert!(matches!(s.unpack(&junk), Err(ImageError::NotATar(_))));
    assert!(matches!(s.unpack(b""), Err(ImageError::NotATar(_))));
    assert!(matches!(
        s.unpack(&gzip(&junk)),
        Err(ImageError::NotATar(_))
    ));
    let mut zstd = vec![0x28, 0xb5, 0x2f, 0xfd];
    zstd.extend_from_slice(&[0; 100]);
    assert!(matches!(s.unpack(&zstd), Err(ImageError::Unsupported(_))));
    let mut gz = gzip(&Tar::new().file("a", &[7; 5000]).bytes());
    gz.truncate(gz.len() / 2);
    assert!(s.unpack(&gz).is_err());
    let mut t = Tar::new().file("a", &[7; 5000]).bytes();
    t.truncate(1500);
    assert!(s.unpack(&t).is_err());
    s.assert_contained();
}

/// Fuzz-equivalent: thousands of random and mutated tar streams (seeded, so
/// a failure reproduces) never panic and never put a file outside the root.
#[test]
fn random_and_mutated_streams_stay_inside() {
    let s = Sandbox::new();
    let outside = s.dir.path().to_str().unwrap().to_string();
    let seeds: Vec<Vec<u8>> = vec![
        Tar::new()
            .dir("d", 0o755)
            .file("d/f", b"data")
            .symlink("d/up", "..")
            .symlink("abs", &outside)
            .file("d/up/marker", b"pwned")
            .file("abs/marker", b"pwned")
            .hardlink("d/h", "../marker")
            .file("../marker", b"pwned")
            .file(".wh.x", b"")
            .file("d/.wh..wh..opq", b"")
            .bytes(),
        Tar::new()
            .symlink("l", "../../..")
            .file("l/marker", b"x")
            .dir("/abs/dir", 0o700)
            .bytes(),
        Tar::new()
            .file("a", &[1; 3000])
            .hardlink("b", "a")
            .symlink("c", "b")
            .file("c", b"z")
            .bytes(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let rounds = 3000;
    for round in 0..rounds {
        let seed = &seeds[round % seeds.len()];
        let mut data = match round % 4 {
            // Pure noise, sometimes with a tar-looking header block.
            0 => {
                let n = rng.random_range(0..4096);
                (0..n).map(|_| rng.random()).collect()
            }
            // Gzip of a mutated seed.
            1 => {
                let mut d = seed.clone();
                mutate(&mut rng, &mut d);
                gzip(&d)
            }
            _ => seed.clone(),
        };
        if round % 4 != 1 {
            mutate(&mut rng, &mut data);
        }
        // Errors are expected; panics and escapes are not.
        let _ = s.unpack(&data);
        s.assert_contained();
        s.reset();
    }
}

fn mutate(rng: &mut rand::rngs::StdRng, d: &mut Vec<u8>) {
    if d.is_empty() {
        return;
    }
    for _ in 0..rng.random_range(1..6) {
        let i = rng.random_range(0..d.len());
        match rng.random_range(0..5) {
            0 => d[i] = rng.random(),
            1 => d[i] ^= 1 << rng.random_range(0..8),
            2 => d.truncate(i.max(1)),
            3 => {
                // Overwrite a name field with a traversal attempt.
                let block = i / 512 * 512;
                let evil: &[u8] = [&b"../../marker"[..], b"/", b"..", b"a/../../b", b".wh.."]
                    [rng.random_range(0..5)];
                if block + evil.len() < d.len() {
                    d[block..block + evil.len()].copy_from_slice(evil);
                }
            }
            _ => {
                let j = rng.random_range(0..d.len());
                d.swap(i, j);
            }
        }
        if d.is_empty() {
            return;
        }
    }
}
