//! OCI image indexes, manifests and configs, parsed and checked as the SDK
//! does on a pull or an import (`smol::image::manifest`): the body of a
//! registry's or a layout's manifest with the content type the registry
//! or the descriptor named, the platform picked from an index, then the
//! image's config and the checks that tie it to the manifest.
//!
//! Errors are expected; a panic is a bug, and so is a result outside the
//! bounds the parser promises: at most `MAX_INDEX_ENTRIES` entries and
//! `MAX_LAYERS` layers, a config of at most `MAX_CONFIG_BYTES`, sizes that
//! add up without overflow (so `layer_bytes` and `total_bytes` are exact),
//! valid digests, a platform picked from the index itself, and a manifest
//! that `write_manifest` writes back to the same manifest.
//!
//! Input: a byte choosing the content type (low 3 bits), then the manifest,
//! then, after the first NUL byte (never in JSON), the image config.

#![no_main]

use libfuzzer_sys::fuzz_target;
use smol::image::manifest::{
    self, parse_config, parse_manifest, select_platform, Manifest, MAX_CONFIG_BYTES,
    MAX_INDEX_ENTRIES, MAX_LAYERS,
};
use smol::image::Digest;

const CONTENT_TYPES: [Option<&str>; 8] = [
    None,
    Some(manifest::OCI_INDEX),
    Some(manifest::DOCKER_LIST),
    Some(manifest::OCI_MANIFEST),
    Some(manifest::DOCKER_MANIFEST),
    Some("application/json"),
    Some(""),
    Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&ct, rest)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(ct & 7)];
    let (body, config) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    match parse_manifest(body, content_type) {
        Ok(Manifest::Index(entries)) => {
            assert!(entries.len() <= MAX_INDEX_ENTRIES);
            for e in &entries {
                check_digest(&e.descriptor.digest);
            }
            if let Ok(picked) = select_platform("fuzz", &entries) {
                assert!(
                    entries.iter().any(|e| std::ptr::eq(e, picked)),
                    "the platform picked is not from the index"
                );
            }
            // An index's entries are manifests the pull then fetches.
            image_config(config);
        }
        Ok(Manifest::Image(m)) => {
            assert!(m.layers.len() <= MAX_LAYERS);
            assert!(m.config.size <= MAX_CONFIG_BYTES);
            check_digest(&m.config.digest);
            let layers = m
                .layers
                .iter()
                .try_fold(0u64, |sum, l| {
                    check_digest(&l.digest);
                    sum.checked_add(l.size)
                })
                .expect("the parser refuses sizes that overflow");
            assert_eq!(m.layer_bytes(), layers);
            assert_eq!(
                Some(m.total_bytes()),
                layers.checked_add(m.config.size),
                "total_bytes saturated on a manifest the parser accepted"
            );
            let written = manifest::write_manifest(&m.config, &m.layers);
            match parse_manifest(&written, None) {
                Ok(Manifest::Image(back)) => assert_eq!(back, m, "written back differently"),
                other => panic!("a manifest written back reads as {other:?}"),
            }
            image_config(config);
        }
        Err(_) => image_config(config),
    }
});

/// The image's config as a pull reads it, and the command a container of
/// it runs (docker's rules).
fn image_config(bytes: &[u8]) {
    let Ok(config) = parse_config("fuzz", bytes) else {
        return;
    };
    for d in &config.diff_ids {
        check_digest(d);
    }
    if let (Some(os), Some(arch)) = (&config.os, &config.architecture) {
        assert_eq!((os.as_str(), arch.as_str()), ("linux", "amd64"));
    }
    let argv: Vec<String> = config.config.cmd.iter().rev().cloned().collect();
    for argv in [&[][..], &argv[..]] {
        let env = [("PATH".to_string(), "/bin".to_string())];
        if let Ok(cmd) = config.config.resolve(argv, &env, None) {
            assert!(!cmd.argv.is_empty());
            let mut keys: Vec<&str> = cmd.env.iter().map(|(k, _)| k.as_str()).collect();
            keys.sort_unstable();
            let n = keys.len();
            keys.dedup();
            assert_eq!(keys.len(), n, "a variable set twice");
            assert!(cmd.env.contains(&env[0]), "the caller's PATH is overridden");
            assert!(!cmd.workdir.is_empty());
        }
    }
}

fn check_digest(d: &Digest) {
    let back = Digest::parse(d.as_str()).expect("a digest the parser accepted reparses");
    assert_eq!(back.hex().len(), 64);
}
