//! The monitor end to end with hand-written guests: a few bytes of 32-bit
//! code behind a PVH note, booted in milliseconds. They exercise start,
//! the serial console, the i8042 reset, MMIO dispatch to a virtio-mmio
//! window, crash reporting, and a host stop that must pull a halted vCPU
//! out of KVM_RUN and release every fd.
//!
//! Needs /dev/kvm; fails (does not skip) without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use smol_vmm::{DiskConfig, ExitReason, Vm, VmConfig};

const ENTRY: u32 = 0x10_0000;

/// A minimal x86-64 ELF: one PT_LOAD of `code` at 1 MiB and a Xen PVH
/// entry note pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000 + code.len()];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&(ENTRY as u64).to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // phnum

    let phdr = |f: &mut [u8], at: usize, kind: u32, off: u64, addr: u64, size: u64, align: u64| {
        f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        f[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        f[at + 48..at + 56].copy_from_slice(&align.to_le_bytes());
    };
    phdr(
        &mut f,
        64,
        1,
        0x1000,
        ENTRY as u64,
        code.len() as u64,
        0x1000,
    );
    phdr(&mut f, 120, 4, 0x200, 0, 20, 4);

    // XEN_ELFNOTE_PHYS32_ENTRY.
    f[0x200..0x204].copy_from_slice(&4u32.to_le_bytes());
    f[0x204..0x208].copy_from_slice(&4u32.to_le_bytes());
    f[0x208..0x20c].copy_from_slice(&18u32.to_le_bytes());
    f[0x20c..0x210].copy_from_slice(b"Xen\0");
    f[0x210..0x214].copy_from_slice(&ENTRY.to_le_bytes());

    f[0x1000..].copy_from_slice(code);
    f
}

// 32-bit code fragments.
const MOV_DX_COM1: [u8; 4] = [0x66, 0xba, 0xf8, 0x03];
const OUT_DX_AL: u8 = 0xee;
const RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64]; // mov al, 0xfe; out 0x64, al
const HANG: [u8; 3] = [0xf4, 0xeb, 0xfd]; // hlt; jmp back to hlt

fn print(text: &[u8]) -> Vec<u8> {
    let mut code = MOV_DX_COM1.to_vec();
    for &b in text {
        code.extend_from_slice(&[0xb0, b, OUT_DX_AL]);
    }
    code
}

struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    fn new(code: &[u8]) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), pvh_elf(code)).unwrap();
        Guest { dir }
    }

    fn config(&self) -> VmConfig {
        VmConfig {
            kernel: self.dir.path().join("vmlinux"),
            initramfs: None,
            image_cache: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 64,
            console_log: Some(self.console()),
            vsock: None,
            disks: Vec::new(),
            net: None,
            fs: Vec::new(),
        }
    }

    fn console(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(self.console()).unwrap_or_default()
    }
}

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need /dev/kvm: {e}");
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// One test function, so fd and thread counts are not disturbed by other
/// tests running in parallel.
#[test]
fn tiny_guests() {
    require_kvm();
    let fds_before = open_fds();
    let threads_before = thread_count();

    prints_and_shuts_down();
    host_stop_pulls_a_halted_vcpu_out();
    threads_run_under_their_own_filters();
    mmio_reaches_the_virtio_window();
    triple_fault_is_a_crash();
    bad_configs_are_named_errors();
    many_start_stop_cycles();
    snapshot_and_restore_continue_the_guest();
    a_pit_tick_armed_by_a_restore_reaches_the_guest();

    // Each tiny guest is a kernel file of its own, prepared once and kept
    // for the next VM: those memfds are the cache's, not a leak.
    smol_vmm::release_boot_images();
    assert_eq!(open_fds(), fds_before, "an fd leaked");
    assert_eq!(thread_count(), threads_before, "a thread leaked");
}

