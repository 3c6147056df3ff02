//! Boots a kernel under the monitor and copies its console to stdout until
//! the guest exits or the timeout passes, then prints how it ended.
//!
//! `cargo run -p smol-vmm --example boot -- VMLINUX [INITRAMFS] [EXTRA_CMDLINE] [TIMEOUT_S] [MEMORY_MIB]`
//!
//! With SMOL_BOOT_VSOCK=PATH the guest also gets a vsock device (cid 3) on that socket;
//! with SMOL_BOOT_SAMPLE_S=N the vCPUs log their RIP every N seconds (RUST_LOG filters).

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use smol_vmm::{Vm, VmConfig, VsockConfig};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "smol_vmm=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel) = args.first() else {
        eprintln!("usage: [SMOL_BOOT_VSOCK=PATH] boot VMLINUX [INITRAMFS] [EXTRA_CMDLINE] [TIMEOUT_S] [MEMORY_MIB]");
        std::process::exit(2);
    };
    let dir = std::env::temp_dir().join(format!("smol-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let console = dir.join("console.log");
    let config = VmConfig {
        kernel: kernel.into(),
        initramfs: args.get(1).filter(|s| !s.is_empty()).map(Into::into),
        image_cache: None,
        cmdline: args.get(2).cloned().unwrap_or_default(),
        vcpus: 1,
        memory_mib: args
            .get(4)
            .map_or(128, |s| s.parse().expect("memory in MiB")),
        console_log: Some(console.clone()),
        vsock: std::env::var_os("SMOL_BOOT_VSOCK").map(|p| VsockConfig {
            guest_cid: 3,
            uds_path: p.into(),
        }),
        disks: Vec::new(),
        net: None,
        fs: Vec::new(),
    };
    let timeout = Duration::from_secs(args.get(3).map_or(120, |s| s.parse().expect("seconds")));
    let t0 = Instant::now();
    let mut vm = Vm::start(config).unwrap_or_else(|e| {
        eprintln!("start failed: {e}");
        std::process::exit(1)
    });
    eprintln!("[host] set-up {:?}", vm.timings());
    let mut log = std::fs::File::open(&console).expect("console log");
    let mut pos = 0u64;
    let sample_every = std::env::var("SMOL_BOOT_SAMPLE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs_f64);
    let mut last_sample = Instant::now();
    let mut out = std::io::stdout();
    let reason = loop {
        let done = vm.wait(Some(Duration::from_millis(100)));
        log.seek(SeekFrom::Start(pos)).unwrap();
        let mut buf = Vec::new();
        pos += log.read_to_end(&mut buf).unwrap() as u64;
        let _ = out.write_all(&buf);
        let _ = out.flush();
        if let Some(r) = done {
            break r;
        }
        if t0.elapsed() > timeout {
            break vm.stop();
        }
        // Where the guest is, every SMOL_BOOT_SAMPLE_S seconds.
        if let Some(every) = sample_every {
            if last_sample.elapsed() >= every {
                vm.log_vcpu_state();
                last_sample = Instant::now();
            }
        }
    };
    vm.stop();
    eprintln!("[host] {:?} after {:?}", reason, t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
