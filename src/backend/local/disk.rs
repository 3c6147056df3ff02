//! The machine disk: a sparse raw file formatted ext4 on the host the first
//! time, attached as `/dev/vda`. The agent mounts it as the upper layer of
//! the guest root overlay, so whatever a user writes survives stop/start.
//! Before the first boot the host also links busybox's applets into that
//! upper layer (the initramfs links only `/bin/sh` and `/usr/bin/env`),
//! which costs the guest kernel nothing.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
/// Kernel command line telling the agent which device is the machine disk.
pub(crate) const DISK_CMDLINE: &str = "smol.disk=/dev/vda";
/// virtio-blk serial of the machine disk.
pub(crate) const DISK_ID: &str = "smol-root";

/// Longest applet list read (busybox's has ~270 lines of ~15 bytes).
const MAX_APPLET_LIST: u64 = 256 << 10;

/// Creates `path` (which must not exist) as a sparse file of `size_mb` MiB
/// and formats it ext4, with busybox's applets linked in the root overlay's
/// upper layer when the assets list them ([`link_applets`]). Removes the
/// file again if any of it fails.
pub(crate) async fn create_disk(path: &Path, size_mb: u64) -> Result<()> {
    let missing = |tool: &str| {
        Error::Disk {
        path: path.to_path_buf(),
        reason: format!("{tool} not found in PATH, /usr/sbin or /sbin (install e2fsprogs: apt-get install e2fsprogs)"),
    }
    };
    let mkfs = find_tool("mkfs.ext4").ok_or_else(|| missing("mkfs.ext4"))?;
    format_disk(&mkfs, path, size_mb).await?;
    if let Some(list) = super::assets::applet_list() {
        let mut unmade = RemoveOnDrop(Some(path.to_path_buf()));
        let debugfs = find_tool("debugfs").ok_or_else(|| missing("debugfs"))?;
        link_applets(&debugfs, path, &list).await?;
        unmade.0 = None;
    }
    Ok(())
}

/// Writes a link to `/bin/busybox` for every applet of `list` into
/// `upper/` of the fresh ext4 image `disk`, with debugfs on the host. The
/// guest's root overlay shows them in place (its lower layer, the
/// initramfs, links only a few), and the guest kernel spends nothing on
/// them: unpacking them from the initramfs cost it 9 s of a 41 s boot on
/// a kvm_pvm host, and making them in the guest is slower still.
async fn link_applets(debugfs: &Path, disk: &Path, list: &Path) -> Result<()> {
    let fail = |reason: String| Error::Disk {
        path: disk.to_path_buf(),
        reason,
    };
    let text = read_bounded(list, MAX_APPLET_LIST)
        .map_err(|e| fail(format!("reading the applet list {}: {e}", list.display())))?;
    let script =
        applet_script(&text).map_err(|e| fail(format!("applet list {}: {e}", list.display())))?;
    let script_path = disk.with_extension("applets.debugfs");
    std::fs::write(&script_path, script)
        .map_err(|e| Error::io(format!("writing {}", script_path.display()), e))?;
    let _script = RemoveOnDrop(Some(script_path.clone()));
    let out = tokio::process::Command::new(debugfs)
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(disk)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| fail(format!("running {}: {e}", debugfs.display())))?;
    // debugfs exits 0 even when a command fails; it says so on stderr,
    // after its version banner.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(fail(format!(
            "{} could not link the applets ({}): {}",
            debugfs.display(),
            out.status,
            complaints.join("; ")
        )));
    }
    Ok(())
}

/// The debugfs commands that make `upper/<path>` a link to `/bin/busybox`
/// for each line of `list`, with the directories they need. A line that
/// is not a plain relative `dir/name` path is refused by name.
fn applet_script(list: &str) -> std::result::Result<String, String> {
    let mut dirs: Vec<String> = vec!["upper".into()];
    let mut links = Vec::new();
    for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let plain = line.contains('/')
            && !line.starts_with('/')
            && line
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
            && line
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !plain {
            return Err(format!("bad applet path {line:?}"));
        }
        // A link there would replace the binary every link points to.
        if line == "bin/busybox" {
            return Err(format!("applet path {line:?} is busybox itself"));
        }
        let parts: Vec<&str> = line.split('/').collect();
        for depth in 1..parts.len() {
            let dir = format!("upper/{}", parts[..depth].join("/"));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        links.push(format!("symlink upper/{line} /bin/busybox"));
    }
    let mut script: Vec<String> = dirs.into_iter().map(|d| format!("mkdir {d}")).collect();
    script.extend(links);
    script.push(String::new());
    Ok(script.join("\n"))
}

/// The file at `path`, if it holds at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!("longer than {max} bytes")));
    }
    Ok(text)
}

