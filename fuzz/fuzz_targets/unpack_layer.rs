//! Unpacks arbitrary bytes as an OCI layer (tar, or gzip by its magic) and
//! checks that nothing landed outside the layer root. Unpack errors are
//! expected; a panic or an escape is a bug.

#![no_main]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smol_agent::image::unpack::{check_confined, confinement_sandbox, unpack_layer};

fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().expect("temp dir");
    let root = confinement_sandbox(parent.path()).expect("sandbox");
    let _ = unpack_layer(data, &root);
    if let Err(e) = check_confined(&root) {
        panic!("unpacking escaped the layer root: {e}");
    }
    // Entries may leave directories read-only; let the temp dir be removed.
    make_writable(&root);
});

fn make_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&e.path());
        }
    }
}
