//! The OpenAPI document of `smol serve` against the live server:
//! schemathesis (from PyPI; `cargo xtask test` installs it and passes its
//! path in `SMOL_SCHEMATHESIS`) generates requests from the document, valid
//! and invalid, with and without the key, and checks every answer against
//! it: status codes, content types, bodies, no server error, 401 without
//! the key. No guest is booted: `createMachine` is left out (each would
//! boot a machine of a random shape), so machine ids are unknown ones and
//! their answers the documented errors.

#![cfg(feature = "cli")]

mod common;
mod support {
    pub mod serve;
}

use std::process::Command;

use support::serve::{key, serve, Server};

#[test]
fn the_live_server_matches_its_openapi_document() {
    let Some(st) = std::env::var_os("SMOL_SCHEMATHESIS").filter(|s| !s.is_empty()) else {
        // CI runs `cargo xtask test`, which always sets it: there, its
        // absence is a broken set-up, not a reason to skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but SMOL_SCHEMATHESIS is not: run the tests with `cargo xtask test`"
        );
        report!("SKIPPED: SMOL_SCHEMATHESIS is not set (cargo xtask test installs schemathesis and sets it)");
        return;
    };
    let home = tempfile::Builder::new()
        .prefix("smol-openapi")
        .tempdir_in("/tmp")
        .unwrap();
    let k = key(home.path(), &["create", "fuzz"]);
    // A line per request would be hundreds here: warnings only.
    let (child, url) = serve(home.path(), "warn");
    let _server = Server(Some(child));

    // The document is served without a key and is JSON with our paths.
    // reqwest is built without a default TLS provider (smol installs ring's).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let doc: serde_json::Value = common::runtime().block_on(async {
        reqwest::get(format!("{url}/v1/openapi.json"))
            .await
            .expect("GET /v1/openapi.json")
            .json()
            .await
            .expect("the document is JSON")
    });
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/machines/{id}/exec/stream"].is_object());

    let out = Command::new(&st)
        .args(["run", &format!("{url}/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {k}")])
        .args(["--exclude-operation-id", "createMachine"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--checks", "all"])
        .args(["--max-examples", "25", "--workers", "1", "--seed", "1"])
        .args(["--request-timeout", "30"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .current_dir(home.path())
        .output()
        .expect("running schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report!("{text}");
    assert!(
        out.status.success(),
        "schemathesis found the server and its document disagreeing (above)"
    );
    // Nothing was left behind by the requests.
    let machines = std::fs::read_dir(home.path().join("machines"))
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0);
    assert_eq!(machines, 0);
}