async fn format_disk(mkfs: &Path, path: &Path, size_mb: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating disk {}", path.display()), e))?;
    file.set_len(size_mb * MIB).map_err(|e| {
        Error::io(
            format!("sizing disk {} to {size_mb} MiB", path.display()),
            e,
        )
    })?;
    drop(file);
    // A cancelled create (its future dropped) kills mkfs and removes the
    // file: nothing of it stays behind.
    let mut unmade = RemoveOnDrop(Some(path.to_path_buf()));
    let out = tokio::process::Command::new(mkfs)
        .args(["-F", "-q", "-m", "0", "-L", DISK_ID, "-E"])
        // The file is sparse, so its inode tables already read as zeroes:
        // telling mke2fs spares the guest kernel from zeroing them lazily
        // (slow where guest kernel code is emulated).
        .arg("lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let failure = match out {
        Ok(o) if o.status.success() => {
            unmade.0 = None;
            return Ok(());
        }
        Ok(o) => format!(
            "{} failed ({}): {}",
            mkfs.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("running {}: {e}", mkfs.display()),
    };
    drop(unmade);
    Err(Error::Disk {
        path: path.to_path_buf(),
        reason: failure,
    })
}

/// Removes a file when dropped, unless emptied first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// mkfs.ext4 and debugfs live in /usr/sbin, which is not in every user's
/// PATH.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The applets of a list become links in the disk's upper layer,
    /// owned by root, with their directories; the guest sees them through
    /// its root overlay.
    #[tokio::test]
    async fn links_the_applets_on_a_fresh_disk() {
        let (Some(mkfs), Some(debugfs)) = (find_tool("mkfs.ext4"), find_tool("debugfs")) else {
            panic!("mkfs.ext4 or debugfs is missing on this host: install e2fsprogs");
        };
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("disk.img");
        format_disk(&mkfs, &disk, 64).await.unwrap();
        let list = t.path().join("initramfs.applets");
        std::fs::write(&list, "bin/ls\nusr/bin/[\nusr/sbin/nc\n\n").unwrap();
        link_applets(&debugfs, &disk, &list).await.unwrap();
        let stat = |what: &str| {
            let out = std::process::Command::new(&debugfs)
                .arg("-R")
                .arg(format!("stat {what}"))
                .arg(&disk)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for link in ["upper/bin/ls", "upper/usr/bin/[", "upper/usr/sbin/nc"] {
            let s = stat(link);
            assert!(s.contains("Type: symlink"), "{link}: {s}");
            assert!(s.contains("\"/bin/busybox\""), "{link}: {s}");
            assert!(s.contains("User:     0   Group:     0"), "{link}: {s}");
        }
        let dir = stat("upper/usr/sbin");
        assert!(
            dir.contains("Type: directory") && dir.contains("Mode:  0755"),
            "{dir}"
        );
        // Only the disk is left beside the list.
        let mut names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["disk.img", "initramfs.applets"]);
    }

    #[test]
    fn applet_lists_with_odd_paths_are_refused_by_name() {
        let script = applet_script("bin/ls\nusr/bin/awk\n").unwrap();
        assert_eq!(
            script,
            "mkdir upper\nmkdir upper/bin\nmkdir upper/usr\nmkdir upper/usr/bin\n\
             symlink upper/bin/ls /bin/busybox\nsymlink upper/usr/bin/awk /bin/busybox\n"
        );
        for bad in [
            "/bin/ls",
            "ls",
            "bin/../../x",
            "bin//ls",
            "bin/l s",
            "bin/\"x",
            "bin/a\\b",
        ] {
            let e = applet_script(bad).unwrap_err();
            assert!(e.contains("bad applet path"), "{bad}: {e}");
        }
        let e = applet_script("bin/ls\nbin/busybox\n").unwrap_err();
        assert!(e.contains("busybox itself"), "{e}");
    }

    #[tokio::test]
    async fn creates_a_sparse_ext4_disk() {
        if find_tool("mkfs.ext4").is_none() {
            panic!("mkfs.ext4 is missing on this host: install e2fsprogs");
        }
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("disk.img");
        create_disk(&p, 64).await.unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 64 * MIB);
        assert!(
            m.blocks() * 512 < 16 * MIB,
            "not sparse: {} blocks",
            m.blocks()
        );
        // ext4 superblock magic 0xEF53 at offset 1024 + 0x38.
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);
        // An existing file is never overwritten.
        assert!(matches!(create_disk(&p, 64).await, Err(Error::Io { .. })));
    }

    /// Issue 15: a create cancelled while mkfs runs kills it and leaves no
    /// disk file. (A stand-in mkfs that sleeps, so that it is caught
    /// running; the real one takes milliseconds.)
    #[tokio::test]
    async fn a_cancelled_create_kills_mkfs_and_removes_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mkfs = t.path().join("slow-mkfs");
        let started = t.path().join("started");
        std::fs::write(
            &mkfs,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
                started.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&mkfs, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = t.path().join("cancelled.img");
        let mut fut = Box::pin(format_disk(&mkfs, &p, 64));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let pid: i32 = loop {
            tokio::select! {
                r = &mut fut => panic!("mkfs ended: {r:?}"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
            }
            if let Some(pid) = std::fs::read_to_string(&started)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(std::time::Instant::now() < deadline, "mkfs never ran");
        };
        assert!(p.exists());
        drop(fut);
        assert!(!p.exists(), "the disk file is removed");
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "mkfs {pid} still runs"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
