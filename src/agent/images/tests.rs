//! The image calls of the SDK against the agent's real request handlers on
//! the host (a loopback socket, no guest): layers streamed and unpacked,
//! images recorded and listed, containers run through the exec path. Needs
//! root (containers) and /bin/busybox (the test image); skipped otherwise.

use super::*;

#[path = "../../../tests/support/images.rs"]
mod images;

/// Modification times of the agent's unpacked layers.
fn layer_times(store: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(store.join("layers"))
        .map(|d| {
            d.flatten()
                .map(|e| (e.path(), e.metadata().unwrap().modified().unwrap()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn machine_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    fn check(m: &crate::Machine) {
        send(&m.pull_image("x"));
        send(&m.pull_image_with_progress("x", |_| {}));
        send(&m.list_images());
        send(&m.run("x", ["true"]));
        send(&m.run_stream("x", ["true"]));
    }
    let _ = check;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_and_run_against_the_agents_handlers() {
    if !nix::unistd::Uid::effective().is_root() || !Path::new(images::BUSYBOX).exists() {
        eprintln!("skipped: needs root (containers) and {}", images::BUSYBOX);
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let agent_store = home.path().join("agent-store");
    // The agent's store is process-wide; no other test of this crate uses it.
    std::env::set_var("SMOL_AGENT_IMAGE_STORE", &agent_store);
    let link = crate::agent::loopback::Link::new(home.path());

    let layout = home.path().join("layout");
    let bb = images::busybox_image();
    images::write_oci_layout(
        &layout,
        &[
            ("bb", &bb),
            ("ep", &images::entrypoint_image()),
            ("broken", &images::not_a_tar_image()),
        ],
    );
    let src = |tag: &str| format!("oci-layout:{}:{tag}", layout.display());

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let progress: ProgressFn = Arc::new(move |e: &PullEvent| sink.lock().unwrap().push(e.clone()));
    let info = pull_image(&link, &src("bb"), Some(progress))
        .await
        .expect("pull");
    assert_eq!(info.digest, bb.digest());
    {
        // Into the cache, then into the machine: every layer of each.
        let ev = events.lock().unwrap();
        assert!(
            matches!(&ev[0], PullEvent::Resolved { layers: 2, .. }),
            "{ev:?}"
        );
        let at = |f: fn(&PullEvent) -> bool| ev.iter().position(f).unwrap();
        let sending = at(|e| matches!(e, PullEvent::Sending { layers: 2, .. }));
        let mut done: Vec<usize> = ev[..sending]
            .iter()
            .filter_map(|e| match e {
                PullEvent::LayerDone { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        let mut sent: Vec<usize> = ev[sending..]
            .iter()
            .filter_map(|e| match e {
                PullEvent::LayerSent { index, .. } => Some(*index),
                _ => None,
            })
            .collect();
        done.sort();
        sent.sort();
        assert_eq!((done, sent), (vec![0, 1], vec![0, 1]), "{ev:?}");
        // Bytes sent, up to each layer's size.
        for (i, l) in info.layers.iter().enumerate() {
            let last = ev[sending..].iter().rev().find_map(|e| match e {
                PullEvent::LayerProgress { index, done, total } if *index == i => {
                    Some((*done, *total))
                }
                _ => None,
            });
            assert_eq!(last, Some((l.size, l.size)), "{ev:?}");
        }
    }
    assert_eq!(info.reference, src("bb"));
    assert_eq!(info.layers.len(), 2);
    let records = image_records(&link).await.unwrap();
    assert_eq!(records.len(), 1);
    let layers_before = layer_times(&agent_store);
    assert_eq!(layers_before.len(), 2);

    let r = run_collect(
        &link,
        &src("bb"),
        ["sh", "-c", "echo $GREETING; pwd; cat /etc/motd"]
            .map(String::from)
            .to_vec(),
        ExecOptions::default(),
    )
    .await
    .expect("run");
    assert_eq!(
        r.stdout_lossy(),
        "hello from the image config\n/srv/app\n",
        "{r:?}"
    );
    assert_eq!(r.exit_code, 1, "the whiteout hides /etc/motd: {r:?}");

    // Same layers, another config: nothing is sent again.
    let r = run_collect(
        &link,
        &src("ep"),
        Vec::<String>::new(),
        ExecOptions::default(),
    )
    .await
    .expect("run ep");
    assert_eq!(
        r.stdout_lossy(),
        "default cmd as 1000:1000 in / home /home/app\n",
        "{r:?}"
    );
    assert_eq!(
        layer_times(&agent_store),
        layers_before,
        "layers were sent again"
    );
    assert_eq!(image_records(&link).await.unwrap().len(), 2);

    // By digest, with options.
    let opts = ExecOptions::default().env("GREETING", "hi").workdir("/tmp");
    let r = run_collect(
        &link,
        &bb.digest(),
        ["sh", "-c", "echo $GREETING $(pwd) $$"]
            .map(String::from)
            .to_vec(),
        opts,
    )
    .await
    .expect("by digest");
    assert_eq!(r.stdout_lossy(), "hi /tmp 1\n", "{r:?}");

    // A layer that is not a tar: named, not recorded, nothing left.
    let e = pull_image(&link, &src("broken"), None).await.unwrap_err();
    assert!(
        matches!(e, Error::Image(ImageError::NotATar { .. })),
        "{e:?}"
    );
    assert_eq!(image_records(&link).await.unwrap().len(), 2);
    assert_eq!(layer_times(&agent_store), layers_before);

    // A docker save archive: plain-tar layers, new digests, sent and unpacked.
    let archive = home.path().join("saved.tar");
    images::write_docker_archive(
        &archive,
        "smol/saved:1",
        &images::marked_image("docker-save"),
    );
    let r = run_collect(
        &link,
        &format!("docker-archive:{}", archive.display()),
        ["sh", "-c", "echo $SOURCE; ls /etc"]
            .map(String::from)
            .to_vec(),
        ExecOptions::default(),
    )
    .await
    .expect("run archive");
    assert!(
        r.stdout_lossy().starts_with("docker-save\n") && !r.stdout_lossy().contains("motd"),
        "{r:?}"
    );
    assert_eq!(layer_times(&agent_store).len(), 4);

    // An image the machine does not have, by digest: named.
    let e = run_collect(
        &link,
        &images::sha256(b"nothing"),
        ["true"].map(String::from).to_vec(),
        ExecOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Error::Image(ImageError::NotFound { .. })),
        "{e:?}"
    );
}
