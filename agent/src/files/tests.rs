//! ReadFile / WriteFile over a Unix socket pair on real files.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::protocol::{Frame, Request};
use crate::server::testing::{connect, Client};

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn start_write(path: &str, mode: Option<u32>) -> Client {
    let mut c = connect();
    c.send(&Request::WriteFile {
        path: path.into(),
        mode,
    });
    c
}

fn write(path: &str, data: &[u8], mode: Option<u32>) -> Result<Response, AgentError> {
    let mut c = start_write(path, mode);
    for chunk in data.chunks(DATA_CHUNK) {
        write_frame(&mut c.conn, FrameKind::Data, chunk).unwrap();
    }
    write_frame(&mut c.conn, FrameKind::Eof, &[]).unwrap();
    c.response()
}

fn read(path: &str) -> Result<(u64, u32, Vec<u8>), AgentError> {
    let mut c = connect();
    c.send(&Request::ReadFile { path: path.into() });
    let (size, mode) = match c.response()? {
        Response::FileInfo { size, mode } => (size, mode),
        r => panic!("{r:?}"),
    };
    let mut data = Vec::new();
    loop {
        let f: Frame = c.frame().expect("frames until eof");
        match f.kind {
            FrameKind::Data => {
                assert!(f.payload.len() <= DATA_CHUNK);
                data.extend_from_slice(&f.payload);
            }
            FrameKind::Eof => break,
            FrameKind::Error => return Err(f.parse("error").unwrap()),
            k => panic!("unexpected {k:?}"),
        }
    }
    Ok((size, mode, data))
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".smol-tmp"))
        .collect()
}

#[test]
fn round_trips_of_several_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in [0usize, 1, 65_535, 65_536, 65_537, 3 * 1024 * 1024 + 7]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("f{i}"));
        let p = path.to_str().unwrap();
        let data = pseudo_random(len, i as u64 + 1);
        assert_eq!(
            write(p, &data, None).unwrap(),
            Response::Written { size: len as u64 }
        );
        assert!(std::fs::read(&path).unwrap() == data);
        let (size, mode, back) = read(p).unwrap();
        assert_eq!((size, mode), (len as u64, DEFAULT_MODE));
        assert!(back == data, "read back {} bytes of {len}", back.len());
    }
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn mode_is_applied_and_overwrite_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.sh");
    let p = path.to_str().unwrap();
    write(p, b"old contents that are longer", Some(0o600)).unwrap();
    write(p, b"#!/bin/sh\necho hi\n", Some(0o755)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    write(p, b"x", Some(0o4711)).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o4711
    );
    assert_eq!(read(p).unwrap().1, 0o4711);
}

#[test]
fn write_is_atomic_until_eof() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let p = path.to_str().unwrap();
    std::fs::write(&path, b"original").unwrap();
    let mut c = start_write(p, None);
    write_frame(&mut c.conn, FrameKind::Data, b"half of the new").unwrap();
    // Give the agent time to write the chunk: the target is still intact.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(std::fs::read(&path).unwrap(), b"original");
    assert_eq!(leftovers(dir.path()).len(), 1);
    // The host goes away before Eof: nothing changes, no temp file stays.
    drop(c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !leftovers(dir.path()).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(leftovers(dir.path()).is_empty());
    assert_eq!(std::fs::read(&path).unwrap(), b"original");
}

#[test]
fn write_errors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let missing_parent = format!("{d}/nope/f");
    let e = write(&missing_parent, b"x", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(&format!("{d}/nope")), "{}", e.message);

    let e = write(&d, b"x", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::IsADirectory);
    assert!(e.message.contains(&d));

    std::fs::write(format!("{d}/file"), b"").unwrap();
    let e = write(&format!("{d}/file/sub"), b"x", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotADirectory);

    let e = write("relative/path", b"x", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("relative/path"));

    let e = write(&format!("{d}/m"), b"x", Some(0o17777)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("17777"));

    // /proc does not take new files.
    let e = write("/proc/smol-test", b"x", None).unwrap_err();
    assert!(
        matches!(
            e.kind,
            ErrorKind::PermissionDenied | ErrorKind::NotFound | ErrorKind::Io
        ),
        "{e:?}"
    );
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn error_is_sent_before_the_host_finishes_sending() {
    // The agent answers at once and drains the rest, so a host that writes
    // everything before reading never fails on its writes.
    let mut c = start_write("/no/such/dir/f", None);
    for _ in 0..64 {
        write_frame(&mut c.conn, FrameKind::Data, &[7u8; DATA_CHUNK]).unwrap();
    }
    write_frame(&mut c.conn, FrameKind::Eof, &[]).unwrap();
    let e = c.response().unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("/no/such/dir"));
}

#[test]
fn read_errors_are_named() {
    let e = read("/no/such/file").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("/no/such/file"));
    let e = read("/tmp").unwrap_err();
    assert_eq!(e.kind, ErrorKind::IsADirectory);
    let e = read("/etc/passwd/x").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotADirectory);
    let e = read("etc/passwd").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
}

/// Issue 15: devices (endless ones included), FIFOs and sockets are
/// refused, also behind a symlink, and the open never blocks.
#[test]
fn read_of_a_special_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let link = dir.path().join("zero-link");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    for (path, kind) in [
        ("/dev/zero".to_string(), "character device"),
        (link.to_str().unwrap().to_string(), "character device"),
        (fifo.to_str().unwrap().to_string(), "FIFO"),
    ] {
        let e = read(&path).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{path}");
        assert!(
            e.message.contains("not a regular file") && e.message.contains(kind),
            "{path}: {}",
            e.message
        );
    }
}

#[test]
fn read_of_a_proc_file_streams_its_contents() {
    // Size 0 in stat, yet it has contents: reading goes to EOF.
    let (size, _, data) = read("/proc/self/status").unwrap();
    assert_eq!(size, 0);
    assert!(String::from_utf8_lossy(&data).contains("Pid:"));
}

#[test]
fn no_space_is_reported() {
    // /dev/full fails every write with ENOSPC; a write through a real
    // filesystem needs a small mount, which a test cannot count on.
    let mut f = OpenOptions::new().write(true).open("/dev/full").unwrap();
    let e = io_error(&f.write_all(b"x").unwrap_err(), "writing /x");
    assert_eq!(e.kind, ErrorKind::NoSpace);
    assert_eq!(e.message, "writing /x: no space left on device");
}

#[test]
fn full_filesystem_gives_no_space_and_leaves_nothing() {
    use nix::mount::{mount, umount, MsFlags};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    if let Err(e) = mount(
        Some("tmpfs"),
        d.as_str(),
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=64k"),
    ) {
        eprintln!("skipping: cannot mount a small tmpfs here ({e})");
        return;
    }
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = umount(self.0.as_str());
        }
    }
    let _guard = Unmount(d.clone());
    let e = write(&format!("{d}/big"), &pseudo_random(1 << 20, 9), None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace);
    assert!(e.message.contains(&format!("{d}/big")), "{}", e.message);
    assert!(leftovers(dir.path()).is_empty());
    assert!(!dir.path().join("big").exists());
}
