//! `cargo xtask <task>`: build the guest assets, run the tests, the demo and
//! the benchmarks.

mod cache;
mod kernel;
mod rootfs;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Kernel => kernel::build().map(|p| println!("kernel: {}", p.display())),
        Task::Rootfs => rootfs::build().map(|p| println!("initramfs: {}", p.display())),
        Task::Assets => assets().map(|_| ()),
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
fn assets() -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let k = kernel::build()?;
    println!("kernel: {}", k.display());
    let r = rootfs::build()?;
    println!("initramfs: {}", r.display());
    Ok((k, r))
}
