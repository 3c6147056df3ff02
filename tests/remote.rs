//! The remote engine end to end: the real `smol serve` binary on 127.0.0.1
//! with two API keys, and the SDK's Machine API through
//! `ConnectOptions::cloud`: create, exec, a live stream, files both ways,
//! state, fork, an image pulled from a registry on 127.0.0.1 (with
//! progress) and run, key isolation, 401 for a missing or revoked key,
//! delete, and the server cleaning up its machines on SIGTERM.
//!
//! Its machine has the shape of the other guest tests (disk 256 MiB), so it
//! is restored from the suite's warm snapshot on the server.

#![cfg(feature = "cli")]

mod common;
mod support {
    pub mod images;
    pub mod registry;
    pub mod serve;
}

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Checks, Ctx};
use futures::StreamExt;
use smol::{ConnectOptions, Error, ExecEvent, ExecOptions, Machine, MachineConfig};
use support::serve::{key, serve, Server};

#[test]
fn the_machine_api_through_smol_serve() {
    let home = tempfile::Builder::new()
        .prefix("smol-remote")
        .tempdir_in("/tmp")
        .unwrap();
    let alice = key(home.path(), &["create", "alice"]);
    let bob = key(home.path(), &["create", "bob"]);
    let listed = key(home.path(), &["list"]);
    assert!(
        listed.contains("alice") && listed.contains("bob") && !listed.contains(&alice),
        "{listed}"
    );
    let (child, url) = serve(home.path(), "warn,smol::serve=info");
    let mut server = Server(Some(child));
    let rt = common::runtime();
    let registry = support::registry::Registry::start();
    let image = rt.block_on(async {
        registry
            .push("smol/busybox", "v1", &support::images::busybox_image())
            .await;
        registry.reference("smol/busybox", "v1")
    });
    rt.block_on(run(home.path(), &url, &alice, &bob, &image));

    // SIGTERM: the server stops and deletes its non-persistent machines.
    let mut child = server.0.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let begin = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(120),
            "smol serve did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "smol serve exited {status}");
    let left: Vec<_> = std::fs::read_dir(home.path().join("machines"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "machines left after shutdown: {left:?}");
}

/// Gives this many zero bytes, then fails.
struct FailingSource(usize);

impl tokio::io::AsyncRead for FailingSource {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.0 == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("disk on fire")));
        }
        let n = self.0.min(buf.remaining()).min(64 * 1024);
        buf.put_slice(&vec![0u8; n]);
        self.0 -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

