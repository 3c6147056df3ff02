//! Bounded fuzzing of the code that parses untrusted bytes: the targets of
//! `fuzz/` (see fuzz/README.md), run by libFuzzer on stable Rust, without
//! cargo-fuzz or nightly.
//!
//! The fuzz crate is built in release mode with libFuzzer's coverage
//! instrumentation (LLVM's SanitizerCoverage pass, which stable rustc runs
//! through `-C passes` and `-C llvm-args`; no sanitizer, those need
//! nightly), `--cfg fuzzing`, debug assertions and overflow checks, into a
//! target directory of its own beside the workspace's. `--target` is
//! explicit so that the flags reach the fuzzed code only, not build
//! scripts and proc macros. Each target then runs for a fixed time on a
//! corpus kept in the cache (`<cache>/fuzz/corpus/<target>`, grown run
//! after run), seeded from `fuzz/seeds/<target>/`. A crash, a hang past
//! [`TIMEOUT_SECS`] or a run past the memory limit fails the task and
//! names the input libFuzzer saved (`<cache>/fuzz/artifacts/<target>/`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cache::{cache_dir, workspace_root};

/// Every target of fuzz/Cargo.toml, in the order they run.
pub const TARGETS: &[&str] = &[
    "unpack_layer",
    "blk_request",
    "vsock_muxer",
    "mmio",
    "agent_protocol",
    "oci_manifest",
];

/// Seconds per target when nothing says otherwise.
pub const DEFAULT_SECONDS: u64 = 30;
/// Seconds per target for `cargo xtask test` (and the default of `cargo
/// xtask fuzz`); 0 skips the fuzzing.
pub const SECONDS_VAR: &str = "SMOL_FUZZ_SECONDS";
/// One input running longer than this is a hang, reported as a crash.
pub const TIMEOUT_SECS: u64 = 10;
/// libFuzzer's limit on the process's memory.
const RSS_LIMIT_MB: u64 = 2048;

/// What libFuzzer's coverage needs of rustc, all stable options.
const RUSTFLAGS: &[&str] = &[
    "--cfg",
    "fuzzing",
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// libFuzzer's C++ part is built by libfuzzer-sys.
const BUILD_PACKAGES: &[&str] = &["g++"];

/// `$SMOL_FUZZ_SECONDS`, else [`DEFAULT_SECONDS`].
pub fn seconds_from_env() -> Result<u64, String> {
    match std::env::var(SECONDS_VAR) {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .map_err(|_| format!("{SECONDS_VAR}={s:?} is not a number of seconds")),
        _ => Ok(DEFAULT_SECONDS),
    }
}

/// How one target's run went.
struct Run {
    execs: Option<u64>,
    per_sec: Option<u64>,
    corpus: usize,
    took: Duration,
}

/// Builds the fuzz crate and runs `target` (every target when `None`) for
/// `seconds` each.
pub fn run(target: Option<&str>, seconds: u64) -> Result<(), String> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => {
            return Err(format!(
                "no fuzz target {t:?} (there are {})",
                TARGETS.join(", ")
            ))
        }
        None => TARGETS.to_vec(),
    };
    if seconds == 0 {
        println!(
            "xtask: fuzz: SKIPPED ({SECONDS_VAR}=0 or --seconds 0): {}",
            targets.join(", ")
        );
        return Ok(());
    }
    let bins = build()?;
    let t = Instant::now();
    let mut summary = Vec::new();
    for target in &targets {
        let r = run_target(&bins.join(target), target, seconds)?;
        let num = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        summary.push(format!(
            "{target} {} execs ({}/s), corpus {}",
            num(r.execs),
            num(r.per_sec),
            r.corpus
        ));
        println!(
            "xtask: fuzz {target}: done in {:.1}s, {} execs, {} execs/s, corpus of {} inputs",
            r.took.as_secs_f64(),
            num(r.execs),
            num(r.per_sec),
            r.corpus
        );
    }
    println!(
        "xtask: fuzz: {} targets, {seconds}s each, no crash in {:.1}s: {}",
        targets.len(),
        t.elapsed().as_secs_f64(),
        summary.join("; ")
    );
    Ok(())
}

