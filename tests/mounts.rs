//! Shares (`MachineConfig.mounts`) against real guests: each is a
//! virtio-fs device of the monitor whose back end is a real virtiofsd,
//! mounted by the agent.
//!
//! One machine with a writable and a read-only share serves most checks:
//! reads and writes both ways, a refused write, symlinks that point out of
//! the share, a snapshot refused while a guest process uses a share, then
//! a snapshot restored (with the same and with other directories), a fork,
//! a warm create with other targets, stop and start, delete. The
//! create-time errors come first, before any machine. Each virtiofsd is
//! counted in /proc by its socket under the test's home.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{eventually, sh, CheckResult, Checks, Ctx};
use smol::{ConnectOptions, Error, GuestErrorKind, Machine, MachineConfig, MountSpec};

const RW: &str = "/mnt/rw";
const RO: &str = "/mnt/ro";
const HELLO: &str = "hello from the host";
const SECRET: &str = "a host file outside every share";

/// The virtiofsd the SDK would use (the same lookup as the SDK's).
fn virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMOL_VIRTIOFSD").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("virtiofsd"))
        .chain([PathBuf::from("/usr/libexec/virtiofsd")])
        .find(|p| p.is_file())
}

#[test]
fn shares_reach_the_guest_and_stay_inside() {
    let Some(program) = virtiofsd() else {
        report!(
            "[mounts] SKIPPED: no virtiofsd (SMOL_VIRTIOFSD, PATH, /usr/libexec): \
             cargo xtask test installs it and sets SMOL_VIRTIOFSD"
        );
        return;
    };
    report!("[mounts] virtiofsd: {}", program.display());
    let home = tempfile::Builder::new()
        .prefix("smol-mounts")
        .tempdir_in("/tmp")
        .unwrap();
    let _dog = common::watchdog("mounts", &[home.path()], common::TEST_LIMIT);
    common::runtime().block_on(run(home.path()));
}

/// The sockets of the live virtiofsds of machines under `home` (each has
/// a sandbox child with the same command line; zombies have none).
fn virtiofsds(home: &Path) -> BTreeSet<String> {
    let home = home.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !args.first()?.ends_with("virtiofsd") {
                return None;
            }
            let at = args.iter().position(|a| a == "--socket-path")?;
            args.get(at + 1).filter(|s| s.contains(&home)).cloned()
        })
        .collect()
}

/// Waits until `n` virtiofsds run under `home` (a killed one's sandbox
/// child ends a moment after it).
async fn expect_virtiofsds(home: &Path, n: usize) -> CheckResult {
    let ok = eventually(Duration::from_secs(10), || virtiofsds(home).len() == n).await;
    ensure!(
        ok,
        "{n} virtiofsds expected, running: {:?}",
        virtiofsds(home)
    );
    Ok(())
}