async fn run(home: &Path, url: &str, alice: &str, bob: &str, image: &str) {
    let cloud = |k: &str| ConnectOptions::cloud(k).endpoint(url);
    let mut c = Checks::new("remote");

    c.run("no key or a wrong key is 401 Unauthorized", async {
        for k in ["", "smk_0000", "not-even-a-key"] {
            let e = Machine::connect_with("x", cloud(k)).await;
            ensure!(matches!(e, Err(Error::Unauthorized(_))), "key {k:?}: {e:?}");
        }
        Ok(())
    })
    .await;

    let t = Instant::now();
    let m = Machine::create_with(
        MachineConfig {
            ports: vec![smol::PortSpec::new(0, 7777)],
            ..MachineConfig::default()
                .name("r1")
                .disk_mb(256)
                .forkable(true)
        },
        cloud(alice),
    )
    .await
    .unwrap_or_else(|e| panic!("creating a machine through smol serve failed: {e}"));
    report!(
        "[remote] machine up through the server in {:.2?}",
        t.elapsed()
    );

    c.run("the remote machine's name is its id, and it runs", async {
        ensure!(m.name() == "r1", "{}", m.name());
        ensure!(m.dir().is_none(), "a remote machine has no local dir");
        let s = m.state().await.ctx("state")?;
        ensure!(s == smol::MachineState::Running, "{s}");
        Ok(())
    })
    .await;

    c.run("ports() lists the server's listener, which relays", async {
        let ports = m.ports().await.ctx("ports")?;
        ensure!(
            ports.len() == 1 && ports[0].guest == 7777 && ports[0].host != 0,
            "{ports:?}"
        );
        let r = m
            .exec([
                "sh",
                "-c",
                "(setsid nc -ll -p 7777 -e cat </dev/null >/dev/null 2>&1 &); \
                 for i in $(seq 50); do netstat -ltn | grep -q ':7777 ' && exit 0; sleep 0.1; done; exit 1",
            ])
            .await
            .ctx("start nc")?;
        ensure!(r.exit_code == 0, "{r:?}");
        // The server runs on this host: its listener is reachable here.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(ports[0].host_addr())
            .await
            .ctx("connect")?;
        s.write_all(b"through the server's port").await.ctx("send")?;
        s.shutdown().await.ctx("half-close")?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut back))
            .await
            .map_err(|_| "no answer".to_string())?
            .ctx("read")?;
        ensure!(back == b"through the server's port", "{back:?}");
        // url() is the same listener, at the host the client uses.
        let url = m.url().await.ctx("url")?;
        let want = format!("http://127.0.0.1:{}/", ports[0].host);
        ensure!(url.as_deref() == Some(want.as_str()), "{url:?}");
        let bad = Machine::create_with(
            MachineConfig {
                ports: vec![smol::PortSpec::new(0, 80).address("0.0.0.0".parse().unwrap())],
                ..MachineConfig::default().name("r-bad-port").disk_mb(256)
            },
            cloud(alice),
        )
        .await
        .err()
        .ok_or("a client chose the server's address")?;
        ensure!(
            matches!(&bad, Error::InvalidConfig { field: "ports", .. }),
            "{bad}"
        );
        // A client's paths would name the server's directories.
        let bad = Machine::create_with(
            MachineConfig::default()
                .name("r-bad-mount")
                .mount(smol::MountSpec::new("/tmp", "/data")),
            cloud(alice),
        )
        .await
        .err()
        .ok_or("a remote client shared a directory")?;
        ensure!(
            matches!(&bad, Error::InvalidConfig { field: "mounts", reason } if reason.contains("server's host")),
            "{bad}"
        );
        Ok(())
    })
    .await;

    c.run("exec returns output and exit code", async {
        let r = m
            .exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
            .await
            .ctx("exec")?;
        ensure!(r.exit_code == 3, "{r:?}");
        ensure!(
            r.stdout_lossy() == "out\n" && r.stderr_lossy() == "err\n",
            "{r:?}"
        );
        Ok(())
    })
    .await;

    c.run(
        "stdin goes through the remote engine; spawn there is Unsupported (issue 19)",
        async {
            let r = m
                .exec_with(["wc", "-c"], ExecOptions::default().stdin("abcd"))
                .await
                .ctx("wc -c")?;
            ensure!(r.stdout_lossy().trim() == "4", "{r:?}");
            let e = m.spawn(["cat"], ExecOptions::default()).await;
            ensure!(matches!(&e, Err(Error::Unsupported(_))), "{e:?}");
            let big = vec![b'x'; smol::api::MAX_REMOTE_STDIN + 1];
            let e = m
                .exec_with(["true"], ExecOptions::default().stdin(big))
                .await;
            ensure!(
                matches!(&e, Err(Error::InvalidArgument { what: "stdin", .. })),
                "{e:?}"
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "a missing program is the same named error as locally",
        async {
            let e = m.exec(["no-such-program"]).await;
            ensure!(matches!(e, Err(Error::Guest { .. })), "{e:?}");
            let e = m.exec(Vec::<String>::new()).await;
            ensure!(
                matches!(e, Err(Error::InvalidArgument { what: "argv", .. })),
                "{e:?}"
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "exec_stream is live: the first line before the program ends",
        async {
            let t = Instant::now();
            let mut s = m
                .exec_stream(["sh", "-c", "echo first; sleep 3; echo second"])
                .await
                .ctx("exec_stream")?;
            ensure!(s.pid() > 0, "pid {}", s.pid());
            let first = s.next().await.ok_or("no event")?.ctx("event")?;
            let at = t.elapsed();
            ensure!(first == ExecEvent::Stdout("first\n".into()), "{first:?}");
            let mut rest = Vec::new();
            while let Some(ev) = s.next().await {
                rest.push(ev.ctx("event")?);
            }
            let end = t.elapsed();
            ensure!(
                rest == vec![ExecEvent::Stdout("second\n".into()), ExecEvent::Exit(0)],
                "{rest:?}"
            );
            ensure!(
                end - at >= Duration::from_secs(2),
                "the first line came at {at:?}, the end at {end:?}: not live"
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "files go both ways, byte for byte, with their mode",
        async {
            let data = common::random_bytes(300 * 1024 + 7, 11);
            m.write_file("/root/remote.bin", data.clone(), Some(0o640))
                .await
                .ctx("write_file")?;
            let back = m.read_file("/root/remote.bin").await.ctx("read_file")?;
            ensure!(
                common::sha256(&back) == common::sha256(&data),
                "content differs"
            );
            let s = m.read_file_stream("/root/remote.bin").await.ctx("stream")?;
            ensure!(s.size() == data.len() as u64, "size {}", s.size());
            ensure!(s.mode() & 0o777 == 0o640, "mode {:o}", s.mode());
            let sum = m
                .exec(["sha256sum", "/root/remote.bin"])
                .await
                .ctx("sha256sum")?;
            ensure!(
                sum.stdout_lossy().starts_with(&common::sha256(&data)),
                "{sum:?}"
            );
            let e = m.read_file("/no/such/file").await;
            ensure!(
                matches!(&e, Err(Error::FileNotFound { path }) if path == "/no/such/file"),
                "{e:?}"
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "an upload whose source fails leaves no file on the server's machine",
        async {
            let e = m
                .write_file_from("/root/partial.bin", FailingSource(300 * 1024), None)
                .await;
            ensure!(matches!(e, Err(Error::Io { .. })), "{e:?}");
            let r = m
                .exec(["sh", "-c", "ls -a /root | grep partial || true"])
                .await
                .ctx("ls")?;
            ensure!(
                r.stdout_lossy().is_empty(),
                "left behind: {:?}",
                r.stdout_lossy()
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "fork: a running clone with the state of the fork, independent",
        async {
            m.exec(["sh", "-c", "echo before > /root/fork-state"])
                .await
                .ctx("set up")?;
            let clone = m.fork("r1-clone").await.ctx("fork")?;
            ensure!(clone.name() == "r1-clone", "{}", clone.name());
            let r = clone
                .exec(["cat", "/root/fork-state"])
                .await
                .ctx("exec in the clone")?;
            ensure!(r.stdout_lossy() == "before\n", "{r:?}");
            clone
                .exec(["sh", "-c", "echo clone > /root/fork-state"])
                .await
                .ctx("write in the clone")?;
            let r = m.exec(["cat", "/root/fork-state"]).await.ctx("exec")?;
            ensure!(
                r.stdout_lossy() == "before\n",
                "the golden saw the clone's write: {r:?}"
            );
            clone.delete().await.ctx("delete the clone")?;
            Ok(())
        },
    )
    .await;

    c.run(
        "an image pulled through the server, with progress, then run",
        async {
            let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = events.clone();
            let info = m
                .pull_image_with_progress(image, move |ev| sink.lock().unwrap().push(ev.clone()))
                .await
                .ctx("pull")?;
            let events = events.lock().unwrap().clone();
            ensure!(
                matches!(events.first(), Some(smol::PullEvent::Resolved { .. })),
                "{events:?}"
            );
            ensure!(
                events
                    .iter()
                    .any(|e| matches!(e, smol::PullEvent::LayerSent { .. })),
                "{events:?}"
            );
            let listed = m.list_images().await.ctx("list")?;
            ensure!(listed.iter().any(|i| i.digest == info.digest), "{listed:?}");
            let r = m
                .run(image, ["sh", "-c", "echo $GREETING; pwd"])
                .await
                .ctx("run")?;
            ensure!(
                r.stdout_lossy() == "hello from the image config\n/srv/app\n",
                "{r:?}"
            );
            let mut s = m
                .run_stream(&info.digest, ["echo", "streamed"])
                .await
                .ctx("run_stream")?;
            let first = s.next().await.ok_or("no event")?.ctx("event")?;
            ensure!(first == ExecEvent::Stdout("streamed\n".into()), "{first:?}");
            // The server's own files are not a remote client's to pull.
            let e = m.pull_image("oci-layout:/etc").await;
            ensure!(
                matches!(e, Err(Error::InvalidArgument { what: "image", .. })),
                "{e:?}"
            );
            Ok(())
        },
    )
    .await;

    c.run("another key does not see the machine (404)", async {
        let e = Machine::connect_with("r1", cloud(bob)).await;
        ensure!(matches!(e, Err(Error::NotFound { .. })), "{e:?}");
        let bobs = Machine::list_with(cloud(bob)).await.ctx("bob's list")?;
        ensure!(bobs.is_empty(), "bob sees {bobs:?}");
        let alices = Machine::list_with(cloud(alice)).await.ctx("alice's list")?;
        ensure!(
            alices
                .iter()
                .any(|i| i.name == "r1" && i.state == smol::MachineState::Running),
            "alice sees {alices:?}"
        );
        let again = Machine::connect_with("r1", cloud(alice))
            .await
            .ctx("connect with the owner's key")?;
        let r = again.exec(["echo", "again"]).await.ctx("exec")?;
        ensure!(r.stdout_lossy() == "again\n", "{r:?}");
        // A connected handle leaves the machine to its creator.
        drop(again);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = m.state().await.ctx("state after the drop")?;
        ensure!(s == smol::MachineState::Running, "{s}");
        Ok(())
    })
    .await;

    c.run("a revoked key is refused at once", async {
        key(home, &["revoke", "bob"]);
        let e = Machine::connect_with("r1", cloud(bob)).await;
        ensure!(matches!(e, Err(Error::Unauthorized(_))), "{e:?}");
        Ok(())
    })
    .await;

    c.run("delete removes the machine on the server", async {
        m.delete().await.ctx("delete")?;
        let e = Machine::connect_with("r1", cloud(alice)).await;
        ensure!(matches!(e, Err(Error::NotFound { .. })), "{e:?}");
        Ok(())
    })
    .await;

    c.run(
        "dropping the creating handle deletes a non-persistent machine",
        async {
            let d = Machine::create_with(
                MachineConfig::default().name("r3").disk_mb(256),
                cloud(alice),
            )
            .await
            .ctx("create")?;
            drop(d);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match Machine::connect_with("r3", cloud(alice)).await {
                    Err(Error::NotFound { .. }) => return Ok(()),
                    Ok(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    other => return Err(format!("r3 after its drop: {other:?}")),
                }
            }
        },
    )
    .await;

    c.run(
        "ttl_seconds: the server deletes the machine when it passes",
        async {
            let begin = Instant::now();
            let t = Machine::create_with(
                MachineConfig {
                    ttl_seconds: Some(4),
                    ..MachineConfig::default().name("r4").disk_mb(256)
                },
                cloud(alice),
            )
            .await
            .ctx("create")?;
            let r = t.exec(["true"]).await.ctx("exec before the ttl")?;
            ensure!(r.success(), "{r:?}");
            loop {
                match t.state().await {
                    Err(Error::NotFound { .. }) => break,
                    Ok(_) if begin.elapsed() < Duration::from_secs(60) => {
                        tokio::time::sleep(Duration::from_millis(250)).await
                    }
                    other => return Err(format!("r4 after {:?}: {other:?}", begin.elapsed())),
                }
            }
            let gone = begin.elapsed();
            ensure!(
                gone >= Duration::from_secs(3),
                "deleted after {gone:?}, before its ttl"
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "auto_stop_seconds: kept while a stream is open, stopped when idle",
        async {
            let a = Machine::create_with(
                MachineConfig {
                    auto_stop_seconds: Some(3),
                    ..MachineConfig::default().name("r5").disk_mb(256)
                },
                cloud(alice),
            )
            .await
            .ctx("create")?;
            // Open for twice the limit: no stop meanwhile.
            let mut s = a
                .exec_stream(["sh", "-c", "sleep 6; echo done"])
                .await
                .ctx("exec_stream")?;
            let mut out = Vec::new();
            while let Some(ev) = s.next().await {
                out.push(ev.ctx("event")?);
            }
            ensure!(
                out == vec![ExecEvent::Stdout("done\n".into()), ExecEvent::Exit(0)],
                "the stream was cut: {out:?}"
            );
            drop(s);
            let st = a.state().await.ctx("state")?;
            ensure!(
                st == smol::MachineState::Running,
                "right after the stream: {st}"
            );
            // No request at all for longer than the limit.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let st = a.state().await.ctx("state")?;
            ensure!(st == smol::MachineState::Stopped, "after 6 s idle: {st}");
            a.delete().await.ctx("delete")?;
            Ok(())
        },
    )
    .await;

    // A second machine, left to the server's shutdown to delete.
    let kept = Machine::create_with(
        MachineConfig::default().name("r2").disk_mb(256),
        cloud(alice),
    )
    .await;
    c.run("a second machine for the shutdown", async {
        let kept = kept.ctx("create")?;
        // Held past the drop of every handle: only the server deletes it.
        std::mem::forget(kept);
        Ok(())
    })
    .await;
    c.finish();
}
