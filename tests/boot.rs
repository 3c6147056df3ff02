//! Boots the real guest (our kernel, our initramfs with the agent as PID 1)
//! under our monitor and checks it from the outside: the kernel banner and
//! the agent's ready line on the console, then a clean guest-initiated
//! shutdown requested over vsock.
//!
//! Needs the assets (`cargo xtask assets`, or SMOL_KERNEL / SMOL_INITRAMFS)
//! and /dev/kvm; fails loudly without them. On a kvm_pvm host the boot takes
//! about 60 s, so one guest serves every check.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use smol_protocol::{
    self as protocol, Frame, FrameKind, Request, Response, AGENT_PORT, READY_LINE,
};
use smol_vmm::{Error, ExitReason, Vm, VmConfig, VsockConfig, MIN_MEMORY_MIB};

/// Generous: a kvm_pvm host boots in ~60 s when idle, but minutes when its two
/// cores are shared with builds (qemu is just as slow then).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn asset(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("SMOL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/smol")))
        .expect("neither SMOL_CACHE_DIR nor HOME is set");
    cache.join("assets").join(name)
}

/// The guest assets; a missing one fails the test with what to do.
fn assets() -> (PathBuf, PathBuf) {
    let kernel = asset("SMOL_KERNEL", "vmlinux");
    let initramfs = asset("SMOL_INITRAMFS", "initramfs.cpio");
    for p in [&kernel, &initramfs] {
        assert!(
            p.is_file(),
            "guest asset {} is missing: run `cargo xtask assets` or set SMOL_KERNEL/SMOL_INITRAMFS",
            p.display()
        );
    }
    (kernel, initramfs)
}

fn config(dir: &Path) -> VmConfig {
    let (kernel, initramfs) = assets();
    VmConfig {
        kernel,
        initramfs: Some(initramfs),
        image_cache: None,
        cmdline: String::new(),
        vcpus: 1,
        memory_mib: 128,
        console_log: Some(dir.join("console.log")),
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("vsock.sock"),
        }),
        disks: Vec::new(),
        net: None,
        fs: Vec::new(),
    }
}

fn console(vm: &Vm) -> String {
    let bytes = std::fs::read(vm.console_log().unwrap()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Polls the console until `needle` appears; fails if the VM ends first.
fn wait_for_console(vm: &Vm, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if console(vm).contains(needle) {
            return;
        }
        if let Some(reason) = vm.try_exit() {
            panic!(
                "guest ended ({reason:?}) before printing {needle:?}; console:\n{}",
                console(vm)
            );
        }
        if Instant::now() > deadline {
            panic!(
                "no {needle:?} on the console after {timeout:?}; console:\n{}",
                console(vm)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens a stream to the agent through the vsock device's Unix socket.
fn connect_agent(uds: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(uds).expect("connect to the vsock socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    writeln!(stream, "CONNECT {AGENT_PORT}").unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "vsock handshake answered {line:?}");
    stream
}

#[test]
fn guest_boots_to_the_agent_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut vm = Vm::start(config(dir.path())).expect("vm starts");
    let setup = vm.timings();

    wait_for_console(&vm, READY_LINE, BOOT_TIMEOUT);
    let to_ready = t0.elapsed();
    let text = console(&vm);
    assert!(
        text.contains("Linux version"),
        "no kernel banner; console:\n{text}"
    );
    eprintln!(
        "boot: host set-up {:?} (kvm {:?}, memory {:?}, kernel {:?}, devices {:?}, vcpus {:?}), \
         start to ready line {:?}",
        setup.total,
        setup.kvm,
        setup.memory,
        setup.kernel_load,
        setup.devices,
        setup.vcpus,
        to_ready
    );

    // Guest-initiated shutdown: the agent powers off when asked.
    let mut agent = connect_agent(vm.vsock_uds_path().unwrap());
    let req = Frame::json(FrameKind::Request, &Request::Shutdown);
    agent.write_all(&req.encode()).unwrap();
    // The guest may go down before the answer crosses: no frame is fine.
    if let Ok(Some(frame)) = protocol::read_frame(&mut agent) {
        let resp: Response = frame
            .expect(FrameKind::Response)
            .and_then(|f| f.parse("shutdown response"))
            .expect("a response to shutdown");
        assert!(matches!(resp, Response::Ok), "shutdown answered {resp:?}");
    }
    // Powering off runs the guest's shutdown path, slow on kvm_pvm too.
    let reason = vm.wait(Some(Duration::from_secs(300)));
    assert_eq!(
        reason,
        Some(ExitReason::GuestShutdown),
        "console:\n{}",
        console(&vm)
    );
    assert_eq!(vm.stop(), ExitReason::GuestShutdown);
    eprintln!("boot: start to guest shutdown {:?}", t0.elapsed());
}

#[test]
fn bad_input_is_a_named_error() {
    let dir = tempfile::tempdir().unwrap();

    let mut c = config(dir.path());
    c.kernel = dir.path().join("no-such-vmlinux");
    let err = Vm::start(c).err().expect("missing kernel refused");
    assert!(matches!(err, Error::KernelNotFound { .. }), "{err}");
    assert!(err.to_string().contains("no-such-vmlinux"), "{err}");

    let corrupt = dir.path().join("corrupt-vmlinux");
    let mut bytes = std::fs::read(assets().0).unwrap();
    bytes.truncate(4096);
    bytes[0] = b'X';
    std::fs::write(&corrupt, &bytes).unwrap();
    let mut c = config(dir.path());
    c.kernel = corrupt;
    let err = Vm::start(c).err().expect("corrupt kernel refused");
    assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");

    let truncated = dir.path().join("truncated-vmlinux");
    let mut bytes = std::fs::read(assets().0).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&truncated, &bytes).unwrap();
    let mut c = config(dir.path());
    c.kernel = truncated;
    let err = Vm::start(c).err().expect("truncated kernel refused");
    assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");

    let mut c = config(dir.path());
    c.memory_mib = 8;
    let err = Vm::start(c).err().expect("tiny memory refused");
    assert!(
        matches!(err, Error::MemoryTooSmall { mib: 8, min_mib } if min_mib == MIN_MEMORY_MIB),
        "{err}"
    );

    let mut c = config(dir.path());
    c.vcpus = 0;
    let err = Vm::start(c).err().expect("zero vcpus refused");
    assert!(matches!(err, Error::ZeroVcpus), "{err}");
}
