//! The persistent root: with `smol.disk=<device>` on the kernel command line
//! (an ext4 disk the host formatted before the first boot), the guest root
//! becomes an overlay whose lower layer is the initramfs content and whose
//! upper layer lives on the disk, so whatever a user writes anywhere in the
//! machine (outside /tmp, /run, /dev, /proc, /sys) survives stop and start.
//!
//! Layout on the disk: `upper/` and `work/` (overlayfs); the disk itself
//! stays reachable at [`DISK_MOUNT`] in the new root. A fresh disk comes
//! from the host with busybox's applet links already in `upper/`.
//!
//! An initramfs root cannot be pivot_root'ed, so the switch is the
//! switch_root way: move the API mounts into the new root, move the new root
//! onto `/`, chroot into it.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount, MsFlags};

use crate::system::{cmdline_param, is_mountpoint};

/// Where the machine disk is mounted (before and after the switch).
pub const DISK_MOUNT: &str = "/run/smol/disk";
/// Where the overlay is assembled before it becomes `/`.
pub const NEW_ROOT: &str = "/run/smol/root";
/// How long to wait for the disk's device node.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("invalid smol.disk device {0:?} (expected /dev/<name>)")]
    BadDevice(String),
    #[error("disk {0} did not appear within {1:?}")]
    NoDevice(String, Duration),
    #[error("cannot create {path}")]
    Mkdir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: Errno,
    },
    #[error("cannot move the mount {from} to {to}")]
    Move {
        from: String,
        to: String,
        #[source]
        source: Errno,
    },
    #[error("cannot enter the new root")]
    Enter(#[source] Errno),
}

/// The device named by `smol.disk=`, checked.
pub fn disk_device(cmdline: &str) -> Option<Result<String, RootError>> {
    let dev = cmdline_param(cmdline, "smol.disk")?;
    let ok = dev.starts_with("/dev/")
        && dev.len() > 5
        && !dev.split('/').any(|c| c == "..")
        && !dev.contains(',');
    Some(if ok {
        Ok(dev)
    } else {
        Err(RootError::BadDevice(dev))
    })
}

/// overlayfs mount options (paths must not contain `,` `:` or `\`; ours
/// are fixed).
pub fn overlay_options(lower: &str, upper: &str, work: &str) -> String {
    format!("lowerdir={lower},upperdir={upper},workdir={work}")
}

fn mkdir(path: &str) -> Result<(), RootError> {
    std::fs::create_dir_all(path).map_err(|source| RootError::Mkdir {
        path: path.into(),
        source,
    })
}

fn move_mount(from: &str, to: &str) -> Result<(), RootError> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        RootError::Move {
            from: from.into(),
            to: to.into(),
            source,
        }
    })
}