/// The machine directories under `home`.
fn machine_dirs(home: &Path) -> BTreeSet<String> {
    std::fs::read_dir(home.join("machines"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// `script`'s exit code and its output (stdout and stderr).
async fn attempt(m: &Machine, script: &str) -> Result<(i32, String), String> {
    let r = m
        .exec(["sh", "-c", script])
        .await
        .ctx(&format!("exec on {}", m.name()))?;
    let out = format!("{}{}", r.stdout_lossy(), r.stderr_lossy());
    Ok((r.exit_code, out.trim().to_string()))
}

/// The guest reads `name` of the share at `target`, which the host wrote,
/// and a file the guest writes there lands in `host_dir`.
async fn share_works(m: &Machine, target: &str, host_dir: &Path, tag: &str) -> CheckResult {
    let content = format!("{tag} was here");
    std::fs::write(host_dir.join(format!("{tag}.host")), &content).ctx("host write")?;
    let read = sh(m, &format!("cat {target}/{tag}.host")).await?;
    ensure!(read == content, "{} read {read:?} from {target}", m.name());
    sh(
        m,
        &format!("echo '{content}' > {target}/{tag}.guest && sync"),
    )
    .await?;
    let back = std::fs::read_to_string(host_dir.join(format!("{tag}.guest"))).ctx("host read")?;
    ensure!(
        back.trim() == content,
        "the host read {back:?} of {}'s write",
        m.name()
    );
    Ok(())
}

fn config(name: &str, rw: &Path, ro: &Path) -> MachineConfig {
    MachineConfig::default()
        .name(name)
        .disk_mb(256)
        .forkable(true)
        .mount(MountSpec::new(rw, RW))
        .mount(MountSpec::new(ro, RO).read_only())
}

async fn run(home: &Path) {
    let o = ConnectOptions::local().home(home);
    let mut c = Checks::new("mounts");
    c.watch(home);
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("hello.txt"), HELLO).unwrap();
    std::fs::write(ro.path().join("kept.txt"), "read-only content").unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();

    c.run(
        "bad mounts are refused at create, leaving no directory and no virtiofsd",
        async {
            let file = rw.path().join("hello.txt");
            let missing = rw.path().join("no-such-dir");
            let with = |mounts: Vec<MountSpec>| MachineConfig {
                mounts,
                ..MachineConfig::default().name("bad").disk_mb(256)
            };
            let cases: Vec<(&str, MachineConfig)> = vec![
                (
                    "a missing source",
                    with(vec![MountSpec::new(&missing, "/data")]),
                ),
                (
                    "a file as source",
                    with(vec![MountSpec::new(&file, "/data")]),
                ),
                (
                    "a relative target",
                    with(vec![MountSpec::new(rw.path(), "data")]),
                ),
                (
                    "a target with ..",
                    with(vec![MountSpec::new(rw.path(), "/a/../etc")]),
                ),
                (
                    "a duplicate target",
                    with(vec![
                        MountSpec::new(rw.path(), "/data"),
                        MountSpec::new(ro.path(), "/data"),
                    ]),
                ),
                ("the root", with(vec![MountSpec::new(rw.path(), "/")])),
                ("/proc", with(vec![MountSpec::new(rw.path(), "/proc")])),
                (
                    "under /dev",
                    with(vec![MountSpec::new(rw.path(), "/dev/x")]),
                ),
                ("/tmp", with(vec![MountSpec::new(rw.path(), "/tmp")])),
            ];
            for (what, cfg) in cases {
                let e = Machine::create_with(cfg, o.clone())
                    .await
                    .err()
                    .ok_or_else(|| format!("{what} was accepted"))?;
                let named = match (what, &e) {
                    ("a missing source", Error::MountSource { path, .. }) => path == &missing,
                    ("a file as source", Error::MountSource { path, .. }) => path == &file,
                    (
                        _,
                        Error::InvalidConfig {
                            field: "mounts", ..
                        },
                    ) => true,
                    _ => false,
                };
                ensure!(named, "{what}: {e:?}");
                ensure!(
                    machine_dirs(home).is_empty(),
                    "{what} left {:?}",
                    machine_dirs(home)
                );
                expect_virtiofsds(home, 0).await?;
            }
            let e = Machine::create_with(with(vec![MountSpec::new(&missing, "/data")]), o.clone())
                .await
                .err()
                .ok_or("accepted")?;
            ensure!(
                e.to_string().contains(&missing.display().to_string()),
                "the error does not name the source: {e}"
            );
            Ok(())
        },
    )
    .await;

    let t = Instant::now();
    let m = Machine::create_with(config("shares", rw.path(), ro.path()), o.clone())
        .await
        .unwrap_or_else(|e| panic!("creating the machine with shares failed:\n{e}"));
    report!("[mounts] machine with two shares up in {:.2?}", t.elapsed());

    c.run(
        "both shares are mounted, the read-only one read-only",
        async {
            let table = sh(&m, "grep virtiofs /proc/mounts").await?;
            let line = |target: &str| {
                table
                    .lines()
                    .find(|l| l.split(' ').nth(1) == Some(target))
                    .map(str::to_string)
                    .ok_or_else(|| format!("no virtiofs at {target}: {table}"))
            };
            let (w, r) = (line(RW)?, line(RO)?);
            ensure!(w.contains(" rw,") && r.contains(" ro,"), "{table}");
            for l in [&w, &r] {
                ensure!(l.contains("nosuid") && l.contains("nodev"), "{l}");
            }
            expect_virtiofsds(home, 2).await
        },
    )
    .await;

    c.run("a host file is read in the guest", async {
        let read = sh(&m, &format!("cat {RW}/hello.txt")).await?;
        ensure!(read == HELLO, "{read:?}");
        let read = sh(&m, &format!("cat {RO}/kept.txt")).await?;
        ensure!(read == "read-only content", "{read:?}");
        Ok(())
    })
    .await;

    c.run(
        "guest writes land on the host, host writes reach the guest",
        async {
            sh(
                &m,
                &format!("mkdir -p {RW}/dir && echo from-guest > {RW}/dir/g.txt && sync"),
            )
            .await?;
            let back = std::fs::read_to_string(rw.path().join("dir/g.txt")).ctx("host read")?;
            ensure!(back == "from-guest\n", "{back:?}");
            share_works(&m, RW, rw.path(), "first").await
        },
    )
    .await;

    c.run(
        "the read-only share refuses guest writes (EROFS), the host directory is unchanged",
        async {
            let before = listing(ro.path());
            for script in [
                format!("echo x > {RO}/new.txt"),
                format!("echo x >> {RO}/kept.txt"),
                format!("mkdir {RO}/d"),
                format!("rm {RO}/kept.txt"),
            ] {
                let (code, out) = attempt(&m, &script).await?;
                ensure!(
                    code != 0 && out.contains("Read-only file system"),
                    "{script}: exit {code}: {out}"
                );
            }
            ensure!(listing(ro.path()) == before, "{:?}", listing(ro.path()));
            let kept = std::fs::read_to_string(ro.path().join("kept.txt")).ctx("read")?;
            ensure!(kept == "read-only content", "{kept:?}");
            Ok(())
        },
    )
    .await;

    c.run(
        "a host write to a file the guest has read is seen by the guest",
        async {
            let read = sh(&m, &format!("cat {RW}/hello.txt")).await?;
            ensure!(read == HELLO, "{read:?}");
            std::fs::write(rw.path().join("hello.txt"), "changed on the host").ctx("host write")?;
            // cache=auto: the guest revalidates within a second or so.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let now = sh(&m, &format!("cat {RW}/hello.txt")).await?;
                if now == "changed on the host" {
                    break;
                }
                ensure!(Instant::now() < deadline, "the guest still reads {now:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            std::fs::write(rw.path().join("hello.txt"), HELLO).ctx("host write")?;
            Ok(())
        },
    )
    .await;

    c.run(
        "files of random sizes have the same checksums on both sides; many files are listed",
        async {
            use rand::Rng;
            use sha2::{Digest, Sha256};
            let mut rng = rand::rng();
            // kvm_pvm emulates every guest kernel instruction: a FUSE
            // request costs milliseconds there, so the counts are smaller.
            let (files, listed_files) = if smol::is_kvm_pvm_host() {
                report!("[mounts] kvm_pvm host: 50 files summed and 250 listed instead of 200 and 1,000");
                (50, 250)
            } else {
                (200, 1000)
            };
            let host = rw.path().join("sums-host");
            std::fs::create_dir(&host).ctx("mkdir")?;
            for i in 0..files {
                let mut data = vec![0u8; rng.random_range(0..32 << 10)];
                rng.fill(&mut data[..]);
                std::fs::write(host.join(format!("f{i:03}")), data).ctx("host file")?;
            }
            let t = Instant::now();
            // The guest reads each file (its checksums) and writes each
            // back (a copy the host checks).
            let guest = sh(
                &m,
                &format!("cd {RW} && sha256sum sums-host/* && cp -r sums-host sums-guest && sync"),
            )
            .await?;
            report!(
                "[mounts] {files} files summed and copied in the guest in {:.2?}",
                t.elapsed()
            );
            let guest: BTreeSet<String> = guest
                .lines()
                .map(|l| l.replace("  sums-host/", "  "))
                .collect();
            for dir in ["sums-host", "sums-guest"] {
                let mut ours = BTreeSet::new();
                for e in std::fs::read_dir(rw.path().join(dir)).ctx("list")? {
                    let e = e.ctx("entry")?;
                    let data = std::fs::read(e.path()).ctx("read")?;
                    let sum = hex(&Sha256::digest(&data));
                    ours.insert(format!("{sum}  {}", e.file_name().to_string_lossy()));
                }
                ensure!(
                    ours.len() == files,
                    "{} files in {dir} on the host",
                    ours.len()
                );
                ensure!(
                    guest == ours,
                    "{dir}: guest only {:?}, host only {:?}",
                    guest.difference(&ours).take(3).collect::<Vec<_>>(),
                    ours.difference(&guest).take(3).collect::<Vec<_>>()
                );
            }
            let many = rw.path().join("many");
            std::fs::create_dir(&many).ctx("mkdir")?;
            for i in 0..listed_files {
                std::fs::write(many.join(format!("f{i:04}")), b"").ctx("touch")?;
            }
            let t = Instant::now();
            let listed = sh(&m, &format!("ls {RW}/many")).await?;
            report!("[mounts] {listed_files} files listed in {:.2?}", t.elapsed());
            let names: Vec<&str> = listed.lines().collect();
            let last = format!("f{:04}", listed_files - 1);
            ensure!(names.len() == listed_files, "{} files listed", names.len());
            ensure!(
                names.first() == Some(&"f0000") && names.last() == Some(&last.as_str()),
                "{:?}..{:?}",
                names.first(),
                names.last()
            );
            sh(
                &m,
                &format!("rm -rf {RW}/sums-host {RW}/sums-guest {RW}/many"),
            )
            .await?;
            ensure!(!many.exists(), "the guest's rm reached the host");
            Ok(())
        },
    )
    .await;

    c.run(
        "symlinks in the share to host files outside it expose nothing",
        async {
            let depth = "../".repeat(12);
            let relative = format!(
                "{depth}{}",
                secret.display().to_string().trim_start_matches('/')
            );
            std::os::unix::fs::symlink(&secret, rw.path().join("abs-link")).ctx("symlink")?;
            std::os::unix::fs::symlink(&relative, rw.path().join("rel-link")).ctx("symlink")?;
            std::os::unix::fs::symlink(outside.path(), rw.path().join("dir-link"))
                .ctx("symlink")?;
            for link in ["abs-link", "rel-link", "dir-link/secret"] {
                let (code, out) = attempt(&m, &format!("cat {RW}/{link}")).await?;
                ensure!(
                    code != 0 && !out.contains(SECRET),
                    "{link}: exit {code}: {out}"
                );
            }
            // The link itself is there: it is the guest that resolves it.
            let target = sh(&m, &format!("readlink {RW}/abs-link")).await?;
            ensure!(target == secret.display().to_string(), "{target}");
            let (code, out) = attempt(&m, &format!("ls {RW}/..; cat {RW}/../secret")).await?;
            ensure!(code != 0 && !out.contains(SECRET), "exit {code}: {out}");
            Ok(())
        },
    )
    .await;

    c.run(
        "a snapshot while a guest process uses a share is refused (InUse); the shares stay",
        async {
            let dir = tempfile::tempdir().ctx("tempdir")?;
            let snap = dir.path().join("busy");
            let pid = sh(
                &m,
                &format!(
                    "rm -f /tmp/busy.pid; \
                     (setsid sh -c 'cd {RW} && echo $$ > /tmp/busy.pid && exec sleep 600' \
                      </dev/null >/dev/null 2>&1 &); \
                     for i in $(seq 100); do [ -s /tmp/busy.pid ] && break; sleep 0.1; done; \
                     cat /tmp/busy.pid"
                ),
            )
            .await?;
            let e = m
                .snapshot(&snap)
                .await
                .err()
                .ok_or("a snapshot with a busy share was taken")?;
            let refused = matches!(
                &e,
                Error::Guest {
                    kind: GuestErrorKind::InUse,
                    message
                } if message.contains(RW)
            );
            sh(
                &m,
                &format!(
                    "kill {pid}; for i in $(seq 100); do \
                     readlink /proc/{pid}/cwd >/dev/null 2>&1 || exit 0; sleep 0.1; done; exit 1"
                ),
            )
            .await?;
            ensure!(refused, "{e:?}");
            ensure!(
                !snap.exists(),
                "the refused snapshot left {}",
                snap.display()
            );
            share_works(&m, RW, rw.path(), "after-busy").await?;
            let read = sh(&m, &format!("cat {RO}/kept.txt")).await?;
            ensure!(read == "read-only content", "{read:?}");
            Ok(())
        },
    )
    .await;

    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("shares");
    c.run(
        "after a snapshot the machine's shares work on; a restore mounts them anew",
        async {
            m.snapshot(&snap).await.ctx("snapshot")?;
            share_works(&m, RW, rw.path(), "after-snapshot").await?;
            let r =
                Machine::restore_with(&snap, MachineConfig::default().name("restored"), o.clone())
                    .await
                    .ctx("restore")?;
            share_works(&r, RW, rw.path(), "restored").await?;
            let read = sh(&r, &format!("cat {RO}/kept.txt")).await?;
            ensure!(read == "read-only content", "{read:?}");
            let (code, out) = attempt(&r, &format!("echo x > {RO}/new.txt")).await?;
            ensure!(code != 0 && out.contains("Read-only"), "exit {code}: {out}");
            expect_virtiofsds(home, 4).await?;
            r.delete().await.ctx("delete")?;
            expect_virtiofsds(home, 2).await
        },
    )
    .await;

    c.run(
        "a restore with mounts of its own shares those directories",
        async {
            let other_rw = tempfile::tempdir().ctx("tempdir")?;
            let other_ro = tempfile::tempdir().ctx("tempdir")?;
            std::fs::write(other_ro.path().join("other.txt"), "the other one").ctx("write")?;
            let cfg = MachineConfig {
                mounts: vec![
                    MountSpec::new(other_rw.path(), "/srv/rw"),
                    MountSpec::new(other_ro.path(), "/srv/ro").read_only(),
                ],
                ..MachineConfig::default().name("restored-other")
            };
            let r = Machine::restore_with(&snap, cfg, o.clone())
                .await
                .ctx("restore")?;
            share_works(&r, "/srv/rw", other_rw.path(), "other").await?;
            let read = sh(&r, "cat /srv/ro/other.txt").await?;
            ensure!(read == "the other one", "{read:?}");
            let (code, out) = attempt(&r, &format!("ls {RW}/hello.txt")).await?;
            ensure!(code != 0, "the snapshot's share is there too: {out}");
            r.delete().await.ctx("delete")?;

            // As many shares as the snapshot's devices, or none.
            let one = MachineConfig {
                mounts: vec![MountSpec::new(other_rw.path(), "/srv/rw")],
                ..MachineConfig::default().name("restored-one")
            };
            let e = Machine::restore_with(&snap, one, o.clone())
                .await
                .err()
                .ok_or("a restore with one share of two was accepted")?;
            ensure!(
                matches!(
                    e,
                    Error::InvalidConfig {
                        field: "mounts",
                        ..
                    }
                ),
                "{e:?}"
            );
            ensure!(
                !machine_dirs(home).contains("restored-one"),
                "{:?}",
                machine_dirs(home)
            );
            expect_virtiofsds(home, 2).await
        },
    )
    .await;

    c.run(
        "a fork shares the same directories through its own virtiofsds",
        async {
            let clone = m.fork("shares-clone").await.ctx("fork")?;
            share_works(&clone, RW, rw.path(), "clone").await?;
            let read = sh(&clone, &format!("cat {RW}/first.guest")).await?;
            ensure!(read == "first was here", "{read:?}");
            expect_virtiofsds(home, 4).await?;
            clone.delete().await.ctx("delete the clone")?;
            expect_virtiofsds(home, 2).await?;
            share_works(&m, RW, rw.path(), "after-fork").await
        },
    )
    .await;

    c.run(
        "a warm create of the shape with other targets has no trace of the golden's",
        async {
            let a = tempfile::tempdir().ctx("tempdir")?;
            let b = tempfile::tempdir().ctx("tempdir")?;
            let cfg = MachineConfig::default()
                .name("other-targets")
                .disk_mb(256)
                .mount(MountSpec::new(a.path(), "/data/a"))
                .mount(MountSpec::new(b.path(), "/data/b").read_only());
            let other = Machine::create_with(cfg, o.clone()).await.ctx("create")?;
            let timings = other.boot_timings().await.ctx("timings")?;
            share_works(&other, "/data/a", a.path(), "warm").await?;
            let (code, out) = attempt(&other, &format!("ls -d {RW} {RO}")).await?;
            other.delete().await.ctx("delete")?;
            ensure!(
                timings.is_some_and(|t| t.restored),
                "not a warm create: {timings:?}"
            );
            ensure!(code != 0, "the golden's targets are there: {out}");
            expect_virtiofsds(home, 2).await
        },
    )
    .await;

    c.run(
        "a create that fails after its virtiofsds started leaves none of them",
        async {
            let a = tempfile::tempdir().ctx("tempdir")?;
            let b = tempfile::tempdir().ctx("tempdir")?;
            // The image is looked for once the machine is up.
            let cfg = MachineConfig {
                image: Some(format!("oci-layout:{}:v1", a.path().join("none").display())),
                ..MachineConfig::default()
                    .name("bad-image")
                    .disk_mb(256)
                    .mount(MountSpec::new(a.path(), "/data/a"))
                    .mount(MountSpec::new(b.path(), "/data/b"))
            };
            let e = Machine::create_with(cfg, o.clone())
                .await
                .err()
                .ok_or("a create with a missing image succeeded")?;
            ensure!(matches!(e, Error::Image(_)), "{e:?}");
            ensure!(
                !machine_dirs(home).contains("bad-image"),
                "{:?}",
                machine_dirs(home)
            );
            expect_virtiofsds(home, 2).await
        },
    )
    .await;

    c.run(
        "stop ends the virtiofsds; start mounts the shares again",
        async {
            m.stop().await.ctx("stop")?;
            expect_virtiofsds(home, 0).await?;
            let dir = home.join("machines").join(m.name());
            let sockets: Vec<_> = std::fs::read_dir(&dir)
                .ctx("machine dir")?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("fs") && n.contains(".sock"))
                .collect();
            ensure!(sockets.is_empty(), "left in {}: {sockets:?}", dir.display());
            m.start().await.ctx("start")?;
            share_works(&m, RW, rw.path(), "after-start").await?;
            expect_virtiofsds(home, 2).await
        },
    )
    .await;

    c.run("delete ends the virtiofsds", async {
        m.delete().await.ctx("delete")?;
        expect_virtiofsds(home, 0).await?;
        ensure!(machine_dirs(home).is_empty(), "{:?}", machine_dirs(home));
        Ok(())
    })
    .await;

    c.finish();
}

/// Names and contents of the files in `dir` (not recursive).
fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
