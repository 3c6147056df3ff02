//! Device tests against a real virtiofsd (skipped, saying so, when none is
//! installed): guest memory in a shared memfd, the driver's rings laid out
//! by a test driver, FUSE requests written by hand, and the device's
//! event-loop glue run by a real `EventManager`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::test_queue::DriverQueue;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestRam;

const MIB: u64 = 1 << 20;
const HIPRIO_RING: u64 = 0;
const REQUEST_RING: u64 = 0x1_0000;
/// Request and reply buffers.
const IN_BUF: u64 = 0x10_0000;
const OUT_BUF: u64 = 0x20_0000;
const OUT_LEN: u32 = 64 << 10;

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const ENOENT: i32 = 2;

/// The virtiofsd the tests use: `SMOL_VIRTIOFSD`, the one `cargo xtask`
/// installs, or one on the usual paths.
fn virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMOL_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let cached = Path::new(&home).join(".cache/smol/virtiofsd-1.14.0/bin/virtiofsd");
    [
        cached,
        "/usr/libexec/virtiofsd".into(),
        "/usr/bin/virtiofsd".into(),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// A virtiofsd serving a temporary directory.
struct Daemon {
    child: Child,
    socket: PathBuf,
    shared: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(binary: &Path) -> Daemon {
        let shared = tempfile::tempdir().unwrap();
        Self::start_on(binary, shared)
    }

    fn start_on(binary: &Path, shared: tempfile::TempDir) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fs.sock");
        let child = Command::new(binary)
            .arg("--shared-dir")
            .arg(shared.path())
            .arg("--socket-path")
            .arg(&socket)
            .args([
                "--sandbox",
                "none",
                "--cache",
                "never",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "virtiofsd made no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child,
            socket,
            shared,
            _dir: dir,
        }
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Harness {
    _ram: GuestRam,
    mem: GuestMemory,
    em: EventManager<Arc<Mutex<Fs>>>,
    dev: Arc<Mutex<Fs>>,
    hiprio: DriverQueue,
    request: DriverQueue,
    interrupt: Interrupt,
    unique: u64,
}

impl Harness {
    fn new(daemon: &Daemon) -> Harness {
        let ram = GuestRam::new_shared(16 * MIB).unwrap();
        let mem = ram.memory().clone();
        let (hiprio, hq) = DriverQueue::new(&mem, HIPRIO_RING, QUEUE_SIZE);
        let (request, rq) = DriverQueue::new(&mem, REQUEST_RING, QUEUE_SIZE);
        Self::with_queues(daemon, ram, hiprio, hq, request, rq)
    }

    fn with_queues(
        daemon: &Daemon,
        ram: GuestRam,
        hiprio: DriverQueue,
        hq: ActivatedQueue,
        request: DriverQueue,
        rq: ActivatedQueue,
    ) -> Harness {
        let mem = ram.memory().clone();
        let dev = Fs::new(&FsConfig::new("share", &daemon.socket)).unwrap();
        assert_ne!(dev.avail_features() & VIRTIO_F_VERSION_1, 0);
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Fs>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        {
            let mut d = dev.lock().unwrap();
            d.set_acked_features(VIRTIO_F_VERSION_1);
            d.activate(mem.clone(), interrupt.clone(), vec![hq, rq])
                .unwrap();
        }
        let mut h = Harness {
            _ram: ram,
            mem,
            em,
            dev,
            hiprio,
            request,
            interrupt,
            unique: 0,
        };
        h.run_until(|h| h.dev.lock().unwrap().started, "the rings start");
        h
    }

    fn run_until(&mut self, mut done: impl FnMut(&mut Harness) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            self.em.run_with_timeout(10).unwrap();
        }
    }

    /// Sends one FUSE request on the request queue and returns the reply's
    /// error and body, once the device interrupted for it.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let unique = self.unique;
        let mut req = Vec::with_capacity(40 + body.len());
        req.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0; 16]); // uid, gid, pid, extlen, padding
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(IN_BUF)).unwrap();
        self.interrupt.ack(u32::MAX);
        let head = self.request.add(
            &self.mem,
            &[(IN_BUF, req.len() as u32, false), (OUT_BUF, OUT_LEN, true)],
        );
        self.request.kick();
        let mut used = Vec::new();
        self.run_until(
            |h| {
                if h.interrupt.status() & VIRTIO_MMIO_INT_VRING != 0 {
                    used.extend(h.request.take_used(&h.mem));
                }
                !used.is_empty()
            },
            "the reply",
        );
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head);
        let len = used[0].1 as usize;
        assert!(len >= 16, "reply of {len} bytes");
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(OUT_BUF))
            .unwrap();
        let out_len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let out_unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!(out_unique, unique);
        assert_eq!(out_len, len);
        (error, out[16..].to_vec())
    }

    fn init(&mut self) {
        let mut body = Vec::new();
        for v in [7u32, 31, 0, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let (err, out) = self.call(FUSE_INIT, 0, &body);
        assert_eq!(err, 0, "FUSE_INIT");
        assert_eq!(u32::from_le_bytes(out[0..4].try_into().unwrap()), 7);
    }

    /// LOOKUP of `name` in the root: (error, node id, size).
    fn lookup(&mut self, name: &str) -> (i32, u64, u64) {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (err, out) = self.call(FUSE_LOOKUP, 1, &body);
        if err != 0 {
            return (err, 0, 0);
        }
        let node = u64::from_le_bytes(out[0..8].try_into().unwrap());
        let size = u64::from_le_bytes(out[48..56].try_into().unwrap());
        (0, node, size)
    }

    fn read_file(&mut self, node: u64, len: u32) -> Vec<u8> {
        let (err, out) = self.call(FUSE_OPEN, node, &[0; 8]);
        assert_eq!(err, 0, "FUSE_OPEN");
        let fh = &out[0..8];
        let mut body = fh.to_vec();
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&[0; 20]);
        let (err, data) = self.call(FUSE_READ, node, &body);
        assert_eq!(err, 0, "FUSE_READ");
        data
    }
}

