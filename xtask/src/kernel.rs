//! `cargo xtask kernel`: the guest `vmlinux`, built from Debian's
//! `linux-source-6.1` with our config fragment and patches, cached by the
//! hash of exactly those inputs.
//!
//! Cache layout under `<cache_dir>/kernel/`:
//! - `<key>/vmlinux` (and `<key>/config`, the final `.config`): a finished build;
//! - `build-<key>/`: the source tree while building; removed on success (a
//!   tree is ~1.5 GB and a new key means a new config, so keeping it would
//!   rarely save a full build), kept after a failure for inspection and
//!   replaced by the next attempt;
//! - `build-<key>.log`: every command's output, kept;
//! - `build-<key>.lock`: the builder's pid, serialises concurrent `cargo xtask` runs.

use crate::cache::{cache_dir, hash_inputs, publish, workspace_root};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's package holding `/usr/src/linux-source-6.1.tar.xz`.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The top directory inside the tarball.
const SOURCE_DIR: &str = "linux-source-6.1";
/// What the build needs besides the source.
const BUILD_PACKAGES: &[&str] = &[
    "gcc",
    "make",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "cpio",
    "patch",
    "xz-utils",
];
/// How often a line of progress is printed while `make` runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(20);

/// Builds (or takes from the cache) the guest kernel and publishes it as
/// `<assets_dir>/vmlinux`; returns the published path.
pub fn build() -> Result<PathBuf, String> {
    let start = Instant::now();
    let progress = Progress { start };

    ensure_packages(&progress)?;
    let inputs = KernelInputs::read()?;
    let key = inputs.key();
    let kernel_dir = cache_dir().join("kernel");
    let keyed = kernel_dir.join(&key).join("vmlinux");

    if keyed.is_file() {
        let published = publish(&keyed, "vmlinux")?;
        progress.say(&format!("cache hit {key} ({})", keyed.display()));
        return Ok(published);
    }

    fs::create_dir_all(&kernel_dir).map_err(|e| format!("create {}: {e}", kernel_dir.display()))?;
    let _lock = BuildLock::acquire(&kernel_dir.join(format!("build-{key}.lock")), &progress)?;
    // Another process may have finished this very build while we waited.
    if keyed.is_file() {
        progress.say(&format!("built meanwhile by another run: {key}"));
        return publish(&keyed, "vmlinux");
    }

    progress.say(&format!(
        "cache miss {key}: building {SOURCE_PACKAGE} {} (takes minutes)",
        inputs.source_version
    ));
    let build_dir = kernel_dir.join(format!("build-{key}"));
    let log_path = kernel_dir.join(format!("build-{key}.log"));
    let built = build_in(&inputs, &build_dir, &log_path, &progress).map_err(|e| {
        format!(
            "kernel build failed after {:.0}s: {e}\n(build dir kept for inspection: {}; \
             the next run replaces it)",
            start.elapsed().as_secs_f64(),
            build_dir.display()
        )
    })?;

    let final_dir = kernel_dir.join(&key);
    fs::create_dir_all(&final_dir).map_err(|e| format!("create {}: {e}", final_dir.display()))?;
    install_atomically(&built.join(".config"), &final_dir.join("config"))?;
    install_atomically(&built.join("vmlinux"), &keyed)?;
    let published = publish(&keyed, "vmlinux")?;
    progress.say(&format!("cached {}", keyed.display()));

    fs::remove_dir_all(&build_dir)
        .map_err(|e| format!("remove build dir {}: {e}", build_dir.display()))?;
    progress.say(&format!(
        "removed {} (log kept: {})",
        build_dir.display(),
        log_path.display()
    ));
    Ok(published)
}

/// Everything the kernel depends on; the cache key is the hash of it all.
struct KernelInputs {
    fragment_path: PathBuf,
    fragment: Vec<u8>,
    /// (file name, contents), sorted by name: the order they are applied in.
    patches: Vec<(String, Vec<u8>)>,
    source_version: String,
}

