//! virtiofsd, the vhost-user back end of `MachineConfig.mounts` (one per
//! share of a running machine): built from crates.io with `cargo install`
//! into the cache once per pinned version. The tests and benches get it as
//! `SMOL_VIRTIOFSD`, so that every run uses the version whose command
//! line the SDK was checked against.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::cache::cache_dir;
use crate::kernel::ensure_debian_packages;

/// Pinned: the SDK's command line (src/backend/local/fs.rs) is checked
/// against this version's `--help`.
pub const VIRTIOFSD: &str = "1.14.0";

/// What `cargo install virtiofsd` links against (libseccomp, libcap-ng)
/// and finds them with.
const BUILD_PACKAGES: &[&str] = &["libseccomp-dev", "libcap-ng-dev", "pkg-config"];

/// The virtiofsd executable, building it when it is not there yet.
pub fn ensure_virtiofsd() -> Result<PathBuf, String> {
    let root = cache_dir().join(format!("virtiofsd-{VIRTIOFSD}"));
    let exe = root.join("bin").join("virtiofsd");
    // Written last: an interrupted install is redone.
    let complete = root.join(".complete");
    if exe.is_file() && complete.is_file() {
        println!("xtask: virtiofsd {VIRTIOFSD}: cached {}", exe.display());
        return Ok(exe);
    }
    ensure_debian_packages(BUILD_PACKAGES, |m| println!("xtask: {m}"))?;
    let t = Instant::now();
    println!(
        "xtask: virtiofsd {VIRTIOFSD}: cargo install into {} (a few minutes on 2 cores)",
        root.display()
    );
    let _ = std::fs::remove_dir_all(&root);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "install",
            "virtiofsd",
            "--version",
            VIRTIOFSD,
            "--locked",
            "--quiet",
            "--root",
        ])
        .arg(&root)
        // Not the workspace's target directory: the install builds in a
        // temporary one of its own and removes it.
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .map_err(|e| format!("cargo install virtiofsd: cannot start: {e}"))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&root);
        return Err(format!(
            "cargo install virtiofsd --version {VIRTIOFSD} failed ({status})"
        ));
    }
    if !exe.is_file() {
        return Err(format!("{} missing after the install", exe.display()));
    }
    std::fs::write(&complete, VIRTIOFSD)
        .map_err(|e| format!("write {}: {e}", complete.display()))?;
    println!(
        "xtask: virtiofsd {VIRTIOFSD}: installed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(exe)
}