macro_rules! need_virtiofsd {
    () => {
        match virtiofsd() {
            Some(b) => b,
            None => {
                eprintln!("skipped: no virtiofsd (run `cargo xtask test`, which installs it)");
                return;
            }
        }
    };
}

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let binary = need_virtiofsd!();
    let daemon = Daemon::start(&binary);
    let dev = Fs::new(&FsConfig::new("smol0", &daemon.socket)).unwrap();
    assert_eq!(dev.device_type(), TYPE_FS);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 2]);
    let mut tag = [0xffu8; TAG_LEN];
    dev.read_config(0, &mut tag);
    assert_eq!(&tag[..5], b"smol0");
    assert!(tag[5..].iter().all(|&b| b == 0));
    let mut n = [0u8; 4];
    dev.read_config(TAG_LEN as u64, &mut n);
    assert_eq!(u32::from_le_bytes(n), 1);
    // Out of range: untouched.
    let mut far = [9u8; 4];
    dev.read_config(CONFIG_LEN as u64, &mut far);
    assert_eq!(far, [9; 4]);
    assert!(matches!(
        Fs::new(&FsConfig::new("", &daemon.socket)),
        Err(Error::BadTag(_))
    ));
}

#[test]
fn a_missing_socket_is_a_named_error() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("nobody.sock");
    let err = Fs::new(&FsConfig::new("t", &path)).unwrap_err();
    assert!(err.to_string().contains("nobody.sock"), "{err}");
}

/// The back end maps the memfd: it reads the requests the driver wrote
/// and writes file bytes into guest buffers.
#[test]
fn fuse_requests_are_served_through_shared_memory() {
    let binary = need_virtiofsd!();
    let daemon = Daemon::start(&binary);
    let content = b"hello from the host\n";
    std::fs::write(daemon.shared.path().join("hello.txt"), content).unwrap();
    let mut h = Harness::new(&daemon);
    h.init();
    let (err, node, size) = h.lookup("hello.txt");
    assert_eq!(err, 0);
    assert_eq!(size, content.len() as u64);
    assert_eq!(h.read_file(node, 4096), content);
    let (err, ..) = h.lookup("absent");
    assert_eq!(err, -ENOENT);
}

