//! The Python tools the tests use, in a venv of their own in the cache:
//! schemathesis, which checks the live `smol serve` against its OpenAPI
//! document (tests/openapi.rs). Installed from PyPI once per pinned version.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::cache::cache_dir;

/// Pinned: its CLI options are what tests/openapi.rs passes.
pub const SCHEMATHESIS: &str = "4.32.5";

/// Debian's interpreter (with `python3-venv`), not whatever is first on PATH.
const PYTHON: &str = "/usr/bin/python3";

/// The schemathesis executable, installing it when it is not there yet.
pub fn ensure_schemathesis() -> Result<PathBuf, String> {
    let dir = cache_dir()
        .join("python")
        .join(format!("schemathesis-{SCHEMATHESIS}"));
    let exe = dir.join("bin").join("schemathesis");
    // Written last: a half-made venv (an interrupted install) is redone.
    let complete = dir.join(".complete");
    if exe.is_file() && complete.is_file() {
        println!(
            "xtask: schemathesis {SCHEMATHESIS}: cached {}",
            exe.display()
        );
        return Ok(exe);
    }
    let t = Instant::now();
    println!(
        "xtask: schemathesis {SCHEMATHESIS}: installing from PyPI into {}",
        dir.display()
    );
    // A venv records its own path in its scripts: it is made in place.
    let tmp = dir.clone();
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new(PYTHON)
        .args(["-m", "venv"])
        .arg(&tmp)
        .status()
        .map_err(|e| format!("{PYTHON} -m venv: {e}"))?;
    if !status.success() {
        return Err(format!(
            "{PYTHON} -m venv {} failed ({status})",
            tmp.display()
        ));
    }
    let status = Command::new(tmp.join("bin").join("pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("schemathesis=={SCHEMATHESIS}"),
        ])
        .status()
        .map_err(|e| format!("pip install schemathesis: {e}"))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!(
            "pip install schemathesis=={SCHEMATHESIS} failed ({status})"
        ));
    }
    if !exe.is_file() {
        return Err(format!("{} missing after the install", exe.display()));
    }
    std::fs::write(&complete, SCHEMATHESIS)
        .map_err(|e| format!("write {}: {e}", complete.display()))?;
    println!(
        "xtask: schemathesis {SCHEMATHESIS}: installed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(exe)
}