impl KernelInputs {
    fn read() -> Result<KernelInputs, String> {
        let dir = workspace_root().join("kernel-config");
        let fragment_path = dir.join("smol.config");
        let fragment = fs::read(&fragment_path)
            .map_err(|e| format!("read {}: {e}", fragment_path.display()))?;
        let patch_dir = dir.join("patches");
        let mut patches = Vec::new();
        let entries =
            fs::read_dir(&patch_dir).map_err(|e| format!("read {}: {e}", patch_dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("read {}: {e}", patch_dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".patch") {
                continue;
            }
            let bytes = fs::read(entry.path())
                .map_err(|e| format!("read {}: {e}", entry.path().display()))?;
            patches.push((name, bytes));
        }
        patches.sort();
        let source_version = package_version(SOURCE_PACKAGE)?;
        Ok(KernelInputs {
            fragment_path,
            fragment,
            patches,
            source_version,
        })
    }

    /// hash_inputs over: the fragment, each patch labelled by its file name,
    /// and the installed version of linux-source-6.1.
    fn key(&self) -> String {
        let labels: Vec<String> = self
            .patches
            .iter()
            .map(|(n, _)| format!("patch:{n}"))
            .collect();
        let mut inputs: Vec<(&str, &[u8])> = vec![("smol.config", &self.fragment)];
        for (label, (_, bytes)) in labels.iter().zip(&self.patches) {
            inputs.push((label, bytes));
        }
        inputs.push((SOURCE_PACKAGE, self.source_version.as_bytes()));
        hash_inputs(&inputs)
    }
}

/// The steps of a kernel build in `build_dir`; returns the source tree that
/// holds the finished `vmlinux` and `.config`.
fn build_in(
    inputs: &KernelInputs,
    build_dir: &Path,
    log_path: &Path,
    progress: &Progress,
) -> Result<PathBuf, String> {
    if build_dir.exists() {
        progress.say(&format!(
            "removing a stale build dir {}",
            build_dir.display()
        ));
        fs::remove_dir_all(build_dir)
            .map_err(|e| format!("remove stale build dir {}: {e}", build_dir.display()))?;
    }
    fs::create_dir_all(build_dir).map_err(|e| format!("create {}: {e}", build_dir.display()))?;
    let log = Log::create(log_path)?;
    progress.say(&format!("log: {}", log_path.display()));

    progress.say(&format!("extracting {SOURCE_TARBALL}"));
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(SOURCE_TARBALL).arg("-C").arg(build_dir);
    log.run("extract the kernel source", tar)?;
    let src = build_dir.join(SOURCE_DIR);
    if !src.join("Makefile").is_file() {
        return Err(format!("{SOURCE_TARBALL} has no {SOURCE_DIR}/Makefile"));
    }

    let patch_dir = workspace_root().join("kernel-config").join("patches");
    for (name, _) in &inputs.patches {
        progress.say(&format!("applying patches/{name}"));
        let mut patch = Command::new("patch");
        patch
            .args(["-p1", "--forward", "--batch", "-i"])
            .arg(patch_dir.join(name))
            .current_dir(&src);
        log.run(&format!("apply patch {name}"), patch)?;
    }

    progress.say("configuring: tinyconfig + smol.config, olddefconfig");
    log.run("make tinyconfig", make(&src, &["tinyconfig"]))?;
    let mut merge = Command::new(src.join("scripts/kconfig/merge_config.sh"));
    merge
        .args(["-m", ".config"])
        .arg(&inputs.fragment_path)
        .env("ARCH", "x86_64")
        .current_dir(&src);
    log.run("merge smol.config (merge_config.sh -m)", merge)?;
    log.run("make olddefconfig", make(&src, &["olddefconfig"]))?;

    let fragment = std::str::from_utf8(&inputs.fragment)
        .map_err(|_| format!("{} is not utf-8", inputs.fragment_path.display()))?;
    let wanted = parse_fragment(fragment)?;
    let config_path = src.join(".config");
    let config = fs::read_to_string(&config_path)
        .map_err(|e| format!("read {}: {e}", config_path.display()))?;
    check_config(&wanted, &parse_config(&config)).map_err(|bad| {
        format!(
            "olddefconfig did not keep {} option(s) of {} (a dependency is missing or an \
             option was renamed):\n  {}",
            bad.len(),
            inputs.fragment_path.display(),
            bad.join("\n  ")
        )
    })?;
    progress.say(&format!(
        "config verified: all {} options of smol.config kept",
        wanted.len()
    ));

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    progress.say(&format!("make -j{jobs} vmlinux (output in the log)"));
    let jobs_arg = format!("-j{jobs}");
    log.run_with_progress(
        "make vmlinux",
        make(&src, &[&jobs_arg, "vmlinux"]),
        progress,
    )?;

    let vmlinux = src.join("vmlinux");
    let image = fs::read(&vmlinux).map_err(|e| format!("read {}: {e}", vmlinux.display()))?;
    if !has_pvh_note(&image)? {
        return Err(format!(
            "{} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): is CONFIG_PVH set?",
            vmlinux.display()
        ));
    }
    progress.say(&format!(
        "built vmlinux: {:.1} MiB, PVH entry note present",
        image.len() as f64 / (1024.0 * 1024.0)
    ));
    Ok(src)
}

/// `make ARCH=x86_64 <args>` in the source tree, with a reproducible banner.
fn make(src: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("make");
    c.arg("ARCH=x86_64")
        .args(args)
        .env("KBUILD_BUILD_USER", "smol")
        .env("KBUILD_BUILD_HOST", "smol")
        .current_dir(src);
    c
}

/// Installs the Debian packages the build needs that are not installed yet.
fn ensure_packages(progress: &Progress) -> Result<(), String> {
    let mut wanted: Vec<&str> = vec![SOURCE_PACKAGE];
    wanted.extend_from_slice(BUILD_PACKAGES);
    ensure_debian_packages(&wanted, |m| progress.say(m))
}

/// Installs those of `wanted` that are not installed yet (`apt-get update`
/// only when something is missing). Shared by every task that needs a
/// Debian package, so a fresh machine gets what the tests need.
pub fn ensure_debian_packages(wanted: &[&str], say: impl Fn(&str)) -> Result<(), String> {
    let installed = installed_packages(wanted)?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains_key(*p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!(
        "installing missing packages: {}",
        missing.join(" ")
    ));
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    run_visible("apt-get update", update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    run_visible(&format!("apt-get install {}", missing.join(" ")), install)?;
    let installed = installed_packages(&missing)?;
    if let Some(p) = missing.iter().find(|p| !installed.contains_key(**p)) {
        return Err(format!(
            "package {p} is still not installed after apt-get install"
        ));
    }
    Ok(())
}

/// The installed version of a Debian package.
fn package_version(name: &str) -> Result<String, String> {
    installed_packages(&[name])?
        .remove(name)
        .ok_or_else(|| format!("package {name} is not installed"))
}

/// name -> version of those of `names` that are installed (one dpkg-query).
fn installed_packages(names: &[&str]) -> Result<BTreeMap<String, String>, String> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${db:Status-Status} ${Version}\\n")
        .args(names)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run dpkg-query (is this Debian?): {e}"))?;
    // dpkg-query exits 1 when a name is unknown; the others are still listed.
    Ok(parse_dpkg_query(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_dpkg_query(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let (name, status, version) = (it.next()?, it.next()?, it.next()?);
            (status == "installed").then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

/// Runs a command with its output on our terminal (apt-get).
fn run_visible(what: &str, mut cmd: Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if !status.success() {
        return Err(format!("{what} failed ({status})"));
    }
    Ok(())
}

/// What a config fragment asks of one option.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    Value(String),
    NotSet,
}

/// `CONFIG_X=v` and `# CONFIG_X is not set` lines of a fragment, in order.
fn parse_fragment(text: &str) -> Result<Vec<(String, Wanted)>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(name) = rest.trim().strip_suffix(" is not set") {
                if is_config_name(name) {
                    out.push((name.to_string(), Wanted::NotSet));
                }
            }
            continue;
        }
        match line.split_once('=') {
            Some((name, value)) if is_config_name(name) && !value.is_empty() => {
                out.push((name.to_string(), Wanted::Value(value.to_string())));
            }
            _ => {
                return Err(format!(
                    "smol.config line {}: not a config option: {raw:?}",
                    n + 1
                ))
            }
        }
    }
    Ok(out)
}

fn is_config_name(s: &str) -> bool {
    s.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

/// The set options of a `.config` (name -> value); unset ones are absent.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every option of the fragment that the final config does not honour.
fn check_config(
    wanted: &[(String, Wanted)],
    config: &BTreeMap<String, String>,
) -> Result<(), Vec<String>> {
    let bad: Vec<String> = wanted
        .iter()
        .filter_map(|(name, want)| match (want, config.get(name)) {
            (Wanted::Value(v), Some(got)) if got == v => None,
            (Wanted::Value(v), Some(got)) => Some(format!("{name}: wanted {v}, got {got}")),
            (Wanted::Value(v), None) => Some(format!("{name}: wanted {v}, got not set")),
            (Wanted::NotSet, None) => None,
            (Wanted::NotSet, Some(got)) => Some(format!("{name}: wanted not set, got {got}")),
        })
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

/// Whether an ELF64 little-endian image carries the Xen PVH entry note
/// (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18) in a PT_NOTE segment,
/// which is what the VMM's PVH loader looks for.
fn has_pvh_note(elf: &[u8]) -> Result<bool, String> {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let bad = |what: &str| format!("vmlinux is not a valid ELF64 image: {what}");
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err(bad("no ELF header"));
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(bad("not 64-bit little-endian"));
    }
    let phoff = le_u64(elf, 0x20).ok_or_else(|| bad("header"))?;
    let phentsize = usize::from(le_u16(elf, 0x36).ok_or_else(|| bad("header"))?);
    let phnum = usize::from(le_u16(elf, 0x38).ok_or_else(|| bad("header"))?);
    if phentsize < 56 {
        return Err(bad("program header entry too small"));
    }
    for i in 0..phnum {
        let ph = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i.checked_mul(phentsize)?))
            .ok_or_else(|| bad("program header offset"))?;
        let Some(p_type) = le_u32(elf, ph) else {
            return Err(bad("program header past the end"));
        };
        if p_type != PT_NOTE {
            continue;
        }
        let off = le_u64(elf, ph + 8).ok_or_else(|| bad("program header"))?;
        let size = le_u64(elf, ph + 32).ok_or_else(|| bad("program header"))?;
        let notes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| elf.get(o..o.checked_add(s)?))
            .ok_or_else(|| bad("note segment past the end"))?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = le_u32(notes, at).unwrap_or(0) as usize;
            let descsz = le_u32(notes, at + 4).unwrap_or(0) as usize;
            let n_type = le_u32(notes, at + 8).unwrap_or(0);
            let name = notes.get(at + 12..at + 12 + namesz).unwrap_or(&[]);
            if name == b"Xen\0" && n_type == XEN_ELFNOTE_PHYS32_ENTRY {
                return Ok(true);
            }
            at += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Ok(false)
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Copies `from` to `to` through a temporary file in the same directory, so
/// `to` is either absent or complete.
fn install_atomically(from: &Path, to: &Path) -> Result<(), String> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = to.with_file_name(format!(".{name}.tmp"));
    fs::copy(from, &tmp)
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).map_err(|e| format!("rename {} to {}: {e}", tmp.display(), to.display()))
}

