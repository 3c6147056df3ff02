//! A machine's outbound network (`resources.network`): one `passt`
//! process per running machine, in its socket mode. The monitor's
//! virtio-net device and passt share a connected stream socket pair (the
//! frames carry a 4-byte big-endian length, qemu's stream framing): no
//! root, no tap device. passt answers the guest's DHCP, and maps the
//! gateway's address to the host's loopback (the guest's
//! `host.smol.internal`).
//!
//! passt runs in one-off mode: it ends when the monitor's end of the
//! socket closes, so it never outlives the machine's process, even one
//! killed with SIGKILL; [`Passt`]'s drop kills and reaps it at once.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// The program, found on PATH unless `SMOL_PASST` names it.
pub(crate) fn passt_program() -> PathBuf {
    std::env::var_os("SMOL_PASST")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("passt"))
}

/// The fd number passt is given its end of the socket pair on.
const PASST_FD: i32 = 3;
/// Largest passt log (its own `--log-size`).
const LOG_SIZE: u64 = 1 << 20;

/// A running passt, killed and reaped when dropped.
pub(crate) struct Passt {
    child: Child,
}

impl Passt {
    /// Starts passt for a machine; returns it and the monitor's end of
    /// the socket (for the virtio-net device). It logs to `log`.
    pub fn spawn(log: &Path) -> Result<(Passt, OwnedFd)> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| Error::io("making the socket pair for passt", e))?;
        let theirs_fd = theirs.as_raw_fd();
        let program = passt_program();
        let mut cmd = Command::new(&program);
        cmd.args(["--foreground", "--quiet", "--one-off"])
            .arg("--fd")
            .arg(PASST_FD.to_string())
            // Nothing inbound: ports are the SDK's own relay, over vsock.
            .args(["--tcp-ports", "none", "--udp-ports", "none"])
            // The device's frames are standard ones (its MTU feature says
            // 1500); passt would offer 65520 by DHCP and size frames so.
            .args(["--mtu", "1500"])
            .arg("--log-file")
            .arg(log)
            .arg("--log-size")
            .arg(LOG_SIZE.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (dup2, fcntl) on fds this process owns: `theirs` stays open in
        // the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if theirs_fd == PASST_FD {
                    // Already in place: only the close-on-exec flag goes.
                    if libc::fcntl(PASST_FD, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, PASST_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::Unsupported(format!(
                "outbound network (resources.network) needs passt, which is not installed \
                 (Debian: apt-get install passt; or set SMOL_PASST): {} not found",
                program.display()
            )),
            _ => Error::io(format!("starting {}", program.display()), e),
        })?;
        drop(theirs);
        Ok((Passt { child }, OwnedFd::from(ours)))
    }

    /// Whether passt has ended (it should not while the machine runs).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