/// Where the fuzz crate builds: in the host's cache, beside the corpus, so
/// that a fresh clone (every CI run) reuses the instrumented dependencies
/// (8 minutes cold on 2 cores, most of it the SDK's HTTP stack) and only
/// the workspace's own crates are built again; and apart from the
/// workspace's target directory, so neither build invalidates the other.
fn fuzz_target_dir() -> PathBuf {
    crate::cache::cache_dir().join("fuzz").join("target")
}

fn host_triple() -> Result<String, String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .map_err(|e| format!("rustc -vV: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .ok_or_else(|| "rustc -vV names no host".to_string())
}

/// Builds every target; returns the directory of the executables.
fn build() -> Result<PathBuf, String> {
    crate::kernel::ensure_debian_packages(BUILD_PACKAGES, |m| println!("xtask: {m}"))?;
    let triple = host_triple()?;
    let dir = fuzz_target_dir();
    println!(
        "xtask: fuzz: building the targets with libFuzzer coverage into {} \
         (a few minutes the first time)",
        dir.display()
    );
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--release", "--bins", "--target", &triple])
        // fuzz/ is its own workspace, with its own .cargo/config.toml.
        .current_dir(workspace_root().join("fuzz"))
        .env("CARGO_TARGET_DIR", &dir)
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        // These would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    crate::run("fuzz build", cmd)?;
    Ok(dir.join(triple).join("release"))
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

fn run_target(bin: &Path, target: &str, seconds: u64) -> Result<Run, String> {
    let root = cache_dir().join("fuzz");
    let corpus = root.join("corpus").join(target);
    let artifacts = root.join("artifacts").join(target);
    let logs = root.join("logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let seeds = workspace_root().join("fuzz").join("seeds").join(target);
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)
        .map_err(|e| format!("create {}: {e}", log_path.display()))?;
    println!(
        "xtask: fuzz {target}: running for {seconds}s on {} ({} inputs) and {} seeds (log {})",
        corpus.display(),
        count_files(&corpus),
        count_files(&seeds),
        log_path.display()
    );

    let mut cmd = Command::new(bin);
    // New inputs go to the first directory; the seeds are only read.
    cmd.arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("fuzz {target}: cannot start {}: {e}", bin.display()))?;
    // libFuzzer reports on stderr; a target's stdout is kept in the log too.
    let (tx, lines) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        }));
    }
    drop(tx);

    let mut status_line = String::new();
    let mut artifact = None;
    let mut execs = None;
    let mut per_sec = None;
    let mut tail: Vec<String> = Vec::new();
    let mut last_say = Instant::now();
    loop {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(l) => {
                let _ = writeln!(log, "{l}");
                if let Some(p) = l.split("Test unit written to ").nth(1) {
                    artifact = Some(p.trim().to_string());
                }
                if let Some(v) = l.strip_prefix("stat::number_of_executed_units:") {
                    execs = v.trim().parse().ok();
                }
                if let Some(v) = l.strip_prefix("stat::average_exec_per_sec:") {
                    per_sec = v.trim().parse().ok();
                }
                if l.starts_with('#') && l.contains("cov:") {
                    status_line = l.clone();
                }
                tail.push(l);
                if tail.len() > 40 {
                    tail.remove(0);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last_say.elapsed() >= Duration::from_secs(10) && !status_line.is_empty() {
            last_say = Instant::now();
            println!(
                "xtask: fuzz {target}: {:.0}s of {seconds}s: {}",
                t.elapsed().as_secs_f64(),
                status_line.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child
        .wait()
        .map_err(|e| format!("fuzz {target}: wait: {e}"))?;
    if !status.success() {
        eprintln!("xtask: fuzz {target}: the end of libFuzzer's report:");
        for l in &tail {
            eprintln!("  {l}");
        }
        let what = match &artifact {
            Some(a) => format!(
                "the input is {a}\n  replay it: {} {a}\n  log: {}",
                bin.display(),
                log_path.display()
            ),
            None => format!("no input saved; log: {}", log_path.display()),
        };
        return Err(format!("fuzz target {target} failed ({status}): {what}"));
    }
    Ok(Run {
        execs,
        per_sec,
        corpus: count_files(&corpus),
        took: t.elapsed(),
    })
}
