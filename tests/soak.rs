//! Long runs leak nothing: create, exec, write and read a file, delete, many
//! times over, with this process's fds, threads and child processes, and
//! the entries under SMOL_HOME, the same before and after.
//!
//! 20 cycles here (`SMOL_SOAK_CYCLES` sets another count); `cargo xtask
//! soak` runs 200. Every machine is a warm create from the host's booted
//! snapshot of the shape (one boot per host, made by whichever test came
//! first), so a cycle costs a restore and a few agent calls.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Ctx;
use smol::{ConnectOptions, Machine, MachineConfig};

const DEFAULT_CYCLES: usize = 20;

/// What a leak would grow.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Census {
    fds: usize,
    threads: usize,
    children: usize,
    /// Files and directories under the home, at any depth.
    home_entries: usize,
}

fn count_tree(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let nested = match e.file_type() {
                Ok(t) if t.is_dir() => count_tree(&e.path()),
                _ => 0,
            };
            1 + nested
        })
        .sum()
}

fn census(home: &Path) -> Census {
    let (threads, fds) = common::threads_and_fds();
    Census {
        fds,
        threads,
        children: common::children().len(),
        home_entries: count_tree(home),
    }
}

/// The census once it has settled on `want` (idle runtime threads end
/// after 300 ms, helper processes are reaped asynchronously), or the last
/// one seen after `within`.
async fn settled(home: &Path, want: &Census, within: Duration) -> Census {
    let deadline = Instant::now() + within;
    loop {
        let now = census(home);
        if &now == want || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One cycle: a machine is created, runs a command, takes and gives back
/// a file, and is deleted; its directory is gone after.
async fn cycle(o: &ConnectOptions, home: &Path, i: usize) -> Result<(), String> {
    let name = format!("soak-{i}");
    let m = Machine::create_with(MachineConfig::default().disk_mb(256).name(&name), o.clone())
        .await
        .ctx("create")?;
    let checks = async {
        // The sleep needs the guest's timer interrupts, which a restore
        // once lost (then every sleep, DHCP and deadline in the guest
        // hangs while calls that need no timer still work).
        let n = i.to_string();
        let exec = m.exec(["sh", "-c", "sleep 0.1; echo cycle $0 on $(hostname)", &n]);
        let r = tokio::time::timeout(Duration::from_secs(60), exec)
            .await
            .map_err(|_| "a 0.1 s sleep in the guest did not end within 60 s".to_string())?
            .ctx("exec")?;
        let out = r.stdout_lossy();
        ensure!(
            r.exit_code == 0 && out.trim() == format!("cycle {i} on {name}"),
            "exec: exit {} {out:?} {:?}",
            r.exit_code,
            r.stderr_lossy()
        );
        let body = common::random_bytes(64 * 1024, i as u64 + 1);
        m.write_file("/tmp/soak", body.clone(), None)
            .await
            .ctx("write_file")?;
        let back = m.read_file("/tmp/soak").await.ctx("read_file")?;
        ensure!(back == body, "read_file gave {} other bytes", back.len());
        Ok(())
    }
    .await;
    let deleted = m.delete().await.ctx("delete");
    checks?;
    deleted?;
    ensure!(
        common::gone(&home.join("machines").join(&name)),
        "{name}'s directory is still there after delete"
    );
    Ok(())
}

#[test]
fn create_exec_delete_cycles_leave_nothing_behind() {
    let cycles = std::env::var("SMOL_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CYCLES);
    let home = tempfile::Builder::new()
        .prefix("smol-soak")
        .tempdir_in("/tmp")
        .unwrap();
    let limit = common::TEST_LIMIT.max(Duration::from_secs(30) * cycles as u32);
    let _dog = common::watchdog("soak", &[home.path()], limit);
    common::runtime().block_on(run(home.path(), cycles));
}

async fn run(home: &Path, cycles: usize) {
    let o = ConnectOptions::local().home(home);
    // A first cycle makes what stays for the process's lifetime (the
    // runtime's threads, the home's layout, the warm snapshot if this host
    // has none yet); the census starts after it.
    let t = Instant::now();
    if let Err(e) = cycle(&o, home, 0).await {
        panic!("the first cycle failed: {e}");
    }
    report!("[soak] first cycle in {:.2?}", t.elapsed());
    let before = settled(home, &census(home), Duration::from_secs(2)).await;
    report!("[soak] before: {before:?}");

    let t = Instant::now();
    let mut failures = Vec::new();
    for i in 1..=cycles {
        if let Err(e) = cycle(&o, home, i).await {
            report!("[soak] FAILED cycle {i}: {e}");
            failures.push(format!("cycle {i}: {e}"));
            if failures.len() >= 3 {
                break;
            }
        }
        if i % 10 == 0 {
            report!(
                "[soak] {i} cycles in {:.2?}: {:?}",
                t.elapsed(),
                census(home)
            );
        }
    }
    let per_cycle = t.elapsed() / cycles.max(1) as u32;
    let after = settled(home, &before, Duration::from_secs(10)).await;
    report!("[soak] {cycles} cycles, {per_cycle:.2?} each; after: {after:?}");
    assert!(
        failures.is_empty(),
        "failed cycles:\n  {}",
        failures.join("\n  ")
    );
    assert_eq!(
        after, before,
        "{cycles} create/exec/delete cycles left something behind"
    );
}
