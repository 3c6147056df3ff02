//! Fork, snapshot/restore and warm creates against real guests.
//!
//! One golden machine (a warm create, or the shape's one cold boot on a
//! host that has no warm snapshot yet) serves every check: clones of it,
//! a snapshot of it restored twice after a wait, and the errors for
//! snapshots that are missing, corrupt or refused. Each check is named in
//! the output; the timings of warm creates, forks and restores are printed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{sh, CheckResult, Checks, Ctx};
use futures::StreamExt;
use smol::{ConnectOptions, Error, ExecEvent, Machine, MachineConfig, SnapshotError};

fn opts(home: &Path) -> ConnectOptions {
    ConnectOptions::local().home(home)
}

fn host_unix_time() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The guest's clock is within a few seconds of the host's, and runs:
/// two readings a host-timed interval apart advance with the host's.
///
/// The guest reads its clock somewhere inside an exec's round trip, which
/// takes seconds here and longer on a loaded host, so each reading is
/// compared with the host's clock before and after that round trip, not
/// with one instant.
async fn clock_is_right(m: &Machine) -> CheckResult {
    /// A guest reading and the host's window around it.
    struct Reading {
        date: i64,
        uptime: f64,
        host: (i64, i64),
        at: (Instant, Instant),
    }
    let read = || async {
        let (host0, t0) = (host_unix_time(), Instant::now());
        let out = sh(m, "date +%s; cut -d' ' -f1 /proc/uptime").await?;
        let (host1, t1) = (host_unix_time(), Instant::now());
        let mut lines = out.lines();
        let date: i64 = lines
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("date {out:?}: {e}"))?;
        let uptime: f64 = lines
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("uptime {out:?}: {e}"))?;
        Ok::<_, String>(Reading {
            date,
            uptime,
            host: (host0, host1),
            at: (t0, t1),
        })
    };
    let first = read().await?;
    let (h0, h1) = first.host;
    ensure!(
        first.date >= h0 - 5 && first.date <= h1 + 5,
        "{}'s clock reads {}, the host's read {h0}..{h1} around it (guest uptime {} s)",
        m.name(),
        first.date,
        first.uptime
    );
    // A frozen guest clock (timers stopped) falls behind by the whole wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = read().await?;
    let advanced = second.uptime - first.uptime;
    let least = second.at.0.duration_since(first.at.1).as_secs_f64();
    let most = second.at.1.duration_since(first.at.0).as_secs_f64();
    ensure!(
        advanced.is_finite() && advanced >= least - 2.5 && advanced <= most + 2.5,
        "{}'s uptime went from {} to {} while {least:.2}..{most:.2} s passed on the host",
        m.name(),
        first.uptime,
        second.uptime
    );
    Ok(())
}