/// Mounts `device` and switches the root to the overlay. On an error before
/// the point of no return everything is undone and the initramfs root stays.
pub fn switch_to_disk_root(device: &str) -> Result<(), RootError> {
    let start = Instant::now();
    while !Path::new(device).exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(RootError::NoDevice(device.into(), DEVICE_WAIT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    mkdir(DISK_MOUNT)?;
    mkdir(NEW_ROOT)?;
    mount(
        Some(device),
        DISK_MOUNT,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| RootError::Mount {
        what: format!("{device} (ext4)"),
        target: DISK_MOUNT.into(),
        source,
    })?;
    let upper = format!("{DISK_MOUNT}/upper");
    let work = format!("{DISK_MOUNT}/work");
    let prepared = mkdir(&upper).and_then(|()| mkdir(&work)).and_then(|()| {
        let opts = overlay_options("/", &upper, &work);
        mount(
            Some("overlay"),
            NEW_ROOT,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|source| RootError::Mount {
            what: "overlay".into(),
            target: NEW_ROOT.into(),
            source,
        })
    });
    if let Err(e) = prepared {
        let _ = umount(DISK_MOUNT);
        return Err(e);
    }

    // From here on the API mounts move: failures are reported, not undone.
    let present: Vec<&str> = ["/proc", "/sys", "/dev"]
        .into_iter()
        .filter(|p| is_mountpoint(p))
        .collect();
    for api in present {
        let to = format!("{NEW_ROOT}{api}");
        mkdir(&to)?;
        move_mount(api, &to)?;
    }
    let run = format!("{NEW_ROOT}/run");
    mkdir(&run)?;
    mount(
        Some("tmpfs"),
        run.as_str(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|source| RootError::Mount {
        what: "tmpfs".into(),
        target: run.clone(),
        source,
    })?;
    let disk_in_new = format!("{NEW_ROOT}{DISK_MOUNT}");
    mkdir(&disk_in_new)?;
    move_mount(DISK_MOUNT, &disk_in_new)?;

    nix::unistd::chdir(NEW_ROOT).map_err(RootError::Enter)?;
    move_mount(".", "/")?;
    nix::unistd::chroot(".").map_err(RootError::Enter)?;
    nix::unistd::chdir("/").map_err(RootError::Enter)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_from_cmdline() {
        assert!(disk_device("console=ttyS0").is_none());
        assert_eq!(
            disk_device("a smol.disk=/dev/vda b").unwrap().unwrap(),
            "/dev/vda"
        );
        for bad in [
            "vda",
            "/dev/",
            "/dev/../etc/x",
            "/dev/vda,upperdir=/x",
            "/tmp/x",
        ] {
            let c = format!("smol.disk={bad}");
            assert!(
                matches!(disk_device(&c), Some(Err(RootError::BadDevice(_)))),
                "{bad}"
            );
        }
    }

    #[test]
    fn overlay_options_text() {
        assert_eq!(
            overlay_options("/", "/run/smol/disk/upper", "/run/smol/disk/work"),
            "lowerdir=/,upperdir=/run/smol/disk/upper,workdir=/run/smol/disk/work"
        );
    }

    /// Env var naming the loop device for the inner half of the test below.
    const INNER_DEVICE: &str = "SMOL_ROOT_TEST_DEVICE";

    fn run(cmd: &str, args: &[&str]) -> Option<String> {
        let out = std::process::Command::new(cmd).args(args).output().ok()?;
        if !out.status.success() {
            eprintln!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The switch with a real ext4 disk (a loop device) and overlayfs, in a
    /// private mount namespace where `/` is a tmpfs standing in for the
    /// initramfs. Skipped where loop devices or namespaces are unavailable.
    #[test]
    fn switch_to_disk_root_on_a_loop_device() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let img_s = img.to_str().unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        if run("mkfs.ext4", &["-q", "-F", img_s]).is_none() {
            eprintln!("skipping: no mkfs.ext4");
            return;
        }
        let Some(dev) = run("losetup", &["--find", "--show", img_s]) else {
            eprintln!("skipping: no loop device");
            return;
        };
        let me = std::env::current_exe().unwrap();
        let inner = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private"])
            .arg(&me)
            .args([
                "--exact",
                "root::tests::switch_inner",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(INNER_DEVICE, &dev)
            .output();
        // Read what the guest wrote straight from the disk.
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mnt_s = mnt.to_str().unwrap();
        let mounted = run("mount", &[dev.as_str(), mnt_s]).is_some();
        let upper_file = std::fs::read_to_string(mnt.join("upper/etc/written")).ok();
        let work_dir = mnt.join("work").is_dir();
        if mounted {
            run("umount", &[mnt_s]);
        }
        run("losetup", &["-d", dev.as_str()]);
        let inner = inner.expect("run unshare");
        let text = String::from_utf8_lossy(&inner.stdout).into_owned()
            + &String::from_utf8_lossy(&inner.stderr);
        if text.contains("skipping:") {
            eprintln!("{text}");
            return;
        }
        assert!(
            inner.status.success() && text.contains("1 passed"),
            "inner test failed:\n{text}"
        );
        assert_eq!(upper_file.as_deref(), Some("persisted\n"));
        assert!(work_dir);
    }

    /// The inner half: runs in its own process and mount namespace.
    #[test]
    #[ignore = "run by switch_to_disk_root_on_a_loop_device"]
    fn switch_inner() {
        let Ok(dev) = std::env::var(INNER_DEVICE) else {
            return;
        };
        // A tmpfs "/" with an initramfs-like tree, /proc and the host /dev.
        let stage = "/tmp/smol-root-test-stage";
        std::fs::create_dir_all(stage).unwrap();
        mount(
            Some("tmpfs"),
            stage,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        for d in ["proc", "sys", "dev", "run", "etc", "tmp"] {
            std::fs::create_dir(format!("{stage}/{d}")).unwrap();
        }
        std::fs::write(format!("{stage}/etc/from-lower"), "lower\n").unwrap();
        mount(
            Some("/dev"),
            format!("{stage}/dev").as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        nix::unistd::chdir(stage).unwrap();
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).unwrap();
        nix::unistd::chroot(".").unwrap();
        nix::unistd::chdir("/").unwrap();
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();

        switch_to_disk_root(&dev).unwrap();

        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let has = |target: &str, fstype: &str| {
            mounts.lines().any(|l| {
                let f: Vec<_> = l.split(' ').collect();
                f.get(1) == Some(&target) && f.get(2) == Some(&fstype)
            })
        };
        assert!(has("/", "overlay"), "{mounts}");
        assert!(has(DISK_MOUNT, "ext4"), "{mounts}");
        assert!(has("/proc", "proc"), "{mounts}");
        assert!(has("/run", "tmpfs"), "{mounts}");
        assert!(Path::new("/dev/null").exists());
        // The lower layer shows through; writes land in the upper layer.
        assert_eq!(
            std::fs::read_to_string("/etc/from-lower").unwrap(),
            "lower\n"
        );
        std::fs::write("/etc/written", "persisted\n").unwrap();
        assert!(Path::new(&format!("{DISK_MOUNT}/upper/etc/written")).exists());
        // The power-off path leaves both read-only.
        nix::unistd::sync();
        smol_agent::system::unmount_persistent();
        let e = std::fs::write("/etc/late", "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        for l in mounts
            .lines()
            .filter(|l| l.contains(" ext4 ") || l.contains(" overlay "))
        {
            assert!(
                l.split(' ').nth(3).unwrap().split(',').any(|o| o == "ro"),
                "{l}"
            );
        }
    }
}
