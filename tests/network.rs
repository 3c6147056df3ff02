//! Outbound network against real guests: `resources.network` gives the
//! machine a virtio-net device whose host side is a real passt; the guest
//! is configured by DHCP and reaches a server this test runs on the host's
//! 127.0.0.1 as `host.smol.internal`. Without a network the same fetch
//! fails; an egress allow-list without the gateway drops it.
//!
//! The first machine of the network shape boots (once per host); the
//! others are warm creates, each with a passt of its own.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{Checks, Ctx};
use smol::{ConnectOptions, Machine, MachineConfig, ResourceSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY: &str = "hello from the host";

async fn sh(m: &Machine, script: &str) -> Result<(i64, String), String> {
    let r = m
        .exec(["sh", "-c", script])
        .await
        .ctx(&format!("exec on {}", m.name()))?;
    let out = format!("{}{}", r.stdout_lossy(), r.stderr_lossy());
    Ok((r.exit_code as i64, out.trim().to_string()))
}

/// An HTTP server on the host's 127.0.0.1 that answers every request
/// with [`BODY`]; its port.
async fn host_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

/// `wget` of the host server from the guest, with a deadline (busybox
/// wget's own `-T` crashes in Debian's build). A crash is reported as
/// such: a fetch that must fail must not pass by crashing.
fn fetch(port: u16) -> String {
    format!(
        "timeout 20 wget -q -O - http://host.smol.internal:{port}/; s=$?; \
         [ $s -ge 128 ] && [ $s -ne 143 ] && echo \"wget crashed ($s)\"; exit $s"
    )
}

/// A fetch that failed for a reason (not a crash of wget).
fn refused(code: i64, out: &str) -> bool {
    code != 0 && !out.contains(BODY) && !out.contains("crashed")
}

#[test]
fn a_guest_with_a_network_reaches_the_host() {
    if std::process::Command::new(std::env::var("SMOL_PASST").unwrap_or("passt".into()))
        .arg("--version")
        .output()
        .is_err()
    {
        report!("[network] SKIPPED: passt is not installed (cargo xtask test installs it)");
        return;
    }
    let home = tempfile::Builder::new()
        .prefix("smol-net")
        .tempdir_in("/tmp")
        .unwrap();
    let _dog = common::watchdog("network", &[home.path()], common::TEST_LIMIT);
    common::runtime().block_on(run(home.path()));
}

fn networked(name: &str, allow: Option<Vec<String>>) -> MachineConfig {
    MachineConfig {
        egress_allow: allow,
        resources: ResourceSpec {
            network: true,
            disk_mb: 256,
            ..ResourceSpec::default()
        },
        ..MachineConfig::default().name(name).forkable(true)
    }
}

async fn run(home: &Path) {
    let o = ConnectOptions::local().home(home);
    let mut c = Checks::new("network");
    c.watch(home);
    let port = host_server().await;

    let t = Instant::now();
    let m = Machine::create_with(networked("net", None), o.clone())
        .await
        .unwrap_or_else(|e| panic!("creating the machine with a network failed:\n{e}"));
    report!("[network] machine with a network up in {:.2?}", t.elapsed());

    let mut gateway = String::new();
    c.run(
        "DHCP gave the guest an address, a route and host.smol.internal",
        async {
            let (code, out) = sh(&m, "ip -4 addr show; ip route; cat /etc/hosts").await?;
            ensure!(code == 0, "{out}");
            ensure!(
                out.contains("inet ") && out.contains("default via"),
                "{out}"
            );
            gateway = out
                .lines()
                .find(|l| l.ends_with("host.smol.internal"))
                .and_then(|l| l.split_whitespace().next())
                .ok_or_else(|| format!("no host.smol.internal in /etc/hosts: {out}"))?
                .to_string();
            ensure!(out.contains(&format!("default via {gateway}")), "{out}");
            Ok(())
        },
    )
    .await;

    c.run(
        "the guest fetches from the host's 127.0.0.1 through host.smol.internal",
        async {
            let (code, out) = sh(&m, &fetch(port)).await?;
            ensure!(code == 0 && out == BODY, "exit {code}: {out:?}");
            Ok(())
        },
    )
    .await;

    c.run(
        "a machine without a network has no device and cannot fetch",
        async {
            let plain = Machine::create_with(
                MachineConfig::default().disk_mb(256).name("offline"),
                o.clone(),
            )
            .await
            .ctx("create")?;
            let (_, ifaces) = sh(&plain, "ls /sys/class/net").await?;
            ensure!(ifaces == "lo", "interfaces {ifaces:?}");
            let (code, out) = sh(&plain, &fetch(port)).await?;
            ensure!(refused(code, &out), "exit {code}: {out:?}");
            ensure!(out.contains("bad address"), "not a name failure: {out:?}");
            plain.delete().await.ctx("delete")?;
            Ok(())
        },
    )
    .await;

    c.run(
        "an allow-list with the gateway lets the fetch through",
        async {
            ensure!(!gateway.is_empty(), "no gateway from the first check");
            let allowed = Machine::create_with(
                networked("allowed", Some(vec![format!("{gateway}/32")])),
                o.clone(),
            )
            .await
            .ctx("create")?;
            let (code, out) = sh(&allowed, &fetch(port)).await?;
            allowed.delete().await.ctx("delete")?;
            ensure!(code == 0 && out == BODY, "exit {code}: {out:?}");
            Ok(())
        },
    )
    .await;

    c.run("an allow-list without the gateway drops the fetch", async {
        // Documentation networks: one of them does not hold the gateway.
        let other = ["203.0.113.0/24", "198.51.100.0/24"]
            .into_iter()
            .find(|n| !gateway.starts_with(&n[..n.len() - 4]))
            .unwrap_or("203.0.113.0/24");
        let denied = Machine::create_with(networked("denied", Some(vec![other.into()])), o.clone())
            .await
            .ctx("create")?;
        // DHCP still works (it always passes), so the address is there.
        let (_, addr) = sh(&denied, "ip -4 addr show").await?;
        let (code, out) = sh(&denied, &fetch(port)).await?;
        denied.delete().await.ctx("delete")?;
        ensure!(addr.contains("inet "), "no address: {addr}");
        ensure!(refused(code, &out), "exit {code}: {out:?}");
        Ok(())
    })
    .await;

    c.run(
        "a fork gets its own passt and still reaches the host",
        async {
            let clone = m.fork("net-clone").await.ctx("fork")?;
            let (code, out) = sh(&clone, &fetch(port)).await?;
            let theirs = passts(home);
            clone.delete().await.ctx("delete the clone")?;
            ensure!(code == 0 && out == BODY, "exit {code}: {out:?}");
            ensure!(
                theirs == 2,
                "{theirs} passt processes for the machine and its clone"
            );
            Ok(())
        },
    )
    .await;

    c.run("delete ends the machine's passt", async {
        ensure!(passts(home) == 1, "{} passt processes", passts(home));
        m.delete().await.ctx("delete")?;
        let left = passts(home);
        ensure!(left == 0, "{left} passt processes left");
        Ok(())
    })
    .await;

    c.finish();
}

/// The passt processes of machines under `home` (their log is there).
fn passts(home: &Path) -> usize {
    let home = home.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let dir = e.path();
            // passt re-executes itself as `passt.avx2` where it can.
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.starts_with("passt"))
                && std::fs::read(dir.join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&home))
        })
        .count()
}