/// Prints phases with the time since the build started.
struct Progress {
    start: Instant,
}

impl Progress {
    fn say(&self, what: &str) {
        println!(
            "kernel [{:>6.1}s] {what}",
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// A lock file holding the builder's pid, created atomically and removed
/// when dropped. A lock whose process is gone (killed build) is taken over.
/// (std's `File::lock` would do, but it needs Rust 1.89 and our MSRV is 1.85.)
struct BuildLock {
    path: PathBuf,
}

impl BuildLock {
    fn acquire(path: &Path, progress: &Progress) -> Result<BuildLock, String> {
        let mut said = false;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())
                        .map_err(|e| format!("write lock {}: {e}", path.display()))?;
                    return Ok(BuildLock {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("create lock {}: {e}", path.display())),
            }
            let owner = fs::read_to_string(path).unwrap_or_default();
            let alive = owner
                .trim()
                .parse::<u32>()
                .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                // Empty (being written right now) or a dead owner: look again
                // shortly, so a writer mid-creation is not mistaken for stale.
                std::thread::sleep(Duration::from_millis(500));
                if fs::read_to_string(path).unwrap_or_default() == owner {
                    progress.say(&format!(
                        "removing stale lock {} (pid {owner:?})",
                        path.display()
                    ));
                    let _ = fs::remove_file(path);
                }
                continue;
            }
            if !said {
                progress.say(&format!(
                    "waiting for another kernel build (pid {}, lock {})",
                    owner.trim(),
                    path.display()
                ));
                said = true;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The build log: every command's output is appended to it.
struct Log {
    path: PathBuf,
    file: File,
}

impl Log {
    fn create(path: &Path) -> Result<Log, String> {
        let file = File::create(path).map_err(|e| format!("create log {}: {e}", path.display()))?;
        Ok(Log {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Starts `cmd` with stdout and stderr appended to the log.
    fn spawn(&self, what: &str, cmd: &mut Command) -> Result<std::process::Child, String> {
        let mut header = &self.file;
        writeln!(header, "\n==> {what}: {cmd:?}")
            .map_err(|e| format!("write log {}: {e}", self.path.display()))?;
        let out = self
            .file
            .try_clone()
            .map_err(|e| format!("log {}: {e}", self.path.display()))?;
        let err = self
            .file
            .try_clone()
            .map_err(|e| format!("log {}: {e}", self.path.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{what}: cannot start {:?}: {e}", cmd.get_program()))
    }

    fn run(&self, what: &str, mut cmd: Command) -> Result<(), String> {
        let mut child = self.spawn(what, &mut cmd)?;
        let status = child.wait().map_err(|e| format!("{what}: wait: {e}"))?;
        self.check(what, &cmd, status)
    }

    /// Like `run`, printing every PROGRESS_EVERY the number of objects
    /// compiled so far and the last line of the log.
    fn run_with_progress(
        &self,
        what: &str,
        mut cmd: Command,
        progress: &Progress,
    ) -> Result<(), String> {
        let mut child = self.spawn(what, &mut cmd)?;
        let started = Instant::now();
        let mut next = started + PROGRESS_EVERY;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| format!("{what}: wait: {e}"))? {
                break status;
            }
            if Instant::now() >= next {
                next += PROGRESS_EVERY;
                let (objects, last) = self.summary();
                progress.say(&format!(
                    "  {what}: {:.0}s, {objects} objects built, last: {last}",
                    started.elapsed().as_secs_f64()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        self.check(what, &cmd, status)
    }

    fn check(
        &self,
        what: &str,
        cmd: &Command,
        status: std::process::ExitStatus,
    ) -> Result<(), String> {
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed: {:?} exited with {status}; log: {}\nlast lines of the log:\n{}",
            cmd.get_program(),
            self.path.display(),
            self.tail(20)
        ))
    }

    /// (count of compile lines, last non-empty line) of the log so far.
    fn summary(&self) -> (usize, String) {
        let text = fs::read_to_string(&self.path).unwrap_or_default();
        let objects = text
            .lines()
            .filter(|l| l.starts_with("  CC ") || l.starts_with("  AS "))
            .count();
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        (objects, last.to_string())
    }

    /// The last `n` lines of the log (reads at most the last 64 KiB).
    fn tail(&self, n: usize) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.path) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
            let _ = f.read_to_end(&mut buf);
        }
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_lines_are_parsed() {
        let text =
            "# comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nCONFIG_D=64\n";
        let got = parse_fragment(text).unwrap();
        assert_eq!(
            got,
            vec![
                ("CONFIG_A".to_string(), Wanted::Value("y".into())),
                ("CONFIG_B".to_string(), Wanted::NotSet),
                ("CONFIG_C".to_string(), Wanted::Value("\"x y\"".into())),
                ("CONFIG_D".to_string(), Wanted::Value("64".into())),
            ]
        );
    }

    #[test]
    fn fragment_garbage_is_named() {
        let err = parse_fragment("CONFIG_A=y\nSMP=y\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("SMP=y"), "{err}");
        assert!(parse_fragment("CONFIG_A=\n").is_err());
    }

    #[test]
    fn our_fragment_parses() {
        let path = workspace_root().join("kernel-config/smol.config");
        let wanted = parse_fragment(&fs::read_to_string(path).unwrap()).unwrap();
        assert!(wanted.contains(&("CONFIG_PVH".to_string(), Wanted::Value("y".into()))));
        assert!(wanted.contains(&("CONFIG_ACPI".to_string(), Wanted::NotSet)));
    }

    #[test]
    fn config_check_names_every_dropped_option() {
        let wanted = parse_fragment(
            "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=m\n# CONFIG_D is not set\n# CONFIG_E is not set\n",
        )
        .unwrap();
        let config = parse_config("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=y\n");
        let bad = check_config(&wanted, &config).unwrap_err();
        assert_eq!(
            bad,
            vec![
                "CONFIG_B: wanted y, got not set",
                "CONFIG_C: wanted m, got y",
                "CONFIG_D: wanted not set, got y",
            ]
        );
        let config = parse_config("CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=m\n");
        assert!(check_config(&wanted, &config).is_ok());
    }

    #[test]
    fn dpkg_query_output_keeps_installed_only() {
        let out = "gcc installed 4:12.2.0-3\nfoo not-installed \nbar config-files 1.0\n";
        let got = parse_dpkg_query(out);
        assert_eq!(got.len(), 1);
        assert_eq!(got["gcc"], "4:12.2.0-3");
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = KernelInputs {
            fragment_path: PathBuf::from("smol.config"),
            fragment: b"CONFIG_A=y\n".to_vec(),
            patches: vec![("0001-a.patch".into(), b"p".to_vec())],
            source_version: "6.1.192-2".into(),
        };
        let k = base.key();
        let mut other = KernelInputs {
            fragment: b"CONFIG_A=n\n".to_vec(),
            ..base
        };
        assert_ne!(other.key(), k);
        other.fragment = b"CONFIG_A=y\n".to_vec();
        assert_eq!(other.key(), k);
        other.patches[0].1 = b"q".to_vec();
        assert_ne!(other.key(), k);
        other.patches[0].1 = b"p".to_vec();
        other.source_version = "6.1.193-1".into();
        assert_ne!(other.key(), k);
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("smol-xtask-kernel-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn failed_command_names_status_log_and_last_lines() {
        let dir = scratch("log");
        let log = Log::create(&dir.join("build.log")).unwrap();
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo fine"]);
        log.run("first step", ok).unwrap();
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo compiling; echo 'error: boom' >&2; exit 3"]);
        let err = log.run("second step", bad).unwrap_err();
        assert!(err.starts_with("second step failed"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(
            err.contains(&dir.join("build.log").display().to_string()),
            "{err}"
        );
        assert!(err.contains("error: boom"), "{err}");
        let text = fs::read_to_string(dir.join("build.log")).unwrap();
        assert!(
            text.contains("==> first step") && text.contains("fine"),
            "{text}"
        );
        let err = log
            .run("third step", Command::new("/nonexistent/tool"))
            .unwrap_err();
        assert!(err.contains("third step: cannot start"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lock_is_exclusive_released_on_drop_and_stale_ones_are_taken() {
        let dir = scratch("lock");
        let path = dir.join("build.lock");
        let progress = Progress {
            start: Instant::now(),
        };
        {
            let _held = BuildLock::acquire(&path, &progress).unwrap();
            let owner = fs::read_to_string(&path).unwrap();
            assert_eq!(owner, std::process::id().to_string());
        }
        assert!(!path.exists(), "lock not removed on drop");
        // A pid above the kernel's pid_max limit is never alive.
        fs::write(&path, "4194305").unwrap();
        let held = BuildLock::acquire(&path, &progress).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
        drop(held);
        fs::remove_dir_all(dir).unwrap();
    }

    /// A minimal ELF64 image with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        e[64..68].copy_from_slice(&4u32.to_le_bytes());
        e[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes());
        e[64 + 32..64 + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        e.extend_from_slice(notes);
        e
    }

    fn note(name: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&n_type.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn pvh_note_is_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 18, &0x100_0000u32.to_le_bytes()));
        assert!(has_pvh_note(&elf_with_notes(&notes)).unwrap());
    }

    #[test]
    fn missing_pvh_note_and_bad_images() {
        assert!(!has_pvh_note(&elf_with_notes(&note(b"Xen\0", 5, &[0; 8]))).unwrap());
        assert!(has_pvh_note(b"not an elf").is_err());
        let mut e = elf_with_notes(&note(b"Xen\0", 18, &[0; 4]));
        e[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(has_pvh_note(&e).is_err());
        let mut truncated_note = note(b"Xen\0", 18, &[0; 4]);
        truncated_note[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!has_pvh_note(&elf_with_notes(&truncated_note)).unwrap());
    }
}
