//! Port forwarding against a real guest: busybox `httpd` and `nc` in the
//! machine, reached from the host through `MachineConfig.ports` (a host
//! listener, vsock, the agent's connection to the guest port).
//!
//! One machine (a warm create of the suite's shape) serves every check;
//! the lifecycle checks (fork, stop and start, delete) come last, in that
//! order. The one boot of the kernel is the start after the stop.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{sh, sha256, CheckResult, Checks, Ctx};
use smol::{ConnectOptions, Error, Machine, MachineConfig, PortMapping, PortSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The guest ports: busybox httpd, an `nc` echo server, and one where
/// nothing listens.
const HTTP: u16 = 8080;
const ECHO: u16 = 9001;
const CLOSED: u16 = 9999;
/// Longest wait for a forwarded connection's answer (an exec-like round
/// trip through the guest, seconds on kvm_pvm hosts).
const IO_LIMIT: Duration = Duration::from_secs(120);

/// Starts the guest's servers (again after a boot: they are processes).
async fn serve(m: &Machine) -> CheckResult {
    sh(
        m,
        &format!(
            "(setsid httpd -f -p 127.0.0.1:{HTTP} -h /www </dev/null >/dev/null 2>&1 &); \
             (setsid nc -ll -p {ECHO} -e cat </dev/null >/dev/null 2>&1 &); \
             for i in $(seq 50); do netstat -ltn | grep -q ':{ECHO} ' && netstat -ltn | grep -q ':{HTTP} ' && exit 0; sleep 0.1; done; \
             netstat -ltn; exit 1"
        ),
    )
    .await
    .map(drop)
}

/// The host address that relays to `guest`.
async fn host_of(m: &Machine, guest: u16) -> Result<SocketAddr, String> {
    let ports = m.ports().await.ctx("ports")?;
    ports
        .iter()
        .find(|p| p.guest == guest)
        .map(PortMapping::host_addr)
        .ok_or_else(|| {
            format!(
                "{} has no mapping to guest port {guest}: {ports:?}",
                m.name()
            )
        })
}

/// `GET path` over HTTP/1.0: the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> Result<(String, Vec<u8>), String> {
    let exchange = async {
        let mut c = TcpStream::connect(addr).await.ctx("connect")?;
        c.write_all(format!("GET {path} HTTP/1.0\r\nHost: smol\r\n\r\n").as_bytes())
            .await
            .ctx("send")?;
        let mut all = Vec::new();
        c.read_to_end(&mut all).await.ctx("read")?;
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no HTTP header in {} bytes", all.len()))?;
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let status = head.lines().next().unwrap_or_default().to_string();
        Ok::<_, String>((status, all[split + 4..].to_vec()))
    };
    tokio::time::timeout(IO_LIMIT, exchange)
        .await
        .map_err(|_| format!("GET {path} from {addr}: no answer within {IO_LIMIT:?}"))?
}

/// Sends `body`, half-closes, and reads until the end of stream.
async fn echo(addr: SocketAddr, body: &[u8]) -> Result<Vec<u8>, String> {
    let exchange = async {
        let mut c = TcpStream::connect(addr).await.ctx("connect")?;
        let (mut r, mut w) = c.split();
        let send = async {
            w.write_all(body).await.ctx("send")?;
            w.shutdown().await.ctx("half-close")
        };
        let mut back = Vec::new();
        let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
        sent?;
        got.ctx("read")?;
        Ok::<_, String>(back)
    };
    tokio::time::timeout(IO_LIMIT, exchange)
        .await
        .map_err(|_| format!("echo through {addr}: no end within {IO_LIMIT:?}"))?
}

