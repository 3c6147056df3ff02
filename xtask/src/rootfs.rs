//! `cargo xtask rootfs`: the guest initramfs (static agent as /init plus
//! Debian's busybox-static), cached by the hash of its inputs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use smol_rootfs_builder::{parse_applet_list, BaseRootfs, FORMAT_VERSION};

use crate::cache::{cache_dir, hash_inputs, publish, workspace_root};

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Builds (or reuses) the initramfs and publishes it; returns its path in
/// the assets directory.
pub fn build() -> Result<PathBuf, String> {
    let start = Instant::now();
    let agent_path = build_agent()?;
    let agent =
        std::fs::read(&agent_path).map_err(|e| format!("read {}: {e}", agent_path.display()))?;
    check_static(&agent).map_err(|e| format!("{}: {e}", agent_path.display()))?;

    let deb_path = busybox_deb()?;
    let deb = std::fs::read(&deb_path).map_err(|e| format!("read {}: {e}", deb_path.display()))?;

    let key = hash_inputs(&[
        ("agent", &agent),
        ("busybox-deb", &deb),
        ("format", FORMAT_VERSION.as_bytes()),
    ]);
    let out_dir = cache_dir().join("rootfs").join(&key);
    let out = out_dir.join("initramfs.cpio");
    let applets_out = out_dir.join("initramfs.applets");
    if out.exists() && applets_out.exists() {
        println!("rootfs: cached {} ({})", out.display(), size_of(&out));
    } else {
        let busybox = extract_busybox(&deb_path, &key)?;
        let applets = list_applets(&busybox)?;
        let busybox_bytes =
            std::fs::read(&busybox).map_err(|e| format!("read {}: {e}", busybox.display()))?;
        check_static(&busybox_bytes).map_err(|e| format!("{}: {e}", busybox.display()))?;
        let rootfs = BaseRootfs {
            agent: &agent,
            busybox: &busybox_bytes,
            applets: &applets,
            hostname: "smol",
        };
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| format!("create {}: {e}", out_dir.display()))?;
        let tmp = out_dir.join("initramfs.cpio.tmp");
        let file =
            std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
        rootfs
            .write(std::io::BufWriter::new(file))
            .map_err(|e| format!("write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &out).map_err(|e| format!("rename to {}: {e}", out.display()))?;
        // The applets the host links on each machine disk (the archive
        // holds the same list, and links only a few of them).
        let list = rootfs
            .applet_list()
            .map_err(|e| format!("applet list: {e}"))?;
        std::fs::write(&applets_out, list)
            .map_err(|e| format!("write {}: {e}", applets_out.display()))?;
        println!(
            "rootfs: built {} ({}; agent {} KiB, busybox with {} applets)",
            out.display(),
            size_of(&out),
            agent.len() / 1024,
            applets.len()
        );
    }
    prune(&cache_dir().join("rootfs"), &key);
    // The list first: the SDK reads it beside the initramfs it boots.
    publish(&applets_out, "initramfs.applets")?;
    let published = publish(&out, "initramfs.cpio")?;
    println!("rootfs: done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(published)
}

/// Removes images (and unpacked busybox trees) of other keys: each agent
/// change makes a new image, and only the current one is published.
fn prune(dir: &Path, keep: &str) {
    for sub in [dir.to_path_buf(), dir.join("unpacked")] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let is_key = name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if is_key && name != keep {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn size_of(p: &Path) -> String {
    let n = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Builds the agent statically in its own target dir, so that the host
/// builds (different RUSTFLAGS) are not invalidated.
fn build_agent() -> Result<PathBuf, String> {
    let root = workspace_root();
    let target_dir = root.join("target").join("guest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("rootfs: building the static agent ({GUEST_TARGET}, crt-static)");
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "smol-agent",
            "--release",
            "--target",
            GUEST_TARGET,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        // These would override the target-specific flags below.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        // Unpacking the initramfs is guest kernel work, which kvm_pvm
        // hosts emulate (seconds per MiB): ship no debug info (7 MiB ->
        // 2 MiB) and optimise for size (another -20%; the agent's time goes
        // to system calls, not to its own code).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .status()
        .map_err(|e| format!("run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the agent failed ({status})"));
    }
    Ok(target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("smol-agent"))
}

/// Fails unless `elf` is a 64-bit x86 ELF executable without a program
/// interpreter (that is, it runs without a dynamic loader).
fn check_static(elf: &[u8]) -> Result<(), String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    if u16_at(18) != 62 {
        return Err("not an x86-64 binary".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff
            .checked_add(i * phentsize)
            .filter(|o| o.checked_add(4).is_some_and(|end| end <= elf.len()))
            .ok_or("truncated program headers")?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]) == PT_INTERP {
            return Err("dynamically linked (has a PT_INTERP program header)".into());
        }
    }
    Ok(())
}

/// The busybox-static .deb from Debian's archive, downloaded once into
/// `<cache>/debs` with apt-get.
fn busybox_deb() -> Result<PathBuf, String> {
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| format!("create {}: {e}", debs.display()))?;
    if let Some(p) = find_deb(&debs)? {
        return Ok(p);
    }
    println!("rootfs: downloading {BUSYBOX_PACKAGE} with apt-get");
    let download = || {
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", BUSYBOX_PACKAGE])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !download() {
        println!("rootfs: apt-get download failed; running apt-get update");
        let ok = Command::new("apt-get")
            .arg("update")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok || !download() {
            return Err(format!(
                "cannot download {BUSYBOX_PACKAGE} with apt-get (is this Debian?)"
            ));
        }
    }
    find_deb(&debs)?.ok_or_else(|| {
        format!(
            "apt-get left no {BUSYBOX_PACKAGE} .deb in {}",
            debs.display()
        )
    })
}

/// The newest-named busybox-static .deb in `dir`, if any.
fn find_deb(dir: &Path) -> Result<Option<PathBuf>, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("{BUSYBOX_PACKAGE}_")) && n.ends_with(".deb")
            })
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

/// Unpacks the .deb (dpkg-deb -x) and returns the busybox binary's path.
fn extract_busybox(deb: &Path, key: &str) -> Result<PathBuf, String> {
    let dir = cache_dir().join("rootfs").join("unpacked").join(key);
    let bin = dir.join("bin").join("busybox");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(&dir)
        .status()
        .map_err(|e| format!("run dpkg-deb: {e}"))?;
    if !status.success() || !bin.exists() {
        return Err(format!("dpkg-deb -x {} gave no bin/busybox", deb.display()));
    }
    Ok(bin)
}

/// Applet paths from `busybox --list-full` (run on the host).
fn list_applets(busybox: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| format!("run {} --list-full: {e}", busybox.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list-full failed ({})",
            busybox.display(),
            out.status
        ));
    }
    let text = String::from_utf8(out.stdout)
        .map_err(|_| "busybox --list-full printed non-UTF-8".to_string())?;
    let applets = parse_applet_list(&text);
    if applets.len() < 50 {
        return Err(format!(
            "busybox --list-full listed only {} applets",
            applets.len()
        ));
    }
    Ok(applets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_check_reads_program_headers() {
        let dynamic = std::fs::read("/bin/sh").unwrap();
        assert!(check_static(&dynamic).is_err());
        assert!(check_static(b"not an elf").is_err());
        let mut truncated = dynamic[..64].to_vec();
        truncated[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check_static(&truncated).is_err());
    }
}
