//! Finding the guest kernel and initramfs.
//!
//! `SMOL_KERNEL` / `SMOL_INITRAMFS` when set, else the assets that
//! `cargo xtask assets` publishes: `<cache>/assets/{vmlinux,initramfs.cpio}`
//! where `<cache>` is `SMOL_CACHE_DIR`, else `$XDG_CACHE_HOME/smol`, else
//! `~/.cache/smol` (the same rules as xtask's `cache_dir()`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The guest kernel and initramfs a machine boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestAssets {
    /// Looks the assets up and checks that both are regular files.
    pub fn locate() -> Result<Self> {
        Self::locate_with(&|k| std::env::var_os(k).filter(|v| !v.is_empty()))
    }

    fn locate_with(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Result<Self> {
        let dir = assets_dir(env);
        let kernel = pick(env, "SMOL_KERNEL", &dir, "vmlinux", "kernel")?;
        let initramfs = pick(env, "SMOL_INITRAMFS", &dir, "initramfs.cpio", "initramfs")?;
        Ok(GuestAssets { kernel, initramfs })
    }
}

/// The list of busybox applets beside the initramfs a machine boots
/// (`initramfs.applets` beside `initramfs.cpio`, as `cargo xtask assets`
/// publishes it), if there is one: the applets a fresh machine disk gets
/// links for (`disk::create_disk`). Without it the disk gets none; the
/// agent still finds every applet by name.
pub(crate) fn applet_list() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let initramfs = match env("SMOL_INITRAMFS") {
        Some(p) => PathBuf::from(p),
        None => assets_dir(&env).join("initramfs.cpio"),
    };
    let list = initramfs.with_extension("applets");
    list.is_file().then_some(list)
}

fn pick(
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    var: &str,
    dir: &Path,
    file: &str,
    what: &'static str,
) -> Result<PathBuf> {
    let (path, hint) = match env(var) {
        Some(p) => (PathBuf::from(p), format!("from {var}")),
        None => (
            dir.join(file),
            format!("run `cargo xtask assets` to build it, or set {var}"),
        ),
    };
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(Error::Asset {
            what,
            path,
            hint: format!("not a regular file; {hint}"),
        }),
        Err(_) => Err(Error::Asset { what, path, hint }),
    }
}

fn assets_dir(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    cache_dir_with(env).join("assets")
}

/// Where the monitor keeps the kernel and initramfs prepared for mapping,
/// so that a process's first boot maps them (`VmConfig::image_cache`).
pub(crate) fn image_cache_dir() -> PathBuf {
    cache_dir().join("boot-images")
}

/// smol's cache directory: `SMOL_CACHE_DIR`, else `$XDG_CACHE_HOME/smol`,
/// else `~/.cache/smol` (assets, warm snapshots).
pub(crate) fn cache_dir() -> PathBuf {
    cache_dir_with(&|k| std::env::var_os(k).filter(|v| !v.is_empty()))
}

fn cache_dir_with(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if let Some(d) = env("SMOL_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = env("XDG_CACHE_HOME") {
        PathBuf::from(d).join("smol")
    } else {
        home(env).join(".cache").join("smol")
    }
}

pub(crate) fn home(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    env("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        let map: HashMap<String, std::ffi::OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn cache_dir_rules() {
        let t = tempfile::tempdir().unwrap();
        let assets = t.path().join("c/assets");
        std::fs::create_dir_all(&assets).unwrap();
        std::fs::write(assets.join("vmlinux"), b"k").unwrap();
        std::fs::write(assets.join("initramfs.cpio"), b"i").unwrap();
        let cache = t.path().join("c");
        let a = GuestAssets::locate_with(&env_of(&[("SMOL_CACHE_DIR", &cache)])).unwrap();
        assert_eq!(a.kernel, assets.join("vmlinux"));
        let xdg = t.path().to_path_buf();
        std::fs::rename(t.path().join("c"), t.path().join("smol")).unwrap();
        let a = GuestAssets::locate_with(&env_of(&[("XDG_CACHE_HOME", &xdg)])).unwrap();
        assert_eq!(a.initramfs, t.path().join("smol/assets/initramfs.cpio"));
    }

    #[test]
    fn env_overrides_and_missing_asset_says_what_to_do() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("my-kernel");
        std::fs::write(&k, b"k").unwrap();
        let e = GuestAssets::locate_with(&env_of(&[
            ("SMOL_KERNEL", &k),
            ("SMOL_CACHE_DIR", t.path()),
        ]))
        .unwrap_err();
        // The kernel came from the env; the initramfs is missing from the cache.
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                Error::Asset {
                    what: "initramfs",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("cargo xtask assets"), "{msg}");
        let e = GuestAssets::locate_with(&env_of(&[("SMOL_KERNEL", t.path())])).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