/// No listener at `addr` (connections refused).
async fn refused(addr: SocketAddr) -> CheckResult {
    match TcpStream::connect(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("connecting to {addr}: {e} (expected a refusal)")),
        Ok(_) => Err(format!("{addr} still accepts connections")),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn forwarded_ports_reach_guest_services() {
    let home = tempfile::Builder::new()
        .prefix("smol-ports")
        .tempdir_in("/tmp")
        .unwrap();
    let _dog = common::watchdog("ports", &[home.path()], common::TEST_LIMIT);
    common::runtime().block_on(run(home.path()));
}

async fn run(home: &Path) {
    let o = ConnectOptions::local().home(home);
    let mut c = Checks::new("ports");
    c.watch(home);
    let fixed = free_port();
    // The suite's shape (one warm snapshot serves every guest test).
    let config = MachineConfig {
        ports: vec![
            PortSpec::new(fixed, HTTP),
            PortSpec::new(0, ECHO),
            PortSpec::new(0, CLOSED),
        ],
        ..MachineConfig::default()
            .disk_mb(256)
            .name("web")
            .forkable(true)
    };
    let t = Instant::now();
    let m = Machine::create_with(config.clone(), o.clone())
        .await
        .unwrap_or_else(|e| panic!("creating the machine failed:\n{e}"));
    report!("[ports] machine up in {:.2?}", t.elapsed());
    let page = b"<h1>hello from the guest</h1>\n";
    let big = common::random_bytes(1 << 20, 11);
    let set_up = async {
        sh(&m, "mkdir -p /www").await?;
        m.write_file("/www/index.html", page.to_vec(), None)
            .await
            .ctx("write index.html")?;
        m.write_file("/www/big.bin", big.clone(), None)
            .await
            .ctx("write big.bin")?;
        serve(&m).await
    };
    if let Err(e) = set_up.await {
        panic!("starting the guest's servers failed: {e}");
    }

    c.run("ports() lists the mappings, port 0 made real", async {
        let ports = m.ports().await.ctx("ports")?;
        ensure!(ports.len() == 3, "{ports:?}");
        ensure!(
            ports[0].host == fixed && ports[0].guest == HTTP,
            "{ports:?}"
        );
        ensure!(
            ports.iter().all(|p| p.host != 0 && p.address.is_loopback()),
            "{ports:?}"
        );
        let url = m.url().await.ctx("url")?;
        ensure!(url.is_none(), "a local machine's url is {url:?}");
        Ok(())
    })
    .await;

    c.run("busybox httpd in the guest serves the page", async {
        let (status, body) = get(host_of(&m, HTTP).await?, "/index.html").await?;
        ensure!(status.contains("200"), "status {status:?}");
        ensure!(body == page, "body {:?}", String::from_utf8_lossy(&body));
        Ok(())
    })
    .await;

    c.run("a 1 MiB body arrives intact", async {
        let (status, body) = get(host_of(&m, HTTP).await?, "/big.bin").await?;
        ensure!(status.contains("200"), "status {status:?}");
        ensure!(
            sha256(&body) == sha256(&big),
            "{} bytes, sha256 {} (want {} bytes, {})",
            body.len(),
            sha256(&body),
            big.len(),
            sha256(&big)
        );
        Ok(())
    })
    .await;

    c.run("16 concurrent connections each get their page", async {
        let addr = host_of(&m, HTTP).await?;
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..16 {
            all.spawn(async move { get(addr, "/index.html").await });
        }
        let mut n = 0;
        while let Some(r) = all.join_next().await {
            let (status, body) = r.ctx("join")??;
            ensure!(status.contains("200") && body == page, "{status:?}");
            n += 1;
        }
        ensure!(n == 16, "{n} answers");
        Ok(())
    })
    .await;

    c.run(
        "a half-close reaches the guest and the answer comes back",
        async {
            let body = common::random_bytes(256 * 1024, 12);
            let back = echo(host_of(&m, ECHO).await?, &body).await?;
            ensure!(
                back == body,
                "{} bytes back of {} (sha256 {} vs {})",
                back.len(),
                body.len(),
                sha256(&back),
                sha256(&body)
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "a guest port nobody listens on ends the connection cleanly",
        async {
            let addr = host_of(&m, CLOSED).await?;
            let mut s = TcpStream::connect(addr).await.ctx("connect")?;
            s.write_all(b"hello?").await.ctx("send")?;
            let mut buf = Vec::new();
            let n = tokio::time::timeout(IO_LIMIT, s.read_to_end(&mut buf))
                .await
                .map_err(|_| "the connection stayed open".to_string())?
                .ctx("an end of stream, not a reset")?;
            ensure!(n == 0, "{n} bytes from a closed guest port");
            Ok(())
        },
    )
    .await;

    c.run("a host port in use is a named error that leaves nothing", async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").ctx("bind")?;
        let port = taken.local_addr().ctx("addr")?.port();
        let other = MachineConfig {
            ports: vec![PortSpec::new(port, HTTP)],
            ..MachineConfig::default().disk_mb(256).name("clash")
        };
        let e = Machine::create_with(other, o.clone())
            .await
            .err()
            .ok_or("the create succeeded")?;
        ensure!(
            matches!(&e, Error::PortInUse { address } if address.ends_with(&format!(":{port}"))),
            "got {e}"
        );
        ensure!(
            !home.join("machines/clash").exists(),
            "the failed create left its directory"
        );
        Ok(())
    })
    .await;

    c.run(
        "a clone relays the same guest ports from its own host ports",
        async {
            let clone = m.fork("web-clone").await.ctx("fork")?;
            let theirs = m.ports().await.ctx("ports")?;
            let mine = clone.ports().await.ctx("clone ports")?;
            ensure!(mine.len() == 3, "{mine:?}");
            for (a, b) in theirs.iter().zip(&mine) {
                ensure!(
                    a.guest == b.guest && a.host != b.host,
                    "{theirs:?} / {mine:?}"
                );
            }
            // The clone's httpd is the golden's process, forked with it.
            let (status, body) = get(host_of(&clone, HTTP).await?, "/index.html").await?;
            ensure!(status.contains("200") && body == page, "{status:?}");
            let addrs: Vec<SocketAddr> = mine.iter().map(PortMapping::host_addr).collect();
            clone.delete().await.ctx("delete the clone")?;
            for a in addrs {
                refused(a).await?;
            }
            Ok(())
        },
    )
    .await;

    c.run(
        "stop closes the listeners and start opens them again",
        async {
            let http = host_of(&m, HTTP).await?;
            m.stop().await.ctx("stop")?;
            ensure!(
                m.ports().await.ctx("ports")?.is_empty(),
                "ports while stopped"
            );
            refused(http).await?;
            ensure!(
                !home.join("machines/web/ports.json").exists(),
                "the ports file outlived the stop"
            );
            m.start().await.ctx("start")?;
            let again = host_of(&m, HTTP).await?;
            ensure!(again.port() == fixed, "the fixed port became {again}");
            serve(&m).await?;
            let (status, body) = get(again, "/index.html").await?;
            ensure!(status.contains("200") && body == page, "{status:?}");
            Ok(())
        },
    )
    .await;

    c.run("delete closes the listeners", async {
        let addrs: Vec<SocketAddr> = m
            .ports()
            .await
            .ctx("ports")?
            .iter()
            .map(PortMapping::host_addr)
            .collect();
        ensure!(addrs.len() == 3, "{addrs:?}");
        m.delete().await.ctx("delete")?;
        for a in addrs {
            refused(a).await?;
        }
        Ok(())
    })
    .await;

    c.finish();
}
