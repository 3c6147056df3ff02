use super::*;

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\nbad line\n";
const GROUP: &str = "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\nstaff:x:50:\n";

#[test]
fn users_resolve_like_docker() {
    assert_eq!(
        resolve_user(None, PASSWD, GROUP).unwrap(),
        (0, 0, vec![0], "/root".into())
    );
    assert_eq!(
        resolve_user(Some("app"), PASSWD, GROUP).unwrap(),
        (1000, 1001, vec![1001, 10], "/home/app".into())
    );
    assert_eq!(resolve_user(Some("1000"), PASSWD, GROUP).unwrap().1, 1001);
    assert_eq!(
        resolve_user(Some("4242"), PASSWD, GROUP).unwrap(),
        (4242, 0, vec![0], "/".into())
    );
    assert_eq!(
        resolve_user(Some("app:staff"), PASSWD, GROUP).unwrap().1,
        50
    );
    assert_eq!(
        resolve_user(Some("7:8"), "", "").unwrap(),
        (7, 8, vec![8], "/".into())
    );
    let e = resolve_user(Some("nobody"), PASSWD, GROUP).unwrap_err();
    assert!(e.message.contains("nobody"), "{e}");
    assert!(resolve_user(Some("app:nogroup"), PASSWD, GROUP)
        .unwrap_err()
        .message
        .contains("nogroup"));
}

#[test]
fn stages_are_named() {
    assert_eq!(
        stage_what(CONTAINER_STAGE + 1),
        "cannot start the container: mount /proc"
    );
    assert_eq!(
        stage_what(CONTAINER_STAGE + 99),
        "cannot start the container: set up"
    );
}

