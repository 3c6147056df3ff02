//! `smol serve` for the tests: the real binary (feature `cli`) on a free
//! port of 127.0.0.1, and `smol key` to make its keys.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const SMOL: &str = env!("CARGO_BIN_EXE_smol");

pub fn key(home: &Path, args: &[&str]) -> String {
    let out = Command::new(SMOL)
        .arg("key")
        .args(args)
        .env("SMOL_HOME", home)
        .output()
        .expect("running smol key");
    assert!(out.status.success(), "smol key {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `smol serve` on a free port, logging by the `RUST_LOG` filter `log`;
/// returns it and its URL.
pub fn serve(home: &Path, log: &str) -> (Child, String) {
    let mut child = Command::new(SMOL)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("SMOL_HOME", home)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting smol serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("reading smol serve's address");
    let url = line
        .trim()
        .strip_prefix("smol serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line of smol serve: {line:?}"))
        .to_string();
    (child, url)
}

/// Kills the server if the test ends early.
pub struct Server(pub Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