fn machine_dirs(home: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.join("machines"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn fork_snapshot_restore_and_warm_create() {
    // A short home: the vsock socket path must fit in sun_path.
    let home = tempfile::Builder::new()
        .prefix("smol-fork")
        .tempdir_in("/tmp")
        .unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let _dog = common::watchdog("fork", &[home.path()], common::TEST_LIMIT);
    common::runtime().block_on(run(home.path(), snaps.path()));
}

async fn run(home: &Path, snaps: &Path) {
    let o = opts(home);
    let mut c = Checks::new("fork");
    c.watch(home);
    // The disk size the other guest tests use: one machine shape, so one
    // warm snapshot serves the whole suite.
    let shape = MachineConfig::default().disk_mb(256);

    let t = Instant::now();
    let golden = Machine::create_with(shape.clone().name("golden").forkable(true), o.clone())
        .await
        .unwrap_or_else(|e| panic!("creating the golden machine failed:\n{e}"));
    let tm = golden
        .boot_timings()
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    report!(
        "[fork] golden up in {:.2?} ({}; agent answered {:.2?} after the vm started)",
        t.elapsed(),
        if tm.restored {
            "warm create from the shape's snapshot"
        } else {
            "cold boot: this host had no snapshot of the shape yet"
        },
        tm.agent_ready
    );

    // The state every copy must start from: tmpfs, disk, a process.
    let setup = sh(
        &golden,
        "echo tmpfs-at-fork > /tmp/state && echo disk-at-fork > /root/state && sync && \
         (setsid sleep 100000 </dev/null >/dev/null 2>&1 &) && sleep 0.2 && pidof sleep",
    )
    .await;
    let sleeper = match setup {
        Ok(pid) => pid,
        Err(e) => panic!("setting up the golden's state failed: {e}"),
    };

    c.run("a machine not created forkable refuses fork", async {
        let plain = Machine::restore_with(
            {
                let d = snaps.join("plain");
                golden.snapshot(&d).await.ctx("snapshot")?;
                d
            },
            MachineConfig::default().name("plain"),
            o.clone(),
        )
        .await
        .ctx("restore")?;
        let e = plain.fork("nope").await.err().ok_or("fork succeeded")?;
        ensure!(
            matches!(&e, Error::NotForkable { name } if name == "plain"),
            "got {e}"
        );
        ensure!(
            !home.join("machines/nope").exists(),
            "the refused fork left a directory"
        );
        plain.delete().await.ctx("delete")?;
        Ok(())
    })
    .await;

    let t = Instant::now();
    let c1 = golden.fork("clone-1").await;
    let fork_time = t.elapsed();
    let c2 = golden.fork("clone-2").await;
    let (c1, c2) = match (c1, c2) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!("fork failed: {:?} {:?}", a.err(), b.err()),
    };
    report!("[fork] fork until the clone's agent answered: {fork_time:.2?}");

    c.run("a clone starts identical: tmpfs, disk, processes", async {
        for m in [&c1, &c2] {
            let got = sh(m, "cat /tmp/state /root/state; pidof sleep").await?;
            ensure!(
                got == format!("tmpfs-at-fork\ndisk-at-fork\n{sleeper}"),
                "{} has {got:?}",
                m.name()
            );
        }
        Ok(())
    })
    .await;

    c.run(
        "a clone's writes reach neither the golden nor a sibling",
        async {
            sh(&c1, "echo c1 > /tmp/state && echo c1 > /root/state && sync").await?;
            for m in [&golden, &c2] {
                let got = sh(m, "cat /tmp/state /root/state").await?;
                ensure!(
                    got == "tmpfs-at-fork\ndisk-at-fork",
                    "{} sees {got:?}",
                    m.name()
                );
            }
            Ok(())
        },
    )
    .await;

    c.run("the golden's later writes reach no clone", async {
        sh(
            &golden,
            "echo golden-later > /tmp/state && echo golden-later > /root/state && sync",
        )
        .await?;
        let got = sh(&c2, "cat /tmp/state /root/state").await?;
        ensure!(got == "tmpfs-at-fork\ndisk-at-fork", "clone-2 sees {got:?}");
        let got = sh(&c1, "cat /tmp/state").await?;
        ensure!(got == "c1", "clone-1 sees {got:?}");
        Ok(())
    })
    .await;

    c.run("clones read different random bytes", async {
        let read = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
        let a = sh(&c1, read).await?;
        let b = sh(&c2, read).await?;
        ensure!(a.len() == 32 && a != b, "clone-1 {a:?}, clone-2 {b:?}");
        Ok(())
    })
    .await;

    c.run(
        "a clone's clock is the host's and its hostname its name",
        async {
            clock_is_right(&golden).await?;
            clock_is_right(&c1).await?;
            let h = sh(&c2, "hostname").await?;
            ensure!(h == "clone-2", "hostname {h:?}");
            Ok(())
        },
    )
    .await;

    c.run("files work on a clone", async {
        c1.write_file("/root/f.txt", "from the host", Some(0o600))
            .await
            .ctx("write_file")?;
        let back = c1.read_file("/root/f.txt").await.ctx("read_file")?;
        ensure!(&back[..] == b"from the host", "read back {back:?}");
        Ok(())
    })
    .await;

    c.run(
        "an exec in flight on the golden finishes across a fork",
        async {
            let mut s = golden
                .exec_stream(["sh", "-c", "sleep 2; echo done"])
                .await
                .ctx("exec_stream")?;
            let during = golden.fork("clone-3").await.ctx("fork during the exec")?;
            let mut out = Vec::new();
            let mut exit = None;
            while let Some(ev) = s.next().await {
                match ev.ctx("stream")? {
                    ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                    ExecEvent::Exit(code) => exit = Some(code),
                    _ => {}
                }
            }
            ensure!(
                exit == Some(0) && out == b"done\n",
                "exit {exit:?}, {out:?}"
            );
            // The clone's copy of that connection was reset; its agent serves.
            let got = sh(&during, "echo alive").await?;
            ensure!(got == "alive", "clone-3 answered {got:?}");
            during.delete().await.ctx("delete clone-3")?;
            Ok(())
        },
    )
    .await;

    c.run("four concurrent forks, and a fork of a clone", async {
        let t = Instant::now();
        let names: Vec<String> = (0..4).map(|i| format!("many-{i}")).collect();
        let forks = futures::future::join_all(names.iter().map(|n| golden.fork(n))).await;
        report!("[fork] four concurrent forks: {:.2?}", t.elapsed());
        let mut clones = Vec::new();
        for f in forks {
            clones.push(f.ctx("fork")?);
        }
        let grandchild = c1.fork("clone-1-1").await.ctx("fork of clone-1")?;
        clones.push(grandchild);
        for m in &clones {
            let got = sh(m, "cat /tmp/state; hostname").await?;
            let want_state = if m.name() == "clone-1-1" {
                "c1"
            } else {
                "golden-later"
            };
            ensure!(
                got == format!("{want_state}\n{}", m.name()),
                "{} has {got:?}",
                m.name()
            );
        }
        for m in clones {
            m.delete().await.ctx("delete")?;
        }
        Ok(())
    })
    .await;

    c.run("the golden keeps running", async {
        let got = sh(
            &golden,
            "cat /tmp/state; kill -0 $(pidof sleep) && echo sleeper",
        )
        .await?;
        ensure!(got == "golden-later\nsleeper", "golden has {got:?}");
        Ok(())
    })
    .await;

    let snap = snaps.join("round-trip");
    c.run("a snapshot restored 8 s later, twice", async {
        sh(&golden, "echo in-snapshot > /tmp/state").await?;
        golden.snapshot(&snap).await.ctx("snapshot")?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        for name in ["r1", "r2"] {
            let t = Instant::now();
            let r = Machine::restore_with(&snap, MachineConfig::default().name(name), o.clone())
                .await
                .ctx("restore")?;
            report!(
                "[fork] restore {name} until its agent answered: {:.2?}",
                t.elapsed()
            );
            let got = sh(&r, "cat /tmp/state; hostname").await?;
            ensure!(got == format!("in-snapshot\n{name}"), "{name} has {got:?}");
            clock_is_right(&r).await?;
            r.stop().await.ctx("stop")?;
            r.delete().await.ctx("delete")?;
        }
        Ok(())
    })
    .await;

    c.run(
        "missing and corrupt snapshots are named errors and leave nothing",
        async {
            let before = machine_dirs(home);
            let e = Machine::restore_with(snaps.join("none"), MachineConfig::default(), o.clone())
                .await
                .err()
                .ok_or("restoring nothing succeeded")?;
            ensure!(
                matches!(
                    &e,
                    Error::Snapshot {
                        source: SnapshotError::NotFound { .. },
                        ..
                    }
                ),
                "missing: {e}"
            );
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(snap.join("memory.bin"))
                .ctx("open memory.bin")?;
            f.set_len(1 << 20).ctx("truncate")?;
            let e = Machine::restore_with(&snap, MachineConfig::default(), o.clone())
                .await
                .err()
                .ok_or("restoring a truncated snapshot succeeded")?;
            ensure!(
                matches!(
                    &e,
                    Error::Snapshot {
                        source: SnapshotError::Corrupt { .. },
                        ..
                    }
                ),
                "truncated: {e}"
            );
            std::fs::write(snap.join("vm.json"), b"{\"version\": 1, \"vcp").ctx("corrupt")?;
            let e = Machine::restore_with(&snap, MachineConfig::default(), o.clone())
                .await
                .err()
                .ok_or("restoring a corrupt snapshot succeeded")?;
            ensure!(
                matches!(
                    &e,
                    Error::Snapshot {
                        source: SnapshotError::Corrupt { .. },
                        ..
                    }
                ),
                "corrupt: {e}"
            );
            // Nothing new (a machine a failed check before dropped may be
            // going meanwhile).
            let after = machine_dirs(home);
            let new: Vec<&String> = after.iter().filter(|d| !before.contains(d)).collect();
            ensure!(
                new.is_empty(),
                "left behind: {new:?} (machines before {before:?})"
            );
            Ok(())
        },
    )
    .await;

    c.run("a clone stops and deletes like any machine", async {
        c2.stop().await.ctx("stop")?;
        let dir = c2.dir().expect("a local machine").to_path_buf();
        c2.delete().await.ctx("delete")?;
        ensure!(!dir.exists(), "{} remains", dir.display());
        Ok(())
    })
    .await;

    let t = Instant::now();
    let warm = Machine::create_with(shape.clone().name("warm"), o.clone()).await;
    c.run("a second create of the shape is warm", async {
        let warm = warm.ctx("create")?;
        let tm = warm
            .boot_timings()
            .await
            .ctx("timings")?
            .ok_or("no timings")?;
        report!(
            "[fork] warm create until the agent answered: {:.2?} (agent {:.2?})",
            t.elapsed(),
            tm.agent_ready
        );
        ensure!(tm.restored, "it booted: {tm:?}");
        let h = sh(&warm, "hostname; cat /tmp/state 2>/dev/null || echo fresh").await?;
        ensure!(h == "warm\nfresh", "the warm machine has {h:?}");
        clock_is_right(&warm).await?;
        warm.delete().await.ctx("delete")?;
        Ok(())
    })
    .await;

    c.run("concurrent first creates of a new shape boot once", async {
        // A shape no other test uses (disk 300 MiB); on a host whose warm
        // cache has it already there is nothing to race, and it says so.
        let shape = MachineConfig::default().disk_mb(300);
        let (a, b) = futures::future::join(
            Machine::create_with(shape.clone().name("race-a"), o.clone()),
            Machine::create_with(shape.clone().name("race-b"), o.clone()),
        )
        .await;
        let (a, b) = (a.ctx("create race-a")?, b.ctx("create race-b")?);
        let mut booted = 0;
        for m in [&a, &b] {
            let tm = m.boot_timings().await.ctx("timings")?.ok_or("no timings")?;
            booted += usize::from(!tm.restored);
            let h = sh(m, "hostname").await?;
            ensure!(h == m.name(), "{} has hostname {h:?}", m.name());
        }
        ensure!(booted <= 1, "both creates of the new shape booted");
        report!(
            "[fork] concurrent creates of a new shape: {booted} booted{}",
            if booted == 0 {
                " (the shape was warm already on this host)"
            } else {
                ", the other restored its snapshot"
            }
        );
        a.delete().await.ctx("delete")?;
        b.delete().await.ctx("delete")?;
        Ok(())
    })
    .await;

    c1.delete().await.ok();
    golden.delete().await.ok();
    c.run("nothing of any machine is left", async {
        let left = machine_dirs(home);
        ensure!(left.is_empty(), "left: {left:?}");
        Ok(())
    })
    .await;
    c.finish();
}
