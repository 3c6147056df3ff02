//! What PID 1 does to the system: the early mounts, the hostname, the
//! loopback interface, and the clean power-off.

use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::log;
use crate::reaper::Reaper;

/// `PATH` for the agent and everything it starts.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables of the agent's own environment (set by the monitor on the
/// kernel command line) that every program it starts inherits.
///
/// `GLIBC_TUNABLES`: on kvm_pvm hosts the guest kernel runs with `noxsave`
/// and saves only SSE state at a task switch, while user space, which runs
/// on the real CPU, is told AVX is usable. The monitor then sets tunables
/// that keep glibc's string functions off AVX, and they must reach every
/// glibc program, not only the agent.
pub const INHERITED_ENV: &[&str] = &["GLIBC_TUNABLES"];

/// The [`INHERITED_ENV`] variables the agent was started with.
pub fn inherited_env() -> Vec<(String, String)> {
    INHERITED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Returns the value of `key=` on a kernel command line.
pub fn cmdline_param(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// Whether `name` is usable as a hostname (RFC 1123 labels, at most 64 bytes).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

const EARLY_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "mode=0620,ptmxmode=0666",
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
];

/// Mounted after the root is settled (the disk root brings its own /run).
const RUNTIME_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
];

/// Whether something is mounted exactly at `path`: one statx, which
/// reports a mount's root (STATX_ATTR_MOUNT_ROOT, Linux 5.8), rather than
/// a read of /proc/self/mounts that the guest kernel must generate (several
/// system calls, each ~0.4 ms on a kvm_pvm host). Older kernels fall back
/// to that read.
pub fn is_mountpoint(path: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: statx is plain data; zeroed is valid.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statx buffer the call fills.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            0,
            &mut st,
        )
    };
    if r != 0 {
        return false;
    }
    let root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if st.stx_attributes_mask & root != 0 {
        return st.stx_attributes & root != 0;
    }
    listed_in_mounts(path)
}

/// Whether `path` is a mount point per /proc/self/mounts.
fn listed_in_mounts(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1).map(unescape_mount_field).as_deref() == Some(path))
        })
        .unwrap_or(false)
}

fn mount_all(list: &[MountSpec]) {
    for m in list {
        if let Err(e) = std::fs::create_dir_all(m.target) {
            log(format_args!("cannot create {}: {e}", m.target));
            continue;
        }
        // /proc is mounted first, so later checks can see what is there.
        if m.target != "/proc" && is_mountpoint(m.target) {
            continue;
        }
        let data = (!m.data.is_empty()).then_some(m.data);
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => log(format_args!(
                "cannot mount {} on {}: {e}",
                m.fstype, m.target
            )),
        }
    }
}

/// Mounts /tmp and /run unless already there.
pub fn mount_runtime() {
    mount_all(RUNTIME_MOUNTS);
}

/// Mounts proc, sys, dev, dev/pts and dev/shm. Failures are logged and
/// skipped: a partly set-up guest is more useful than a dead one.
pub fn mount_early() {
    mount_all(EARLY_MOUNTS);
    // devtmpfs lacks the usual /dev/fd and std* links (shells use /dev/fd).
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(target, link) {
                log(format_args!("cannot link {link}: {e}"));
            }
        }
    }
}

/// Makes sure fds 0, 1 and 2 are open (the console, else /dev/null): the
/// kernel leaves them closed when it could not open /dev/console, and exec
/// relies on new pipes never landing on them.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        for path in [c"/dev/console", c"/dev/null"] {
            // SAFETY: open with a valid C string; the lowest free fd is `fd`,
            // since all below it are open. It is kept for the process' life.
            let got = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if got >= 0 {
                break;
            }
        }
    }
}

/// Sets the hostname from `smol.hostname=` on the command line, else from
/// /etc/hostname.
pub fn set_hostname(cmdline: &str) {
    let name = cmdline_param(cmdline, "smol.hostname").or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|s| s.trim().to_string())
    });
    let Some(name) = name else { return };
    if !valid_hostname(&name) {
        log(format_args!("ignoring invalid hostname {name:?}"));
        return;
    }
    if let Err(e) = nix::unistd::sethostname(&name) {
        log(format_args!("cannot set hostname {name:?}: {e}"));
    }
}

