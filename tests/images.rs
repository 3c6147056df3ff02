//! OCI images end to end against a real registry (Debian's docker-registry
//! on 127.0.0.1) and local sources, with images the suite builds itself.
//!
//! The host-side tests need no guest: pulls into the blob store, caching,
//! concurrent pulls, digest verification, named errors, oci-layout and
//! docker-save sources. `images_in_a_guest` boots one machine for many
//! checks (pull and run, whiteouts, image config, errors, local sources)
//! and a second one only to show that machines share the blob cache.

#[macro_use]
mod common;
mod support {
    pub mod images;
    pub mod registry;
}

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use smol::image::{BlobStore, Digest, ImageError, ImageResolver, PullEvent, PullStats};
use support::images::{self, busybox_image, entrypoint_image, TestImage};
use support::registry::Registry;

fn resolver(dir: &Path) -> ImageResolver {
    ImageResolver::new(BlobStore::open(dir.join("images")).expect("store"))
        .expect("resolver")
        .with_credentials(Default::default())
}

/// A progress callback that keeps the events.
fn recording() -> (
    std::sync::Arc<std::sync::Mutex<Vec<PullEvent>>>,
    smol::image::ProgressFn,
) {
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let f = std::sync::Arc::new(move |e: &PullEvent| sink.lock().unwrap().push(e.clone()));
    (events, f)
}

/// The events of one pull of an image with layers of `sizes`: `Resolved`
/// first with their count and total, one `LayerDone` per layer, and for
/// each fetched layer progress from 0 up to its size. Returns which layers
/// were cached.
fn check_pull_events(ev: &[PullEvent], sizes: &[u64]) -> Vec<bool> {
    match &ev[0] {
        PullEvent::Resolved { layers, bytes, .. } => {
            assert_eq!(
                (*layers, *bytes),
                (sizes.len(), sizes.iter().sum()),
                "{ev:?}"
            )
        }
        other => panic!("first event {other:?}"),
    }
    let mut cached = vec![None; sizes.len()];
    let mut progress: Vec<Vec<u64>> = vec![Vec::new(); sizes.len()];
    for e in &ev[1..] {
        match e {
            PullEvent::LayerProgress { index, done, total } => {
                assert_eq!(*total, sizes[*index], "{e:?}");
                assert!(cached[*index].is_none(), "progress after done: {ev:?}");
                progress[*index].push(*done);
            }
            PullEvent::LayerDone {
                index,
                size,
                cached: c,
                ..
            } => {
                assert_eq!(*size, sizes[*index], "{e:?}");
                assert!(cached[*index].replace(*c).is_none(), "done twice: {ev:?}");
            }
            other => panic!("unexpected {other:?} in {ev:?}"),
        }
    }
    let cached: Vec<bool> = cached
        .into_iter()
        .map(|c| c.expect("a LayerDone per layer"))
        .collect();
    for (i, p) in progress.iter().enumerate() {
        if cached[i] {
            assert!(p.is_empty(), "layer {i} cached but fetched: {ev:?}");
        } else {
            assert_eq!(p.first(), Some(&0), "layer {i} start: {ev:?}");
            assert_eq!(p.last(), Some(&sizes[i]), "layer {i} end: {ev:?}");
            assert!(p.windows(2).all(|w| w[0] < w[1]), "layer {i}: {p:?}");
        }
    }
    cached
}

