//! A real registry for the image tests: Debian's `docker-registry`
//! (distribution 2.8) on 127.0.0.1, with its storage in a temp directory,
//! stopped when dropped. `cargo xtask test` installs the package.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::images::TestImage;

pub const BINARY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`
    pub addr: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry on a free loopback port and waits until it answers.
    pub fn start() -> Registry {
        assert!(
            Path::new(BINARY).exists(),
            "{BINARY} is missing: `apt-get install -y docker-registry` (cargo xtask test does it)"
        );
        let mut dir = tempfile::tempdir().expect("temp dir");
        // Bind-then-release to find a free port; retried if the registry loses the race.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n  secret: smol-test\n",
                    dir.path().join("storage").display()
                ),
            )
            .expect("write config");
            let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
            let child = Command::new(BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            let mut reg = Registry { child, addr, dir };
            if reg.wait_ready(Duration::from_secs(20)) {
                return reg;
            }
            let _ = reg.child.kill();
            let _ = reg.child.wait();
            dir = std::mem::replace(&mut reg.dir, tempfile::tempdir().expect("temp dir"));
        }
        panic!(
            "docker-registry did not start; log in {}",
            dir.path().join("registry.log").display()
        );
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.get("/v2/").is_some_and(|status| status == 200) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A plain HTTP/1.0 GET: the status code, or None when unreachable.
    pub fn get(&self, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// `127.0.0.1:<port>/<repo>:<tag>`
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// Pushes `image` as `<repo>:<tag>` (blobs, then the manifest).
    pub async fn push(&self, repo: &str, tag: &str, image: &TestImage) {
        let client = client();
        let r = Reference::with_tag(self.addr.clone(), repo.to_string(), tag.to_string());
        client
            .store_auth_if_needed(&self.addr, &RegistryAuth::Anonymous)
            .await;
        for (digest, blob) in image.blobs() {
            client
                .push_blob(&r, blob.to_vec(), &digest)
                .await
                .unwrap_or_else(|e| panic!("push blob {digest}: {e}"));
        }
        client
            .push_manifest_raw(
                &r,
                image.manifest.clone(),
                image.manifest_media_type.parse().expect("header"),
            )
            .await
            .unwrap_or_else(|e| panic!("push manifest {repo}:{tag}: {e}"));
    }

    /// Pushes an image index (its manifests must be pushed already).
    pub async fn push_index(&self, repo: &str, tag: &str, index: &[u8]) {
        let client = client();
        let r = Reference::with_tag(self.addr.clone(), repo.to_string(), tag.to_string());
        client
            .store_auth_if_needed(&self.addr, &RegistryAuth::Anonymous)
            .await;
        client
            .push_manifest_raw(
                &r,
                index.to_vec(),
                "application/vnd.oci.image.index.v1+json"
                    .parse()
                    .expect("header"),
            )
            .await
            .unwrap_or_else(|e| panic!("push index {repo}:{tag}: {e}"));
    }

    /// The registry's storage directory (to corrupt blobs on purpose).
    pub fn storage(&self) -> std::path::PathBuf {
        self.dir.path().join("storage")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}