/// A snapshot stops the rings and records where they stood; the device
/// goes on from there afterwards, and a new back end given the saved
/// rings (a restore) serves the next request at the saved index.
#[test]
fn snapshot_stops_the_rings_and_a_restore_goes_on_from_them() {
    let binary = need_virtiofsd!();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("f"), b"0123456789").unwrap();
    let daemon = Daemon::start_on(&binary, shared);
    let mut h = Harness::new(&daemon);
    h.init();
    assert_eq!(h.lookup("f").0, 0);
    let states = h.dev.lock().unwrap().quiesce_queues().unwrap();
    assert_eq!(states.len(), 2);
    assert_eq!(states[1].next_avail, 2, "two requests taken");
    assert_eq!(states[1].next_used, 2, "and answered");
    assert_eq!(states[0].next_avail, 0);
    assert!(!h.dev.lock().unwrap().started);
    // While paused, an activation wake does not start the rings.
    h.em.run_with_timeout(20).unwrap();
    assert!(!h.dev.lock().unwrap().started);
    h.dev.lock().unwrap().resume();
    h.run_until(|h| h.dev.lock().unwrap().started, "the rings start again");
    assert_eq!(h.lookup("f").0, 0);

    // A restore: the same guest memory (a copy of it, as a restore makes)
    // and saved rings, a new virtiofsd on the same directory.
    let states = h.dev.lock().unwrap().quiesce_queues().unwrap();
    assert_eq!(states[1].next_avail, 3);
    let snap = tempfile::tempdir().unwrap();
    let path = snap.path().join("memory.bin");
    crate::snapshot::memory::write(&h._ram, &path).unwrap();
    let ram =
        GuestRam::from_snapshot_shared(&std::fs::File::open(&path).unwrap(), 16 * MIB).unwrap();
    let shared = tempfile::tempdir().unwrap();
    std::fs::copy(daemon.shared.path().join("f"), shared.path().join("f")).unwrap();
    let second = Daemon::start_on(&binary, shared);
    let queue = |s: &QueueState| ActivatedQueue {
        queue: Queue::try_from(*s).unwrap(),
        notify: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let (hq, rq) = (queue(&states[0]), queue(&states[1]));
    let mut hiprio = h.hiprio;
    hiprio.kick = hq.notify.try_clone().unwrap();
    let mut request = h.request;
    request.kick = rq.notify.try_clone().unwrap();
    drop(h.em);
    let mut r = Harness::with_queues(&second, ram, hiprio, hq, request, rq);
    r.unique = 100;
    // The guest mounts again: a new session on the new back end.
    r.init();
    let (err, node, size) = r.lookup("f");
    assert_eq!((err, size), (0, 10));
    assert_eq!(r.read_file(node, 100), b"0123456789");
    let states = r.dev.lock().unwrap().quiesce_queues().unwrap();
    assert_eq!(states[1].next_avail, 7, "the restored ring went on from 3");
}

/// A reset stops the back end's rings; the driver can activate again.
#[test]
fn reset_stops_the_rings_and_the_device_activates_again() {
    let binary = need_virtiofsd!();
    let daemon = Daemon::start(&binary);
    let mut h = Harness::new(&daemon);
    h.init();
    assert!(h.dev.lock().unwrap().reset());
    h.run_until(|h| !h.dev.lock().unwrap().started, "the rings stop");
    assert!(h.dev.lock().unwrap().connected());
    // The driver starts over with fresh rings.
    let (hiprio, hq) = DriverQueue::new(&h.mem, HIPRIO_RING, QUEUE_SIZE);
    let (request, rq) = DriverQueue::new(&h.mem, REQUEST_RING, QUEUE_SIZE);
    h.hiprio = hiprio;
    h.request = request;
    {
        let mut d = h.dev.lock().unwrap();
        d.set_acked_features(VIRTIO_F_VERSION_1);
        d.activate(h.mem.clone(), h.interrupt.clone(), vec![hq, rq])
            .unwrap();
    }
    h.run_until(|h| h.dev.lock().unwrap().started, "the rings start");
    // virtiofsd keeps its session across a ring restart: a new INIT is
    // what a driver sends after a reset.
    h.init();
    assert_eq!(h.lookup("nothing").0, -ENOENT);
}

/// The back end dies: the device drops it and asks for a reset, and does
/// not take a new activation.
#[test]
fn a_dead_back_end_needs_a_reset() {
    let binary = need_virtiofsd!();
    let mut daemon = Daemon::start(&binary);
    let mut h = Harness::new(&daemon);
    h.init();
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    assert!(daemon.exited());
    h.run_until(|h| !h.dev.lock().unwrap().connected(), "the loss is seen");
    assert!(h.interrupt.needs_reset());
    let mut d = h.dev.lock().unwrap();
    d.reset();
    let (_, hq) = DriverQueue::new(&h.mem, HIPRIO_RING, QUEUE_SIZE);
    let (_, rq) = DriverQueue::new(&h.mem, REQUEST_RING, QUEUE_SIZE);
    let err = d
        .activate(h.mem.clone(), h.interrupt.clone(), vec![hq, rq])
        .unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
}

/// A back end that accepts the connection and never answers fails the
/// connect within the message deadline instead of hanging it.
#[test]
fn a_silent_back_end_times_out() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let held = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let _ = wait.recv();
        drop(s);
    });
    let t0 = Instant::now();
    let err = Fs::new(&FsConfig::new("t", &path)).unwrap_err();
    let took = t0.elapsed();
    done.send(()).unwrap();
    assert!(
        took >= MESSAGE_TIMEOUT && took < MESSAGE_TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
    assert!(
        matches!(err, Error::Backend(frontend::Error::Timeout(_))),
        "{err}"
    );
    held.join().unwrap();
}
