//! The agent binary as a real PID 1: started in fresh PID, mount, UTS and
//! network namespaces (so its mounts and its power-off stay inside them), it
//! must set the system up, print the ready line, adopt and stop orphans, and
//! on SIGTERM stop everything and "reboot" — which in a child PID namespace
//! ends the namespace with SIGHUP, the exact path the guest takes.
//!
//! Needs root and util-linux `unshare`/`nsenter`; skipped (with a message)
//! where namespaces cannot be created.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use smol_agent::protocol::READY_LINE;

fn child_pid_of(pid: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().ok();
        }
    }
    None
}

#[test]
fn agent_runs_as_pid1_and_powers_off_on_sigterm() {
    let probe = Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipping: cannot create PID and mount namespaces here");
        return;
    }
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--net",
            "--kill-child",
            env!("CARGO_BIN_EXE_smol-agent"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut lines = Vec::new();
    let wait_for = |lines: &mut Vec<String>, needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lines.iter().any(|l: &String| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("no {needle:?} line; got {lines:#?}"),
            }
        }
    };
    wait_for(&mut lines, READY_LINE);
    let agent = child_pid_of(child.id()).expect("the agent process");

    let mounts = std::fs::read_to_string(format!("/proc/{agent}/mounts")).unwrap();
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/tmp", "tmpfs"),
        ("/run", "tmpfs"),
    ] {
        let found = mounts.lines().any(|l| {
            let f: Vec<_> = l.split(' ').collect();
            f.get(1) == Some(&target) && f.get(2) == Some(&fstype)
        });
        assert!(found, "no {fstype} on {target} in\n{mounts}");
    }

    // An orphan in the guest: the agent adopts it, and must stop it.
    let orphan = Command::new("nsenter")
        .args([
            "-t",
            &agent.to_string(),
            "-p",
            "-m",
            "-u",
            "-n",
            "sh",
            "-c",
            "sleep 600 >/dev/null 2>&1 & echo $!",
        ])
        .output()
        .unwrap();
    assert!(orphan.status.success(), "{orphan:?}");

    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for(&mut lines, "powering off");
    let status = child.wait().unwrap();
    let took = t.elapsed();
    eprintln!("power-off took {took:?}");
    let order: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("smol-agent:"))
        .cloned()
        .collect();
    let pos = |s: &str| {
        order
            .iter()
            .position(|l| l.contains(s))
            .unwrap_or_else(|| panic!("no {s:?} in {order:#?}"))
    };
    assert!(pos(READY_LINE) < pos("SIGTERM received"));
    assert!(pos("SIGTERM received") < pos("stopping all processes"));
    assert!(pos("stopping all processes") < pos("powering off"));
    assert!(!lines.iter().any(|l| l.contains("panic")), "{lines:#?}");
    // reboot(2) in a child PID namespace ends it as if by SIGHUP.
    assert_eq!(
        status.signal().or(status.code().map(|c| c - 128)),
        Some(libc::SIGHUP),
        "{status:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "power-off took {took:?}"
    );
}