/// Brings the loopback interface up (port forwarding connects to guest
/// services on 127.0.0.1). Absent networking is not an error.
pub fn loopback_up() {
    // SAFETY: plain socket syscall; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: valid fd and a properly initialised ifreq for both ioctls.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) != 0 {
                log(format_args!("cannot bring lo up: {}", Errno::last()));
            }
        }
        libc::close(fd);
    }
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mounts.
pub fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Filesystems whose data must reach the disk before power-off.
fn is_persistent_fs(fstype: &str) -> bool {
    matches!(
        fstype,
        "ext4" | "ext3" | "ext2" | "xfs" | "btrfs" | "vfat" | "overlay" | "fuse" | "virtiofs"
    )
}

/// Unmounts (or, when busy or the root, remounts read-only) every
/// disk-backed filesystem, innermost first.
pub fn unmount_persistent() {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let list: Vec<(String, String)> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let _src = f.next()?;
            let target = unescape_mount_field(f.next()?);
            let fstype = f.next()?.to_string();
            Some((target, fstype))
        })
        .collect();
    // The overlay root first: its read-only remount syncs its upper layer;
    // then the filesystems below it, innermost first.
    let is_overlay_root = |(t, f): &&(String, String)| t == "/" && f == "overlay";
    let overlay_root = list.iter().filter(is_overlay_root);
    let others = list.iter().rev().filter(|m| !is_overlay_root(m));
    for (target, fstype) in overlay_root.chain(others) {
        if !is_persistent_fs(fstype) {
            continue;
        }
        if target != "/" && umount2(target.as_str(), MntFlags::empty()).is_ok() {
            continue;
        }
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(
            None::<&str>,
            target.as_str(),
            None::<&str>,
            flags,
            None::<&str>,
        ) {
            log(format_args!("cannot remount {target} read-only: {e}"));
        }
    }
}

/// Stops every process, flushes and detaches the disks, and resets the
/// machine. Never returns.
///
/// The kernel runs with `reboot=k` and no ACPI: a restart goes out through
/// the i8042 reset port, which the monitor treats as the guest's power-off
/// (RB_POWER_OFF would only halt the CPU).
pub fn power_off() -> ! {
    log("stopping all processes");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if !Reaper::get().wait_no_children(Duration::from_secs(2)) {
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        Reaper::get().wait_no_children(Duration::from_secs(1));
    }
    nix::unistd::sync();
    unmount_persistent();
    nix::unistd::sync();
    log("powering off");
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log(format_args!("reboot failed: {e:?}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reads the kernel command line ("" when /proc is not there).
pub fn read_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statx answer agrees with /proc/self/mounts on this host.
    #[test]
    fn mount_points_by_statx() {
        for p in ["/", "/proc", "/sys", "/dev"] {
            assert_eq!(is_mountpoint(p), listed_in_mounts(p), "{p}");
        }
        assert!(is_mountpoint("/proc"));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(dir.path().to_str().unwrap()));
        assert!(!is_mountpoint("/nonexistent/smol"));
        assert!(!is_mountpoint("bad\0path"));
    }

    #[test]
    fn cmdline_params() {
        let c = "console=ttyS0 smol.hostname=box-1 rdinit=/init smol.disk=/dev/vda\n";
        assert_eq!(cmdline_param(c, "smol.hostname").as_deref(), Some("box-1"));
        assert_eq!(cmdline_param(c, "smol.disk").as_deref(), Some("/dev/vda"));
        assert_eq!(cmdline_param(c, "smol.host"), None);
        assert_eq!(cmdline_param(c, "console").as_deref(), Some("ttyS0"));
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("smol"));
        assert!(valid_hostname("a-b.c1"));
        for bad in ["", "-a", "a-", "a..b", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn mount_field_unescape() {
        assert_eq!(unescape_mount_field("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_field("/x\\"), "/x\\");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
    }
}