fn prints_and_shuts_down() {
    let mut code = print(b"hello from a tiny guest\n");
    code.extend_from_slice(&RESET);
    code.extend_from_slice(&HANG);
    let g = Guest::new(&code);
    let mut vm = Vm::start(g.config()).unwrap();
    assert_eq!(
        vm.wait(Some(Duration::from_secs(20))),
        Some(ExitReason::GuestShutdown)
    );
    assert_eq!(vm.try_exit(), Some(ExitReason::GuestShutdown));
    assert_eq!(vm.stop(), ExitReason::GuestShutdown);
    assert_eq!(vm.stop(), ExitReason::GuestShutdown, "stop is idempotent");
    assert_eq!(g.console_text(), "hello from a tiny guest\n");
    let t = vm.timings();
    assert!(t.total > Duration::ZERO && t.total >= t.kernel_load + t.vcpus);
    assert_eq!(vm.console_log(), Some(g.console().as_path()));
    assert_eq!(vm.vsock_uds_path(), None);
}

fn host_stop_pulls_a_halted_vcpu_out() {
    // cli; hlt: with the in-kernel irqchip the vCPU sleeps inside KVM_RUN
    // and nothing but the kick gets it out.
    let mut code = print(b"halting\n");
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    let g = Guest::new(&code);
    let mut vm = Vm::start(g.config()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !g.console_text().contains("halting") {
        assert!(Instant::now() < deadline, "guest never printed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vm.try_exit(), None);
    assert_eq!(vm.wait(Some(Duration::from_millis(50))), None);
    let t0 = Instant::now();
    assert_eq!(vm.stop(), ExitReason::HostStop);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t0.elapsed()
    );
    assert_eq!(vm.wait(None), Some(ExitReason::HostStop));

    // A spinning guest (no HLT) stops as well, and so does a dropped Vm.
    let g = Guest::new(&[0xeb, 0xfe]);
    let vm = Vm::start(g.config()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(vm);

    // Issue 15: the monitor's own handle, dropped without a stop, joins
    // its vCPU threads before guest memory goes (the thread and fd counts
    // of `tiny_guests` check that they are gone).
    let threads = thread_count();
    let (running, _) = smol_vmm::vm::build(&g.config()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(thread_count() > threads, "the vm runs threads");
    let t0 = Instant::now();
    drop(running);
    assert_eq!(thread_count(), threads, "dropping joined every thread");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

/// `Seccomp` and `Seccomp_filters` of every thread named `smol-*`.
fn thread_filters() -> Vec<(String, String)> {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = entry.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue; // ended meanwhile
        };
        let comm = comm.trim().to_string();
        if !comm.starts_with("smol-") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        seen.push((
            comm,
            format!("{}/{}", field("Seccomp:"), field("Seccomp_filters:")),
        ));
    }
    seen.sort();
    seen
}

fn threads_run_under_their_own_filters() {
    if std::env::var("SMOL_SECCOMP").is_ok_and(|v| v == "off" || v == "0") {
        println!("SKIPPED threads_run_under_their_own_filters: SMOL_SECCOMP=off");
        return;
    }
    // The console writer starts on the guest's first line, asked for by
    // the vCPU: it must carry its own filter only, not the vCPU's too.
    let mut code = print(b"filtered\n");
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    let g = Guest::new(&code);
    let mut config = g.config();
    config.vsock = Some(smol_vmm::VsockConfig {
        guest_cid: 3,
        uds_path: g.dir.path().join("v.sock"),
    });
    let mut vm = Vm::start(config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !g.console_text().contains("filtered") {
        assert!(Instant::now() < deadline, "guest never printed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let filters = thread_filters();
    for want in ["smol-vcpu0", "smol-events", "smol-console"] {
        let got: Vec<_> = filters.iter().filter(|(n, _)| n == want).collect();
        assert_eq!(got.len(), 1, "{want} in {filters:?}");
        assert_eq!(got[0].1, "2/1", "{want}: mode 2, one filter: {filters:?}");
    }
    // The spawner itself runs no guest-driven code, and must stay
    // unfiltered for what it starts to carry only their own filter.
    assert!(
        filters.contains(&("smol-spawner".into(), "0/0".into())),
        "{filters:?}"
    );
    assert_eq!(vm.stop(), ExitReason::HostStop);
    assert!(
        thread_filters().is_empty(),
        "threads outlived the VM: {:?}",
        thread_filters()
    );
}

fn mmio_reaches_the_virtio_window() {
    // mov eax, [0xd0000000]; print its four bytes; reset.
    let mut code = vec![0xa1, 0x00, 0x00, 0x00, 0xd0];
    code.extend_from_slice(&MOV_DX_COM1);
    for _ in 0..4 {
        code.push(OUT_DX_AL);
        code.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
    }
    // Then a read outside any device: all ones.
    code.extend_from_slice(&[0xa1, 0x00, 0x00, 0xf0, 0xd0]); // mov eax, [0xd0f00000]
    code.push(OUT_DX_AL);
    code.extend_from_slice(&[0xb0, b'\n', OUT_DX_AL]);
    code.extend_from_slice(&RESET);
    code.extend_from_slice(&HANG);
    let g = Guest::new(&code);
    let disk = g.dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = g.config();
    config.disks.push(DiskConfig {
        path: disk,
        read_only: false,
        id: "tiny".into(),
    });
    let mut vm = Vm::start(config).unwrap();
    assert_eq!(
        vm.wait(Some(Duration::from_secs(20))),
        Some(ExitReason::GuestShutdown)
    );
    vm.stop();
    let text = std::fs::read(g.console()).unwrap_or_default();
    assert_eq!(text, b"virt\xff\n", "{:?}", String::from_utf8_lossy(&text));
}

fn triple_fault_is_a_crash() {
    // ud2 with no IDT: #UD, then #DF, then a triple fault.
    let g = Guest::new(&[0x0f, 0x0b]);
    let mut vm = Vm::start(g.config()).unwrap();
    match vm.wait(Some(Duration::from_secs(20))) {
        Some(ExitReason::Crashed(why)) => assert!(why.contains("vcpu 0"), "{why}"),
        other => panic!("expected a crash, got {other:?}"),
    }
    assert!(matches!(vm.stop(), ExitReason::Crashed(_)));
}

fn bad_configs_are_named_errors() {
    use smol_vmm::Error;
    let g = Guest::new(&HANG);

    let mut c = g.config();
    c.kernel = Path::new("/nonexistent/vmlinux").into();
    assert!(matches!(Vm::start(c), Err(Error::KernelNotFound { .. })));

    let corrupt = g.dir.path().join("corrupt");
    std::fs::write(
        &corrupt,
        b"this is not a kernel, just some bytes long enough to be read as a header........",
    )
    .unwrap();
    let mut c = g.config();
    c.kernel = corrupt;
    let err = Vm::start(c).err().unwrap();
    assert!(matches!(err, Error::KernelInvalid { .. }), "{err}");

    let mut c = g.config();
    c.memory_mib = 16;
    assert!(matches!(
        Vm::start(c),
        Err(Error::MemoryTooSmall { mib: 16, .. })
    ));

    let mut c = g.config();
    c.vcpus = 0;
    assert!(matches!(Vm::start(c), Err(Error::ZeroVcpus)));

    let mut c = g.config();
    c.initramfs = Some(g.dir.path().join("missing.cpio"));
    assert!(matches!(Vm::start(c), Err(Error::InitramfsNotFound { .. })));

    let mut c = g.config();
    c.cmdline = "bad\ncmdline".into();
    assert!(matches!(Vm::start(c), Err(Error::Cmdline(_))));

    // Device back ends fail with the device named.
    let mut c = g.config();
    c.disks.push(DiskConfig {
        path: g.dir.path().join("no-such-disk.img"),
        read_only: false,
        id: "x".into(),
    });
    let err = Vm::start(c).err().unwrap();
    assert!(
        matches!(&err, Error::Device { name, .. } if name.contains("virtio-blk")),
        "{err}"
    );

    let mut c = g.config();
    c.vsock = Some(smol_vmm::VsockConfig {
        guest_cid: 3,
        uds_path: g.dir.path().join("no-such-dir/v.sock"),
    });
    let err = Vm::start(c).err().unwrap();
    assert!(
        matches!(&err, Error::Device { name, .. } if name.contains("vsock")),
        "{err}"
    );
}

fn many_start_stop_cycles() {
    let g = Guest::new(&HANG);
    for _ in 0..20 {
        let mut vm = Vm::start(g.config()).unwrap();
        assert_eq!(vm.stop(), ExitReason::HostStop);
    }
}

/// Prints a line per letter from 'a' on, with a spin loop between lines:
/// the letter is in a register, so a restored guest that goes on with the
/// next letter has its vCPU state back, and its code came from the
/// snapshot's memory.
fn letters_guest(delay: u32) -> Vec<u8> {
    let mut code = MOV_DX_COM1.to_vec();
    code.extend_from_slice(&[0xb3, b'a']); // mov bl, 'a'
    let next = code.len();
    code.extend_from_slice(&[0x88, 0xd8, OUT_DX_AL]); // mov al, bl; out
    code.extend_from_slice(&[0xb0, b'\n', OUT_DX_AL]);
    code.extend_from_slice(&[0xfe, 0xc3]); // inc bl
    code.push(0xb9); // mov ecx, delay
    code.extend_from_slice(&delay.to_le_bytes());
    code.extend_from_slice(&[0x49, 0x75, 0xfd]); // spin: dec ecx; jnz spin
    let back = next as i64 - (code.len() as i64 + 2);
    code.extend_from_slice(&[0xeb, back as i8 as u8]); // jmp next
    code
}

fn lines(path: &Path) -> Vec<u8> {
    std::fs::read(path)
        .unwrap_or_default()
        .split(|&b| b == b'\n')
        .filter(|l| l.len() == 1)
        .map(|l| l[0])
        .collect()
}

fn wait_for_lines(path: &Path, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = lines(path);
        if l.len() >= n {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "only {} lines in {}",
            l.len(),
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn snapshot_and_restore_continue_the_guest() {
    use smol_vmm::snapshot::{self, Error as SnapErr};
    use smol_vmm::Error;
    let g = Guest::new(&letters_guest(200_000));
    let disk = g.dir.path().join("disk.img");
    std::fs::write(&disk, b"disk contents at the snapshot").unwrap();
    let mut config = g.config();
    config.disks.push(DiskConfig {
        path: disk.clone(),
        read_only: false,
        id: "tiny".into(),
    });
    let mut vm = Vm::start(config.clone()).unwrap();
    wait_for_lines(&g.console(), 3);
    let snap = g.dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let t = vm.snapshot(&snap).unwrap();
    let at_snapshot = *lines(&g.console()).last().unwrap();
    assert!(t.total >= t.pause && t.memory_bytes > 0, "{t:?}");
    // Snapshots back to back: a new pause may begin before the vCPU has
    // seen the resume of the last one, and must still get its state.
    for i in 0..30 {
        let d = g.dir.path().join(format!("again-{i}"));
        std::fs::create_dir(&d).unwrap();
        vm.snapshot(&d)
            .unwrap_or_else(|e| panic!("snapshot {i} of a series: {e}"));
        std::fs::remove_dir_all(&d).unwrap();
    }
    // The guest runs on after its snapshot.
    let before = lines(&g.console()).len();
    wait_for_lines(&g.console(), before + 2);
    assert_eq!(vm.stop(), ExitReason::HostStop);
    std::fs::write(&disk, b"changed after the snapshot").unwrap();
    assert_eq!(
        std::fs::read(snap.join(snapshot::disk_file(0))).unwrap(),
        b"disk contents at the snapshot"
    );

    // Two restores of one snapshot both go on from where it stopped.
    for round in 0..2 {
        let console = g.dir.path().join(format!("restored-{round}.log"));
        let disk = g.dir.path().join(format!("restored-{round}.img"));
        snapshot::clone_file(&snap.join(snapshot::disk_file(0)), &disk).unwrap();
        let mut c = config.clone();
        c.console_log = Some(console.clone());
        c.disks[0].path = disk;
        c.kernel = g.dir.path().join("not-read-on-restore");
        let mut vm = Vm::restore(c, &snap).unwrap();
        let got = wait_for_lines(&console, 2);
        assert!(
            got[0] == at_snapshot + 1 || got[0] == at_snapshot,
            "restored guest printed {:?} first; the snapshot was at {:?}",
            got[0] as char,
            at_snapshot as char
        );
        assert_eq!(got[1], got[0] + 1);
        assert_eq!(vm.stop(), ExitReason::HostStop);
    }

    // What is wrong with a snapshot is named.
    let mut c = config.clone();
    c.memory_mib = 128;
    c.disks[0].path = g.dir.path().join("restored-0.img");
    let err = Vm::restore(c, &snap).err().unwrap();
    assert!(
        matches!(err, Error::Snapshot(SnapErr::Mismatch { .. })),
        "{err}"
    );
    let err = Vm::restore(config.clone(), &g.dir.path().join("none"))
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::Snapshot(SnapErr::NotFound { .. })),
        "{err}"
    );
    let mem = snap.join(snapshot::MEMORY_FILE);
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(4096).unwrap();
    let err = Vm::restore(config.clone(), &snap).err().unwrap();
    assert!(
        matches!(err, Error::Snapshot(SnapErr::Corrupt { .. })),
        "{err}"
    );
}

/// Writes `value` little-endian into the byte array at `v[offset..]`.
fn put_le(v: &mut serde_json::Value, offset: usize, value: u64, len: usize) {
    let bytes = v.as_array_mut().expect("a byte array");
    for (i, b) in value.to_le_bytes()[..len].iter().enumerate() {
        bytes[offset + i] = serde_json::Value::from(*b);
    }
}

fn get_le(v: &serde_json::Value, offset: usize, len: usize) -> u64 {
    let bytes = v.as_array().expect("a byte array");
    (0..len).fold(0, |acc, i| {
        acc | (bytes[offset + i].as_u64().unwrap() << (8 * i))
    })
}

/// A restore re-arms the PIT, whose tick must reach the restored LAPIC:
/// a restore that set the PIT before the vCPU's LAPIC lost the tick, and
/// a guest running the PIT one-shot (ours on kvm_pvm) then waited for it
/// forever. The snapshot is edited so that the PIT fires 2 counts
/// (under 2 us) after it is restored, into an unmasked IO-APIC pin, a
/// LAPIC that is on, and a vCPU with interrupts off (no handler needed):
/// the tick must then be pending in the LAPIC's IRR.
fn a_pit_tick_armed_by_a_restore_reaches_the_guest() {
    const VECTOR: u64 = 0x30;
    let g = Guest::new(&letters_guest(200_000));
    let mut vm = Vm::start(g.config()).unwrap();
    wait_for_lines(&g.console(), 2);
    let snap = g.dir.path().join("pit-snap");
    std::fs::create_dir(&snap).unwrap();
    vm.snapshot(&snap).unwrap();
    assert_eq!(vm.stop(), ExitReason::HostStop);

    let state_file = snap.join(smol_vmm::snapshot::STATE_FILE);
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    // kvm_pit_state2, channel 0: count (u32 at 0), rw_mode (12), mode
    // (13), gate (15).
    let pit = &mut state["vm"]["pit"];
    put_le(pit, 0, 2, 4);
    put_le(pit, 12, 3, 1);
    put_le(pit, 13, 4, 1);
    put_le(pit, 15, 1, 1);
    // kvm_irqchip: chip_id and pad, then the IO-APIC: base (8), ioregsel,
    // id, irr, pad, then the redirection table from byte 24. Pin 0: fixed,
    // physical to APIC 0, edge, unmasked.
    put_le(&mut state["vm"]["ioapic"], 8 + 24, VECTOR, 8);
    let vcpu = &mut state["vcpus"][0];
    // The LAPIC: TPR 0 and software-enabled (SVR bit 8).
    put_le(&mut vcpu["lapic"], 0x80, 0, 4);
    put_le(&mut vcpu["lapic"], 0xf0, 0x1ff, 4);
    // kvm_regs: RFLAGS at 136, IF (bit 9) off.
    let rflags = get_le(&vcpu["regs"], 136, 8);
    put_le(&mut vcpu["regs"], 136, rflags & !0x200, 8);
    std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();

    let mut c = g.config();
    c.console_log = Some(g.dir.path().join("pit-restored.log"));
    let mut vm = Vm::restore(c, &snap).unwrap();
    wait_for_lines(&g.dir.path().join("pit-restored.log"), 2);
    let after = g.dir.path().join("pit-after");
    std::fs::create_dir(&after).unwrap();
    vm.snapshot(&after).unwrap();
    assert_eq!(vm.stop(), ExitReason::HostStop);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(after.join(smol_vmm::snapshot::STATE_FILE)).unwrap())
            .unwrap();
    // The IRR: 8 registers of 32 bits, 16 bytes apart, from 0x200.
    let irr = get_le(
        &state["vcpus"][0]["lapic"],
        0x200 + 16 * (VECTOR as usize / 32),
        4,
    );
    assert_ne!(
        irr & (1 << (VECTOR % 32)),
        0,
        "the PIT's tick (vector {VECTOR:#x}) is not pending in the restored LAPIC (IRR word {irr:#x}): it was lost in the restore"
    );
}