/// Containers on the host (the tests run as root): a busybox image of two
/// layers, the second deleting a file of the first, run through the real
/// exec path with a container target.
mod on_the_host {
    use super::super::super::{ImageConfig, ImageRecord, LayerRecord};
    use super::*;
    use crate::protocol::{ExecRequest, ExitStatus};
    use crate::server::testing::{exec_req, run};
    use sha2::Digest as _;
    use std::sync::OnceLock;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], u64)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, uid) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_mtime(1);
            if *kind == tar::EntryType::Symlink {
                h.set_size(0);
                b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                    .unwrap();
            } else {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn digest(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
    }

    /// The image's manifest digest (made up: only the record names it).
    fn image() -> Option<&'static str> {
        static IMAGE: OnceLock<Option<String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| {
                let busybox = std::fs::read("/bin/busybox").ok()?;
                if !nix::unistd::Uid::effective().is_root() {
                    return None;
                }
                let dir =
                    std::env::temp_dir().join(format!("smol-agent-images-{}", std::process::id()));
                std::env::set_var("SMOL_AGENT_IMAGE_STORE", &dir);
                let d = tar::EntryType::Directory;
                let f = tar::EntryType::Regular;
                let l = tar::EntryType::Symlink;
                let one = layer(&[
                    ("bin", d, b"", 0),
                    ("bin/busybox", f, &busybox, 0),
                    ("bin/sh", l, b"busybox", 0),
                    ("bin/cat", l, b"/bin/busybox", 0),
                    ("bin/id", l, b"busybox", 0),
                    ("bin/ls", l, b"busybox", 0),
                    ("bin/hostname", l, b"busybox", 0),
                    ("bin/sleep", l, b"busybox", 0),
                    ("etc", d, b"", 0),
                    (
                        "etc/passwd",
                        f,
                        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
                        0,
                    ),
                    ("etc/group", f, b"root:x:0:\napp:x:1000:\n", 0),
                    ("etc/motd", f, b"layer one\n", 0),
                    ("home/app", d, b"", 1000),
                    ("proc", l, b"/etc", 0),
                ]);
                let two = layer(&[("etc/.wh.motd", f, b"", 0), ("srv/app", d, b"", 0)]);
                let store = serve::store().ok()?;
                let mut layers = Vec::new();
                for blob in [one, two] {
                    let dg = digest(&blob);
                    store.put_layer(&dg, &blob[..]).ok()?;
                    layers.push(LayerRecord {
                        digest: dg,
                        media_type: "tar".into(),
                        size: blob.len() as u64,
                    });
                }
                let rec = ImageRecord {
                    digest: digest(b"test image"),
                    references: vec!["test/busybox:1".into()],
                    layers,
                    config: ImageConfig::default(),
                    created: None,
                    size: 0,
                };
                store.record(&rec).ok()?;
                Some(rec.digest)
            })
            .as_deref()
    }

    fn in_container(argv: &[&str], user: Option<&str>) -> ExecRequest {
        ExecRequest {
            container: Some(ContainerSpec {
                image: image().unwrap().to_string(),
                user: user.map(str::to_string),
                hostname: Some("boxed".into()),
            }),
            ..exec_req(argv)
        }
    }

    fn ok(code: i32) -> Option<ExitStatus> {
        Some(ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
        })
    }

    #[test]
    fn runs_in_namespaces_over_the_image() {
        if image().is_none() {
            eprintln!("skipped: needs root and /bin/busybox");
            return;
        }
        let o = run(in_container(
            &["sh", "-c", "echo pid=$$ host=$(hostname) home=$HOME; ls /; cat /etc/motd; ls /proc/1 >/dev/null && echo proc"],
            None,
        ));
        assert_eq!(o.exit, ok(0), "{o:?}");
        let out = o.out();
        assert!(out.starts_with("pid=1 host=boxed home=/root\n"), "{out}");
        assert!(out.contains("srv") && out.contains("bin"), "{out}");
        assert!(
            !out.contains("layer one"),
            "the whiteout hides /etc/motd: {out}"
        );
        assert!(out.contains("proc\n"), "{out}");
        assert!(o.err().contains("motd"), "{}", o.err());

        // The image's user, and writes that do not outlive the container.
        let o = run(in_container(
            &["sh", "-c", "id -u; id -g; echo x > /etc/new; cat /etc/new"],
            Some("app"),
        ));
        assert_eq!(o.exit, ok(1), "app cannot write /etc: {o:?}");
        assert!(o.out().starts_with("1000\n1000\n"), "{}", o.out());
        let o = run(in_container(
            &["sh", "-c", "echo x > /etc/new && cat /etc/new"],
            None,
        ));
        assert_eq!((o.exit, o.out().as_str()), (ok(0), "x\n"));
        let o = run(in_container(&["cat", "/etc/new"], None));
        assert_eq!(o.exit, ok(1), "a fresh upper per container: {o:?}");

        // Workdir and program are checked inside the image.
        let mut req = in_container(&["sh", "-c", "pwd"], None);
        req.workdir = Some("/srv/app".into());
        let o = run(req);
        assert_eq!((o.exit, o.out().as_str()), (ok(0), "/srv/app\n"), "{o:?}");
        let mut req = in_container(&["sh"], None);
        req.workdir = Some("/nope".into());
        let e = run(req).error.expect("bad workdir");
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
        let e = run(in_container(&["no-such-tool"], None))
            .error
            .expect("missing program");
        assert!(
            e.kind == ErrorKind::NotFound && e.message.contains("no-such-tool"),
            "{e}"
        );
        let e = run(in_container(&["id"], Some("ghost")))
            .error
            .expect("unknown user");
        assert!(e.message.contains("ghost"), "{e}");

        // A timeout kills the container's processes.
        let mut req = in_container(&["sh", "-c", "sleep 30 & sleep 30"], None);
        req.timeout_ms = Some(300);
        let o = run(req);
        assert!(o.exit.is_some_and(|e| e.timed_out), "{o:?}");

        // Nothing of the containers is left (the agent cleans up just after
        // sending the exit status).
        let containers = serve::store().unwrap().root().join("containers");
        let leftovers = || -> Vec<_> {
            std::fs::read_dir(&containers)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !leftovers().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(leftovers().is_empty(), "{:?}", leftovers());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(
            !mounts.contains(containers.to_str().unwrap()),
            "overlay left mounted"
        );
    }

    #[test]
    fn unknown_images_are_named() {
        if image().is_none() {
            return;
        }
        let mut req = in_container(&["true"], None);
        req.container.as_mut().unwrap().image = "nothing:here".into();
        let e = run(req).error.expect("unknown image");
        assert!(
            e.kind == ErrorKind::NotFound && e.message.contains("nothing:here"),
            "{e}"
        );
    }
}
