//! `cargo xtask <task>`: build the guest assets, run the tests, the fuzz
//! targets, the demo and the benchmarks.

mod cache;
mod fuzz;
mod kernel;
mod python;
mod rootfs;
mod virtiofsd;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "smol's build and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build (or reuse from the cache) the guest kernel `vmlinux`.
    Kernel,
    /// Build (or reuse from the cache) the guest initramfs.
    Rootfs,
    /// Both guest assets.
    Assets,
    /// Assets, then format and lint checks, then every test of the workspace
    /// (all features, so the `smol` CLI too), then every fuzz target for a
    /// bounded time ($SMOL_FUZZ_SECONDS each, 30 by default; 0 skips).
    Test {
        /// Extra arguments passed to `cargo test` (after `--workspace --all-features`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Builds the fuzz targets (stable Rust, libFuzzer) and runs one, or
    /// each in turn, for a bounded time.
    Fuzz {
        /// One target of fuzz/Cargo.toml; all of them when absent.
        target: Option<String>,
        /// Seconds per target ($SMOL_FUZZ_SECONDS, else 30; 0 skips).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Assets, then tests/soak.rs at length: create/exec/file/delete
    /// cycles (200 by default) that must leave no fd, thread, child or file.
    Soak {
        #[arg(long, default_value_t = 200)]
        cycles: usize,
    },
    /// Assets, then boot a machine, exec in it and show the timings.
    Demo,
    /// Assets, then `cargo bench` (extra arguments are passed through).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Kernel => kernel::build().map(|p| println!("kernel: {}", p.display())),
        Task::Rootfs => rootfs::build().map(|p| println!("initramfs: {}", p.display())),
        Task::Assets => assets().map(|_| ()),
        Task::Test { args } => test(&args),
        Task::Fuzz { target, seconds } => match seconds.map_or_else(fuzz::seconds_from_env, Ok) {
            Ok(s) => fuzz::run(target.as_deref(), s),
            Err(e) => Err(e),
        },
        Task::Soak { cycles } => soak(cycles),
        Task::Demo => demo(),
        Task::Bench { args } => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Builds both assets and returns (kernel, initramfs).
fn assets() -> Result<(PathBuf, PathBuf), String> {
    let k = kernel::build()?;
    println!("kernel: {}", k.display());
    let r = rootfs::build()?;
    println!("initramfs: {}", r.display());
    Ok((k, r))
}

/// A `cargo` command run from the workspace root with the assets in its
/// environment, so tests and examples find exactly what was just built.
fn cargo(args: &[&str], assets: &(PathBuf, PathBuf)) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args(args)
        .current_dir(cache::workspace_root())
        .env("SMOL_KERNEL", &assets.0)
        .env("SMOL_INITRAMFS", &assets.1);
    c
}

fn run(what: &str, mut cmd: Command) -> Result<(), String> {
    let t = Instant::now();
    println!("xtask: {what}");
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if !status.success() {
        return Err(format!("{what} failed ({status})"));
    }
    println!("xtask: {what} done in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Fails when a rust-vmm crate appears twice in the dependency tree: the
/// devices share guest memory types, so two vm-memory versions cannot mix.
fn check_single_rust_vmm(assets: &(PathBuf, PathBuf)) -> Result<(), String> {
    let out = cargo(
        &[
            "tree",
            "--workspace",
            "-d",
            "--prefix",
            "depth",
            "-e",
            "normal",
        ],
        assets,
    )
    .output()
    .map_err(|e| format!("cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo tree -d failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dups = String::from_utf8_lossy(&out.stdout);
    const RUST_VMM: &[&str] = &[
        "vm-memory ",
        "virtio-queue ",
        "kvm-bindings ",
        "kvm-ioctls ",
        "vmm-sys-util ",
        "linux-loader ",
        "event-manager ",
    ];
    // Depth 0 lines are the duplicated crates; deeper ones are their dependents.
    for line in dups.lines().filter_map(|l| l.strip_prefix('0')) {
        if RUST_VMM.iter().any(|c| line.starts_with(c)) {
            return Err(format!("duplicate rust-vmm crate in the tree: {line}"));
        }
    }
    println!("xtask: one version of each rust-vmm crate in the tree");
    Ok(())
}

/// Debian packages the tests use on the host: the registry the image tests
/// push to, busybox for the test images, mkfs.ext4 for machine disks,
/// passt for machine networks.
const TEST_PACKAGES: &[&str] = &[
    "docker-registry",
    "busybox-static",
    "e2fsprogs",
    // schemathesis' venv (tests/openapi.rs)
    "python3-venv",
    // the network of machines with resources.network (tests/network.rs)
    "passt",
    // `smol shell` driven as a person would (tests/machine.rs)
    "tmux",
];

fn test(extra: &[String]) -> Result<(), String> {
    // Read first: a bad value fails now, not after the tests.
    let fuzz_seconds = fuzz::seconds_from_env()?;
    kernel::ensure_debian_packages(TEST_PACKAGES, |m| println!("xtask: {m}"))?;
    let a = assets()?;
    run("cargo fmt --check", cargo(&["fmt", "--all", "--check"], &a))?;
    // All features: the `smol` CLI (feature `cli`) is linted and tested too.
    run(
        "cargo clippy",
        cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ],
            &a,
        ),
    )?;
    check_single_rust_vmm(&a)?;
    let mut args = vec!["test", "--workspace", "--all-features"];
    args.extend(extra.iter().map(String::as_str));
    // Every machine start of the SDK tests is logged, to count the boots.
    let boot_log = std::env::temp_dir().join(format!("smol-boots-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&boot_log);
    let schemathesis = python::ensure_schemathesis()?;
    // The back end of machines' shares (tests/mounts.rs).
    let virtiofsd = virtiofsd::ensure_virtiofsd()?;
    let mut cmd = cargo(&args, &a);
    cmd.env("SMOL_BOOT_LOG", &boot_log)
        .env("SMOL_SCHEMATHESIS", &schemathesis)
        .env("SMOL_VIRTIOFSD", &virtiofsd);
    let result = run("cargo test", cmd);
    let log = std::fs::read_to_string(&boot_log).unwrap_or_default();
    let _ = std::fs::remove_file(&boot_log);
    let cold: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("cold "))
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    let restored = log.lines().filter(|l| l.starts_with("restored ")).count();
    println!(
        "xtask: SDK machines in the tests: {} cold boots ({}), {restored} restored from snapshots",
        cold.len(),
        cold.join(", ")
    );
    result?;
    // Bounded: a regression in the parsers of guest and registry bytes
    // shows here; longer runs are `cargo xtask fuzz`'s.
    fuzz::run(None, fuzz_seconds)
}

fn soak(cycles: usize) -> Result<(), String> {
    let a = assets()?;
    let mut cmd = cargo(&["test", "--test", "soak", "--", "--nocapture"], &a);
    cmd.env("SMOL_SOAK_CYCLES", cycles.to_string());
    run(&format!("soak: {cycles} cycles"), cmd)
}

fn demo() -> Result<(), String> {
    let a = assets()?;
    run(
        "demo",
        // Not --quiet: a first build takes minutes, and cargo's progress
        // shows that something happens.
        cargo(&["run", "--release", "--example", "demo"], &a),
    )
}

fn bench(extra: &[String]) -> Result<(), String> {
    let a = assets()?;
    // benches/mounts.rs shares a directory into its machine.
    let virtiofsd = virtiofsd::ensure_virtiofsd()?;
    // All features: benches/remote.rs needs `server`.
    let mut args = vec!["bench", "--workspace", "--all-features"];
    args.extend(extra.iter().map(String::as_str));
    let mut cmd = cargo(&args, &a);
    cmd.env("SMOL_VIRTIOFSD", &virtiofsd);
    run("cargo bench", cmd)
}