fn tmp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("images/tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn pull_stores_verified_blobs_and_second_pull_fetches_nothing() {
    let reg = Registry::start();
    let img = busybox_image();
    reg.push("smol/busybox", "v1", &img).await;
    let home = tempfile::tempdir().unwrap();
    let (events, progress) = recording();
    let res = resolver(home.path()).with_progress(progress);
    let sizes: Vec<u64> = img.layers.iter().map(|l| l.blob.len() as u64).collect();

    let first = res
        .pull(&reg.reference("smol/busybox", "v1"))
        .await
        .expect("pull");
    assert_eq!(
        check_pull_events(&events.lock().unwrap(), &sizes),
        vec![false, false]
    );
    events.lock().unwrap().clear();
    assert_eq!(
        first.stats.blobs_fetched, 3,
        "config and two layers: {:?}",
        first.stats
    );
    assert_eq!(first.stats.manifests_fetched, 1);
    let i = &first.image;
    assert_eq!(i.digest.to_string(), img.digest());
    assert_eq!(i.reference, format!("{}/smol/busybox:v1", reg.addr));
    assert_eq!(
        i.layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect::<Vec<_>>(),
        img.layer_digests()
    );
    assert_eq!(i.config.working_dir.as_deref(), Some("/srv/app"));
    assert!(i
        .config
        .env
        .iter()
        .any(|e| e == "GREETING=hello from the image config"));
    assert_eq!(i.config.cmd, vec!["sh"]);
    assert_eq!(i.created.as_deref(), Some("2024-01-02T03:04:05Z"));
    let blob_bytes: u64 =
        img.layers.iter().map(|l| l.blob.len() as u64).sum::<u64>() + img.config.len() as u64;
    assert_eq!(i.size, blob_bytes);
    assert_eq!(first.stats.bytes_fetched, blob_bytes);
    let info = i.info();
    assert_eq!(
        (info.layers.len(), info.digest.as_str()),
        (2, img.digest().as_str())
    );
    for (d, bytes) in img.blobs() {
        let d = Digest::parse(&d).unwrap();
        assert_eq!(
            std::fs::read(res.store().path(&d)).unwrap(),
            bytes,
            "blob {d}"
        );
    }
    assert!(
        res.store().contains(&Digest::parse(&img.digest()).unwrap()),
        "manifest kept"
    );

    let mtime = |d: &str| {
        std::fs::metadata(res.store().path(&Digest::parse(d).unwrap()))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before: Vec<_> = img.layer_digests().iter().map(|d| mtime(d)).collect();
    let second = res
        .pull(&reg.reference("smol/busybox", "v1"))
        .await
        .expect("second pull");
    assert_eq!(
        second.stats,
        PullStats {
            blobs_fetched: 0,
            bytes_fetched: 0,
            blobs_cached: 3,
            manifests_fetched: 1
        }
    );
    assert_eq!(second.image, first.image);
    assert_eq!(
        check_pull_events(&events.lock().unwrap(), &sizes),
        vec![true, true]
    );
    let after: Vec<_> = img.layer_digests().iter().map(|d| mtime(d)).collect();
    assert_eq!(before, after, "blobs untouched");

    // By digest with everything cached: no request at all.
    let by_digest = format!("{}/smol/busybox@{}", reg.addr, img.digest());
    let third = res.pull(&by_digest).await.expect("pull by digest");
    assert_eq!(
        third.stats,
        PullStats {
            blobs_fetched: 0,
            bytes_fetched: 0,
            blobs_cached: 3,
            manifests_fetched: 0
        }
    );
    assert_eq!(third.image.digest, first.image.digest);
    assert_eq!(tmp_files(home.path()), 0);
}

#[tokio::test]
async fn concurrent_pulls_fetch_each_blob_once() {
    let reg = Registry::start();
    let img = busybox_image();
    reg.push("smol/busybox", "v1", &img).await;
    let home = tempfile::tempdir().unwrap();
    // Two resolvers over one store, as two machines' engines would be.
    let a = resolver(home.path());
    let b = resolver(home.path());
    let r = reg.reference("smol/busybox", "v1");
    let pulls = futures::future::join_all((0..6).map(|i| {
        let res = if i % 2 == 0 { &a } else { &b };
        let r = r.clone();
        async move { res.pull(&r).await }
    }))
    .await;
    let mut fetched = 0;
    for p in pulls {
        let p = p.expect("pull");
        assert_eq!(p.image.digest.to_string(), img.digest());
        fetched += p.stats.blobs_fetched;
    }
    assert_eq!(fetched, 3, "each of config and two layers fetched once");
}

#[tokio::test]
async fn an_index_resolves_to_linux_amd64() {
    let reg = Registry::start();
    let amd64 = busybox_image();
    let arm64 = TestImage::for_platform(
        serde_json::json!({"Cmd": ["sh"]}),
        images::busybox_layers(),
        "arm64",
    );
    reg.push("smol/multi", "amd64", &amd64).await;
    reg.push("smol/multi", "arm64", &arm64).await;
    reg.push_index(
        "smol/multi",
        "latest",
        &images::index(&[(&arm64, "arm64"), (&amd64, "amd64")]),
    )
    .await;
    reg.push_index(
        "smol/multi",
        "armonly",
        &images::index(&[(&arm64, "arm64")]),
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let res = resolver(home.path());
    let p = res
        .pull(&reg.reference("smol/multi", "latest"))
        .await
        .expect("pull index");
    assert_eq!(p.image.digest.to_string(), amd64.digest());
    assert_eq!(p.stats.manifests_fetched, 2, "index then manifest");
    match res.pull(&reg.reference("smol/multi", "armonly")).await {
        Err(ImageError::NoPlatform { found, .. }) => assert_eq!(found, "linux/arm64"),
        other => panic!("expected NoPlatform, got {other:?}"),
    }
    // A manifest straight to an arm64 config is refused too.
    assert!(matches!(
        res.pull(&reg.reference("smol/multi", "arm64")).await,
        Err(ImageError::NoPlatform { .. })
    ));
}

#[tokio::test]
async fn missing_tags_unknown_images_and_bad_references_are_named() {
    let reg = Registry::start();
    reg.push("smol/busybox", "v1", &busybox_image()).await;
    let home = tempfile::tempdir().unwrap();
    let res = resolver(home.path());

    let err = res
        .pull(&reg.reference("smol/busybox", "nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::TagNotFound { tag, .. } if tag == "nope"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("\"nope\"") && err.to_string().contains("smol/busybox"),
        "{err}"
    );

    let err = res
        .pull(&reg.reference("smol/nothing", "v1"))
        .await
        .unwrap_err();
    assert!(matches!(&err, ImageError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("smol/nothing"), "{err}");

    let err = res.pull("127.0.0.1:1/smol/busybox:v1").await.unwrap_err();
    assert!(
        matches!(&err, ImageError::Network { registry, .. } if registry == "127.0.0.1:1"),
        "{err:?}"
    );

    let err = res.pull("Not A Reference").await.unwrap_err();
    assert!(
        matches!(&err, ImageError::InvalidReference { reference, .. } if reference == "Not A Reference")
    );
    assert_eq!(tmp_files(home.path()), 0);
}

/// A server that answers every request with `status` and `body`.
fn refusing_registry(status: &'static str, body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[tokio::test]
async fn a_refusing_registry_gives_status_and_body() {
    let addr = refusing_registry("503 Service Unavailable", "down for maintenance");
    let home = tempfile::tempdir().unwrap();
    let err = resolver(home.path())
        .pull(&format!("{addr}/smol/x:1"))
        .await
        .unwrap_err();
    match &err {
        ImageError::Registry { status, body, .. } => {
            assert_eq!(*status, 503);
            assert!(body.contains("down for maintenance"), "{body}");
        }
        other => panic!("expected Registry, got {other:?}"),
    }
}

#[tokio::test]
async fn a_corrupted_blob_is_a_digest_mismatch_and_leaves_nothing() {
    let reg = Registry::start();
    let img = busybox_image();
    reg.push("smol/busybox", "v1", &img).await;
    // Flip bytes of the second layer inside the registry's storage.
    let d = &img.layer_digests()[1]["sha256:".len()..];
    let data = reg.storage().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{d}/data",
        &d[..2]
    ));
    let mut bytes = std::fs::read(&data).expect("registry blob");
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let home = tempfile::tempdir().unwrap();
    let res = resolver(home.path());
    let err = res
        .pull(&reg.reference("smol/busybox", "v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::DigestMismatch { expected, .. } if expected == &img.layer_digests()[1]),
        "{err:?}"
    );
    assert!(!res
        .store()
        .contains(&Digest::parse(&img.layer_digests()[1]).unwrap()));
    assert_eq!(tmp_files(home.path()), 0, "no partial blob left");
}

#[tokio::test]
async fn oci_layout_directories_are_a_source() {
    let home = tempfile::tempdir().unwrap();
    let layout = home.path().join("layout");
    let bb = busybox_image();
    let ep = entrypoint_image();
    images::write_oci_layout(&layout, &[("v1", &bb), ("ep", &ep)]);
    let res = resolver(home.path());

    let p = res
        .pull(&format!("oci-layout:{}:v1", layout.display()))
        .await
        .expect("layout pull");
    assert_eq!(p.image.digest.to_string(), bb.digest());
    assert_eq!(
        p.stats.blobs_fetched, 4,
        "manifest, config, two layers imported: {:?}",
        p.stats
    );
    assert_eq!(
        p.image.reference,
        format!("oci-layout:{}:v1", layout.display())
    );
    let p = res
        .pull(&format!("oci:{}:ep", layout.display()))
        .await
        .expect("layout pull ep");
    assert_eq!(p.image.config.entrypoint, vec!["/bin/sh", "-c"]);
    assert_eq!(p.image.config.user.as_deref(), Some("app"));
    assert_eq!(
        p.stats.blobs_fetched, 2,
        "only its manifest and config are new: {:?}",
        p.stats
    );

    let err = res
        .pull(&format!("oci-layout:{}:nope", layout.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::TagNotFound { .. }), "{err:?}");
    let err = res
        .pull(&format!("oci-layout:{}", layout.display()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("v1, ep"), "{err}");
    let single = home.path().join("single");
    images::write_oci_layout(&single, &[("only", &bb)]);
    let p = res
        .pull(&format!("oci-layout:{}", single.display()))
        .await
        .expect("the layout's one image, untagged");
    assert_eq!(p.image.digest.to_string(), bb.digest());
    // Issue 15: a bare path is not an image reference.
    let err = res.pull(single.to_str().unwrap()).await.unwrap_err();
    assert!(
        matches!(err, ImageError::InvalidReference { .. }),
        "{err:?}"
    );
    let err = res
        .pull(&format!("oci-layout:{}", home.path().display()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::LocalSource { .. }), "{err:?}");
}

#[tokio::test]
async fn docker_save_archives_are_a_source() {
    let home = tempfile::tempdir().unwrap();
    let archive = home.path().join("busybox.tar");
    let img = busybox_image();
    images::write_docker_archive(&archive, "smol/busybox:saved", &img);
    let res = resolver(home.path());

    let p = res
        .pull(&format!("docker-archive:{}", archive.display()))
        .await
        .expect("archive pull");
    let i = &p.image;
    assert_eq!(i.layers.len(), 2);
    // docker save layers are plain tars: their digests are the diff ids.
    let tars: Vec<String> = img.layers.iter().map(|l| images::sha256(&l.tar)).collect();
    assert_eq!(
        i.layers
            .iter()
            .map(|l| l.digest.to_string())
            .collect::<Vec<_>>(),
        tars
    );
    assert!(i
        .layers
        .iter()
        .all(|l| l.media_type == "application/vnd.oci.image.layer.v1.tar"));
    assert_eq!(i.config.working_dir.as_deref(), Some("/srv/app"));
    assert_eq!(i.config_digest.to_string(), images::sha256(&img.config));
    assert_eq!(p.stats.blobs_fetched, 2);

    let again = res
        .pull(&format!(
            "docker-archive:{}:smol/busybox:saved",
            archive.display()
        ))
        .await
        .expect("by tag");
    assert_eq!(
        again.image.digest, i.digest,
        "the synthesized manifest is stable"
    );
    assert_eq!(again.stats.blobs_fetched, 0);
    let err = res.pull(archive.to_str().unwrap()).await.unwrap_err();
    assert!(
        err.to_string().contains("docker-archive:<file>"),
        "a bare path is refused, naming the explicit form: {err}"
    );

    let err = res
        .pull(&format!("docker-archive:{}:other:tag", archive.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::TagNotFound { .. }), "{err:?}");
    let not_archive = home.path().join("junk.tar");
    std::fs::write(&not_archive, b"junk").unwrap();
    let err = res
        .pull(&format!("docker-archive:{}", not_archive.display()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::LocalSource { .. }), "{err:?}");
}

#[tokio::test]
async fn local_sources_report_progress() {
    let home = tempfile::tempdir().unwrap();
    let layout = home.path().join("layout");
    let bb = busybox_image();
    images::write_oci_layout(&layout, &[("v1", &bb)]);
    let (events, progress) = recording();
    let res = resolver(home.path());
    let source =
        smol::image::ImageSource::parse(&format!("oci-layout:{}", layout.display())).unwrap();

    let sizes: Vec<u64> = bb.layers.iter().map(|l| l.blob.len() as u64).collect();
    res.pull_source_with_progress(&source, progress.clone())
        .await
        .expect("layout pull");
    let ev = std::mem::take(&mut *events.lock().unwrap());
    assert_eq!(check_pull_events(&ev, &sizes), vec![false, false]);
    match &ev[0] {
        PullEvent::Resolved {
            reference, digest, ..
        } => {
            assert_eq!(reference, &source.to_string());
            assert_eq!(digest.as_ref().map(|d| d.to_string()), Some(bb.digest()));
        }
        other => panic!("{other:?}"),
    }
    res.pull_source_with_progress(&source, progress.clone())
        .await
        .expect("layout pull again");
    let ev = std::mem::take(&mut *events.lock().unwrap());
    assert_eq!(check_pull_events(&ev, &sizes), vec![true, true]);

    // docker save layers are the plain tars; the digest comes at the end.
    let archive = home.path().join("saved.tar");
    let img = images::marked_image("progress");
    images::write_docker_archive(&archive, "smol/progress:1", &img);
    let sizes: Vec<u64> = img.layers.iter().map(|l| l.tar.len() as u64).collect();
    let source =
        smol::image::ImageSource::parse(&format!("docker-archive:{}", archive.display())).unwrap();
    let pulled = res
        .pull_source_with_progress(&source, progress.clone())
        .await
        .expect("archive pull");
    let ev = std::mem::take(&mut *events.lock().unwrap());
    // marked_image shares the busybox layers, already in the cache as
    // gzip blobs: as plain tars they are new.
    assert_eq!(check_pull_events(&ev, &sizes), vec![false; sizes.len()]);
    assert!(
        matches!(&ev[0], PullEvent::Resolved { digest: None, .. }),
        "{ev:?}"
    );
    let done_digests: Vec<String> = pulled
        .image
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect();
    for e in &ev {
        if let PullEvent::LayerDone { index, digest, .. } = e {
            assert_eq!(digest.to_string(), done_digests[*index]);
        }
    }
}

/// Blob files of the cache with their modification times.
fn blob_times(home: &Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(home.join("images/blobs/sha256"))
        .map(|d| {
            d.flatten()
                .map(|e| {
                    (
                        e.path(),
                        e.metadata().and_then(|m| m.modified()).expect("mtime"),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn images_in_a_guest() {
    // A short home: the vsock socket path must fit in sun_path.
    let home = tempfile::Builder::new()
        .prefix("smol-img")
        .tempdir_in("/tmp")
        .unwrap();
    let _dog = common::watchdog("images", &[home.path()], common::TEST_LIMIT);
    common::runtime().block_on(guest_checks(home.path()));
}

async fn guest_checks(home: &Path) {
    use common::{Checks, Ctx};
    use futures::StreamExt;
    use smol::{ConnectOptions, Error, ExecEvent, ExecOptions, Machine, MachineConfig};
    use std::time::{Duration, Instant};

    let o = ConnectOptions::local().home(home);
    let reg = Registry::start();
    let bb = busybox_image();
    let ep = entrypoint_image();
    reg.push("smol/busybox", "v1", &bb).await;
    reg.push("smol/entry", "v1", &ep).await;
    reg.push("smol/broken", "v1", &images::not_a_tar_image())
        .await;
    let busybox = reg.reference("smol/busybox", "v1");
    let entry = reg.reference("smol/entry", "v1");

    let t = Instant::now();
    let a = match Machine::create_with(
        MachineConfig::default().name("img-a").disk_mb(256),
        o.clone(),
    )
    .await
    {
        Ok(m) => m,
        Err(e) => panic!(
            "creating the test machine failed (assets missing? run `cargo xtask assets`):\n{e}"
        ),
    };
    report!(
        "[images] machine {} booted in {:.1?}",
        a.name(),
        t.elapsed()
    );
    let mut c = Checks::new("images");
    c.watch(home);

    c.run("pull_image returns the image's info", async {
        let t = Instant::now();
        let info = a.pull_image(&busybox).await.ctx("pull")?;
        report!("[images] first pull of {busybox} took {:.2?}", t.elapsed());
        ensure!(info.digest == bb.digest(), "digest {}", info.digest);
        ensure!(info.reference == busybox, "reference {}", info.reference);
        ensure!(info.layers.len() == 2, "layers {:?}", info.layers);
        ensure!(
            info.created.as_deref() == Some("2024-01-02T03:04:05Z"),
            "created {:?}",
            info.created
        );
        let blobs: u64 = bb.blobs().iter().map(|(_, b)| b.len() as u64).sum();
        ensure!(info.size == blobs, "size {} != {blobs}", info.size);
        Ok(())
    })
    .await;

    c.run("run uses the image's env and workdir", async {
        let r = a
            .run(&busybox, ["sh", "-c", "echo $GREETING; pwd; cat hello.txt"])
            .await
            .ctx("run")?;
        ensure!(
            r.exit_code == 0,
            "exit {} stderr {}",
            r.exit_code,
            r.stderr_lossy()
        );
        let want = "hello from the image config\n/srv/app\nhello from /srv/app\n";
        ensure!(r.stdout_lossy() == want, "stdout {:?}", r.stdout_lossy());
        Ok(())
    })
    .await;

    c.run("the whiteout hides the first layer's file", async {
        let r = a.run(&busybox, ["cat", "/etc/motd"]).await.ctx("run")?;
        ensure!(
            r.exit_code != 0,
            "cat /etc/motd succeeded: {:?}",
            r.stdout_lossy()
        );
        let r = a.run(&busybox, ["ls", "/etc"]).await.ctx("run ls")?;
        ensure!(
            !r.stdout_lossy().contains("motd"),
            "ls /etc: {}",
            r.stdout_lossy()
        );
        ensure!(
            r.stdout_lossy().contains("layer2"),
            "ls /etc: {}",
            r.stdout_lossy()
        );
        Ok(())
    })
    .await;

    c.run("the container has its own pid, uts and mount namespaces", async {
        let r = a
            .run(&busybox, ["sh", "-c", "echo $$; hostname; ls /proc | grep -c '^[0-9]'; test -d /bin/busybox || echo own-root"])
            .await
            .ctx("run")?;
        let out = r.stdout_lossy();
        let lines: Vec<&str> = out.lines().collect();
        ensure!(lines.len() == 4 && lines[0] == "1", "stdout {out:?}");
        ensure!(lines[1].len() == 12 && lines[1] != "smol", "hostname {:?}", lines[1]);
        ensure!(lines[2].parse::<u32>().is_ok_and(|n| n <= 4), "processes in /proc: {}", lines[2]);
        let host = a.exec(["hostname"]).await.ctx("exec hostname")?;
        ensure!(host.stdout_lossy().trim() != lines[1], "the machine's hostname changed");
        Ok(())
    })
    .await;

    c.run(
        "entrypoint, cmd and user come from the image config",
        async {
            let r = a
                .run(&entry, Vec::<String>::new())
                .await
                .ctx("run with the image's cmd")?;
            ensure!(
                r.stdout_lossy() == "default cmd as 1000:1000 in / home /home/app\n",
                "stdout {:?} stderr {:?}",
                r.stdout_lossy(),
                r.stderr_lossy()
            );
            let r = a
                .run(&entry, ["echo replaced $(id -un)"])
                .await
                .ctx("run with argv")?;
            ensure!(
                r.stdout_lossy() == "replaced app\n",
                "stdout {:?}",
                r.stdout_lossy()
            );
            Ok(())
        },
    )
    .await;

    c.run("run_with: env and workdir override the image's", async {
        let opts = ExecOptions::default()
            .env("GREETING", "overridden")
            .workdir("/tmp");
        let r = a
            .run_with(&busybox, ["sh", "-c", "echo $GREETING; pwd"], opts)
            .await
            .ctx("run_with")?;
        ensure!(
            r.stdout_lossy() == "overridden\n/tmp\n",
            "stdout {:?}",
            r.stdout_lossy()
        );
        Ok(())
    })
    .await;

    c.run(
        "exit codes, stderr, timeouts and streaming behave as exec",
        async {
            let r = a
                .run(&busybox, ["sh", "-c", "echo out; echo err >&2; exit 7"])
                .await
                .ctx("run")?;
            ensure!(
                r.exit_code == 7 && r.stdout_lossy() == "out\n" && r.stderr_lossy() == "err\n",
                "{r:?}"
            );
            let opts = ExecOptions::default().timeout(Duration::from_secs(2));
            let r = a
                .run_with(&busybox, ["sh", "-c", "sleep 60 & sleep 60"], opts)
                .await
                .ctx("timeout")?;
            ensure!(r.timed_out, "not timed out: {r:?}");
            let mut s = a
                .run_stream(&busybox, ["sh", "-c", "echo one; sleep 1; echo two"])
                .await
                .ctx("stream")?;
            let mut out = String::new();
            let mut exit = None;
            while let Some(ev) = s.next().await {
                match ev.ctx("event")? {
                    ExecEvent::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
                    ExecEvent::Exit(code) => exit = Some(code),
                    other => return Err(format!("unexpected event {other:?}")),
                }
            }
            ensure!(
                out == "one\ntwo\n" && exit == Some(0),
                "stream {out:?} {exit:?}"
            );
            let e = a.run(&busybox, ["no-such-program"]).await.unwrap_err();
            ensure!(e.to_string().contains("no-such-program"), "{e}");
            Ok(())
        },
    )
    .await;

    c.run("a container's writes stay in that container", async {
        let r = a
            .run(
                &busybox,
                [
                    "sh",
                    "-c",
                    "echo scratch > /etc/scratch && cat /etc/scratch",
                ],
            )
            .await
            .ctx("write")?;
        ensure!(r.stdout_lossy() == "scratch\n", "{r:?}");
        let r = a
            .run(&busybox, ["cat", "/etc/scratch"])
            .await
            .ctx("read back")?;
        ensure!(r.exit_code != 0, "the next container saw it");
        let r = a.exec(["ls", "/etc/scratch"]).await.ctx("on the machine")?;
        ensure!(r.exit_code != 0, "the machine's root saw it");
        Ok(())
    })
    .await;

    c.run(
        "a missing tag and an unknown image are named errors",
        async {
            let e = a
                .pull_image(&reg.reference("smol/busybox", "nope"))
                .await
                .unwrap_err();
            ensure!(
                matches!(&e, Error::Image(ImageError::TagNotFound { tag, .. }) if tag == "nope"),
                "{e:?}"
            );
            let e = a
                .run(&reg.reference("smol/ghost", "v1"), ["true"])
                .await
                .unwrap_err();
            ensure!(
                matches!(&e, Error::Image(ImageError::NotFound { .. })),
                "{e:?}"
            );
            Ok(())
        },
    )
    .await;

    c.run(
        "a layer that is not a tar is refused and leaves nothing",
        async {
            let e = a
                .pull_image(&reg.reference("smol/broken", "v1"))
                .await
                .unwrap_err();
            ensure!(
                matches!(&e, Error::Image(ImageError::NotATar { .. })),
                "{e:?}"
            );
            let images = a.list_images().await.ctx("list")?;
            ensure!(
                !images.iter().any(|i| i.reference.contains("broken")),
                "{images:?}"
            );
            let r = a
                .exec([
                    "sh",
                    "-c",
                    "ls -A /run/smol/disk/images/layers | grep -c tmp || true",
                ])
                .await
                .ctx("ls")?;
            ensure!(
                r.stdout_lossy().trim() == "0",
                "half-unpacked layers: {}",
                r.stdout_lossy()
            );
            Ok(())
        },
    )
    .await;

    // From here on the registry is gone: what follows must not need it.
    drop(reg);
    let before = blob_times(home);

    c.run("run twice: the second time downloads nothing", async {
        let t = Instant::now();
        let r = a
            .run(&busybox, ["true"])
            .await
            .ctx("run without a registry")?;
        ensure!(r.exit_code == 0, "{r:?}");
        report!("[images] run of a cached image took {:.2?}", t.elapsed());
        let t = Instant::now();
        a.exec(["true"]).await.ctx("exec")?;
        report!("[images] exec of the same command took {:.2?}", t.elapsed());
        ensure!(blob_times(home) == before, "the blob cache changed");
        Ok(())
    })
    .await;

    let layout = home.join("layout");
    images::write_oci_layout(&layout, &[("v2", &images::marked_image("oci-layout"))]);
    let archive = home.join("saved.tar");
    images::write_docker_archive(
        &archive,
        "smol/saved:v3",
        &images::marked_image("docker-save"),
    );

    c.run("an oci-layout directory is a source", async {
        let src = format!("oci-layout:{}:v2", layout.display());
        let r = a
            .run(&src, ["sh", "-c", "echo $SOURCE; cat /etc/layer2"])
            .await
            .ctx("run")?;
        ensure!(r.stdout_lossy() == "oci-layout\nlayer two\n", "{r:?}");
        Ok(())
    })
    .await;

    c.run("a docker save archive is a source", async {
        let src = format!("docker-archive:{}", archive.display());
        let t = Instant::now();
        let info = a.pull_image(&src).await.ctx("pull")?;
        report!(
            "[images] docker-save import and send took {:.2?}",
            t.elapsed()
        );
        ensure!(
            info.layers.iter().all(|l| l.media_type.ends_with(".tar")),
            "{:?}",
            info.layers
        );
        let r = a
            .run(&src, ["sh", "-c", "echo $SOURCE; ls /etc"])
            .await
            .ctx("run")?;
        ensure!(r.stdout_lossy().starts_with("docker-save\n"), "{r:?}");
        ensure!(
            !r.stdout_lossy().contains("motd"),
            "whiteout in a plain-tar layer: {r:?}"
        );
        Ok(())
    })
    .await;

    c.run("list_images shows what the machine has", async {
        let images = a.list_images().await.ctx("list")?;
        let refs: Vec<&str> = images.iter().map(|i| i.reference.as_str()).collect();
        ensure!(images.len() == 4, "{refs:?}");
        ensure!(
            refs.contains(&busybox.as_str()) && refs.contains(&entry.as_str()),
            "{refs:?}"
        );
        Ok(())
    })
    .await;

    c.run(
        "a second machine shares the blob cache (MachineConfig.image, registry down)",
        async {
            let by_digest = format!(
                "{}@{}",
                busybox.rsplit_once(':').map(|(n, _)| n).unwrap_or(&busybox),
                bb.digest()
            );
            let before = blob_times(home);
            let config = MachineConfig {
                image: Some(by_digest.clone()),
                ..MachineConfig::default().name("img-b").disk_mb(256)
            };
            let t = Instant::now();
            let b = Machine::create_with(config, o.clone())
                .await
                .ctx("create with an image")?;
            report!(
                "[images] machine b booted and got its image in {:.1?}",
                t.elapsed()
            );
            let images = b.list_images().await.ctx("list on b")?;
            ensure!(
                images.len() == 1 && images[0].digest == bb.digest(),
                "{images:?}"
            );
            let r = b
                .run(&by_digest, ["cat", "/srv/app/hello.txt"])
                .await
                .ctx("run on b")?;
            ensure!(r.stdout_lossy() == "hello from /srv/app\n", "{r:?}");
            ensure!(blob_times(home) == before, "the blob cache changed");
            b.delete().await.ctx("delete b")?;
            Ok(())
        },
    )
    .await;

    a.delete().await.expect("delete a");
    c.finish();
}
