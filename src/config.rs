//! What a machine is made of ([`MachineConfig`]) and where it runs
//! ([`ConnectOptions`]), with the validation that turns bad values into
//! named errors before anything is created.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest machine name (the first character plus 62 more).
pub const MAX_NAME_LEN: usize = 63;
/// Smallest machine disk: ext4 with a journal needs a few MiB to be useful.
pub const MIN_DISK_MB: u64 = 16;
/// Largest machine disk (16 TiB, ext4's limit with 4 KiB blocks).
pub const MAX_DISK_MB: u64 = 16 << 20;

/// A machine: its name, resources and behaviour.
///
/// ```
/// let config = smol::MachineConfig::default().name("build-1").memory_mb(256).persistent(true);
/// assert_eq!(config.resources.memory_mb, 256);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineConfig {
    /// Unique within the store; generated when absent. Allowed:
    /// `[a-z0-9][a-z0-9-_.]{0,62}`.
    pub name: Option<String>,
    /// OCI image pulled into the machine when it is created (see
    /// [`Machine::pull_image`](crate::Machine::pull_image)).
    pub image: Option<String>,
    /// Host directories shared into the guest (see [`MountSpec`]), at
    /// most [`MAX_MOUNTS`].
    pub mounts: Vec<MountSpec>,
    /// Host TCP ports relayed to guest ports (see [`PortSpec`]); the
    /// mappings in force are [`Machine::ports`](crate::Machine::ports).
    pub ports: Vec<PortSpec>,
    pub resources: ResourceSpec,
    /// Keep the record and disk when the last handle is dropped.
    pub persistent: bool,
    /// Stop the machine after this many seconds with no request and no
    /// open connection (exec, stream, file transfer); `start` boots it again.
    pub auto_stop_seconds: Option<u64>,
    /// Delete the machine this many seconds after its create (persistent
    /// or not); its handles then get `Error::NotFound`.
    pub ttl_seconds: Option<u64>,
    /// Allow live clones with [`Machine::fork`](crate::Machine::fork).
    pub forkable: bool,
    /// Boot the guest kernel instead of restoring the host's booted
    /// snapshot of this machine shape (see [`Machine::create`](crate::Machine::create)).
    pub cold_boot: bool,
    /// With `resources.network`: the only destinations the guest may send
    /// to, as networks (`"10.0.0.0/8"`, `"192.0.2.7"`, `"2001:db8::/32"`);
    /// frames to any other address are dropped by the monitor. ARP, DHCP
    /// and IPv6 neighbour discovery always pass. `None`: anywhere. The
    /// gateway (`host.smol.internal`, the host's loopback) and the DNS
    /// server are destinations like any other: list them to reach them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_allow: Option<Vec<String>>,
}

/// A host directory shared into the guest while the machine runs: a
/// virtio-fs device served by a `virtiofsd` of its own on the host. What
/// either side writes, the other sees.
///
/// ```
/// let m = smol::MountSpec::new("/srv/data", "/data").read_only();
/// assert!(m.read_only);
/// let config = smol::MachineConfig::default().mount(m);
/// assert_eq!(config.mounts.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// The host directory; it must exist when the machine starts. Made
    /// absolute at create.
    pub source: PathBuf,
    /// Where the guest sees it: an absolute, normalised path, created if
    /// missing; not `/`, `/run`, `/tmp`, nor in `/proc`, `/sys`, `/dev`.
    pub target: String,
    /// The guest can read but not change it (the guest's writes fail with
    /// EROFS).
    #[serde(default)]
    pub read_only: bool,
}

impl MountSpec {
    /// `source` on the host at `target` in the guest, writable.
    pub fn new(source: impl Into<PathBuf>, target: impl Into<String>) -> Self {
        MountSpec {
            source: source.into(),
            target: target.into(),
            read_only: false,
        }
    }

    /// The guest may only read the share.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
}

/// Most shares a machine may have (each is a device and a virtiofsd).
pub const MAX_MOUNTS: usize = smol_protocol::MAX_SHARES;

/// A host TCP port relayed to a guest port while the machine runs.
///
/// Each connection to the host port is carried over vsock to the guest
/// agent, which connects to `guest` on the guest's loopback (127.0.0.1,
/// then ::1): the guest needs no network. The listener is bound before
/// the machine starts (a port in use is [`Error::PortInUse`]) and closed
/// when it stops.
///
/// ```
/// let p = smol::PortSpec::new(0, 80); // any free host port to guest port 80
/// assert_eq!(p.address, None);        // on 127.0.0.1
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// The host port; 0 picks a free one at each start.
    pub host: u16,
    /// The guest port (1 to 65535).
    pub guest: u16,
    /// The host address to listen on; 127.0.0.1 when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

impl PortSpec {
    /// `host` (0: any free port) on 127.0.0.1 to `guest`.
    pub fn new(host: u16, guest: u16) -> Self {
        PortSpec {
            host,
            guest,
            address: None,
        }
    }

    /// Listens on `address` instead of 127.0.0.1 (`0.0.0.0` for every
    /// interface: anyone who reaches the host reaches the guest port).
    pub fn address(mut self, address: std::net::IpAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// The address the host listener binds.
    pub fn bind_address(&self) -> std::net::SocketAddr {
        let ip = self
            .address
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        std::net::SocketAddr::new(ip, self.host)
    }
}

/// CPU, memory, disk and network of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceSpec {
    /// vCPUs (clamped to 1 on kvm_pvm hosts by the monitor).
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Size of the machine disk (the persistent root) in MiB; sparse.
    pub disk_mb: u64,
    /// Outbound network: a virtio-net device whose host side is a `passt`
    /// of the machine's own (no root, no tap device). The guest is
    /// configured by DHCP, and reaches the host's loopback as
    /// `host.smol.internal`. Off: the machine has no network device.
    pub network: bool,
}

impl Default for ResourceSpec {
    fn default() -> Self {
        // Small memory boots faster (early memory set-up is per page).
        ResourceSpec {
            cpus: 1,
            memory_mb: 128,
            disk_mb: 1024,
            network: false,
        }
    }
}

impl MachineConfig {
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.resources.cpus = cpus;
        self
    }

    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.resources.memory_mb = mb;
        self
    }

    pub fn disk_mb(mut self, mb: u64) -> Self {
        self.resources.disk_mb = mb;
        self
    }

    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    pub fn forkable(mut self, forkable: bool) -> Self {
        self.forkable = forkable;
        self
    }

    /// Shares a host directory into the guest (see [`MountSpec`]).
    pub fn mount(mut self, mount: MountSpec) -> Self {
        self.mounts.push(mount);
        self
    }

    /// Always boot the kernel (no warm create from a booted snapshot).
    pub fn cold_boot(mut self, cold: bool) -> Self {
        self.cold_boot = cold;
        self
    }

    /// Checks every field; the first bad one is named in the error.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        let r = &self.resources;
        if r.cpus == 0 {
            return Err(invalid("resources.cpus", "must be at least 1"));
        }
        if r.cpus > u32::from(smol_vmm::MAX_VCPUS) {
            return Err(invalid(
                "resources.cpus",
                format!("{} is above the {} supported", r.cpus, smol_vmm::MAX_VCPUS),
            ));
        }
        if r.memory_mb < smol_vmm::MIN_MEMORY_MIB {
            return Err(invalid(
                "resources.memory_mb",
                format!(
                    "{} MiB is below the {} MiB a guest needs to boot",
                    r.memory_mb,
                    smol_vmm::MIN_MEMORY_MIB
                ),
            ));
        }
        if r.memory_mb > smol_vmm::MAX_MEMORY_MIB {
            return Err(invalid(
                "resources.memory_mb",
                format!(
                    "{} MiB is above the {} MiB supported",
                    r.memory_mb,
                    smol_vmm::MAX_MEMORY_MIB
                ),
            ));
        }
        if !(MIN_DISK_MB..=MAX_DISK_MB).contains(&r.disk_mb) {
            return Err(invalid(
                "resources.disk_mb",
                format!(
                    "{} MiB is outside {MIN_DISK_MB}..={MAX_DISK_MB} MiB",
                    r.disk_mb
                ),
            ));
        }
        if let Some(image) = &self.image {
            crate::image::ImageSource::parse(image).map_err(|e| invalid("image", e.to_string()))?;
        }
        for (field, v) in [
            ("auto_stop_seconds", self.auto_stop_seconds),
            ("ttl_seconds", self.ttl_seconds),
        ] {
            if v == Some(0) {
                return Err(invalid(field, "0 seconds; leave it unset for no limit"));
            }
        }
        validate_ports(&self.ports)?;
        if let Some(list) = &self.egress_allow {
            egress_networks(list, r.network)?;
        }
        validate_mounts(&self.mounts)?;
        Ok(())
    }
}

/// Most networks in [`MachineConfig::egress_allow`].
pub const MAX_EGRESS_NETWORKS: usize = 256;

/// The allow-list as the monitor takes it; every entry must parse, and
/// the machine must have a network.
pub(crate) fn egress_networks(list: &[String], network: bool) -> Result<Vec<smol_vmm::IpNet>> {
    if !network {
        return Err(invalid(
            "egress_allow",
            "set without resources.network (a machine without a network sends nothing)",
        ));
    }
    if list.len() > MAX_EGRESS_NETWORKS {
        return Err(invalid(
            "egress_allow",
            format!("{} networks; at most {MAX_EGRESS_NETWORKS}", list.len()),
        ));
    }
    list.iter()
        .map(|n| {
            n.parse::<smol_vmm::IpNet>()
                .map_err(|e| invalid("egress_allow", format!("{n:?}: {e}")))
        })
        .collect()
}

/// Most port mappings a machine may have (each is a listener and a task).
pub const MAX_PORTS: usize = 64;

/// Guest ports are 1..=65535; a fixed host address and port is used once.
fn validate_ports(ports: &[PortSpec]) -> Result<()> {
    if ports.len() > MAX_PORTS {
        return Err(invalid(
            "ports",
            format!("{} mappings; at most {MAX_PORTS}", ports.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in ports {
        if p.guest == 0 {
            return Err(invalid(
                "ports",
                format!("guest port 0 (host {}): a guest port is 1 to 65535", p.host),
            ));
        }
        if p.host != 0 && !seen.insert(p.bind_address()) {
            return Err(invalid(
                "ports",
                format!("host {} is mapped twice", p.bind_address()),
            ));
        }
    }
    Ok(())
}

/// Targets are absolute, normalised, not reserved, and neither equal to
/// nor inside another's (the inner one's directory would be made in the
/// outer share, on the host). Sources are checked on the host at create
/// (they must be directories there).
fn validate_mounts(mounts: &[MountSpec]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if mounts.len() > MAX_MOUNTS {
        return Err(invalid(
            "mounts",
            format!("{} mounts; at most {MAX_MOUNTS}", mounts.len()),
        ));
    }
    for (i, m) in mounts.iter().enumerate() {
        smol_protocol::check_mount_target(&m.target)
            .map_err(|e| invalid("mounts", format!("target {e}")))?;
        let source = m.source.as_os_str().as_bytes();
        if source.is_empty() {
            return Err(invalid(
                "mounts",
                format!("the source of {:?} is empty", m.target),
            ));
        }
        if source.contains(&0) {
            return Err(invalid(
                "mounts",
                format!("source {:?} contains a NUL byte", m.source),
            ));
        }
        for other in &mounts[..i] {
            if other.target == m.target {
                return Err(invalid(
                    "mounts",
                    format!("target {:?} is given twice", m.target),
                ));
            }
            let (outer, inner) = match m.target.len() < other.target.len() {
                true => (&m.target, &other.target),
                false => (&other.target, &m.target),
            };
            if inner
                .strip_prefix(outer.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
            {
                return Err(invalid(
                    "mounts",
                    format!("target {inner:?} is inside the target {outer:?}"),
                ));
            }
        }
    }
    Ok(())
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

/// Machine names: `[a-z0-9][a-z0-9-_.]{0,62}`. They become directory names
/// and parts of socket paths, hence the strict alphabet.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        invalid(
            "name",
            format!("{name:?} {reason} (allowed: 1 to {MAX_NAME_LEN} of a-z 0-9 - _ . starting with a-z or 0-9)"),
        )
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(bad("is empty")),
        Some(c) if !(c.is_ascii_lowercase() || c.is_ascii_digit()) => {
            return Err(bad("must start with a lower-case letter or a digit"))
        }
        Some(_) => {}
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("is too long"));
    }
    if let Some(c) = chars
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(bad(&format!("contains {c:?}")));
    }
    Ok(())
}

/// A fresh name: `smol-` and 8 random hex digits.
pub(crate) fn generate_name() -> String {
    format!("smol-{:08x}", rand::random::<u32>())
}

/// Where machines run: the embedded local engine (the default) or the
/// cloud. `SMOL_CLOUD_TOKEN` selects the cloud in [`ConnectOptions::from_env`].
#[derive(Clone, Default)]
pub struct ConnectOptions {
    pub(crate) cloud_api_key: Option<String>,
    pub(crate) endpoint: Option<String>,
    pub(crate) home: Option<PathBuf>,
}

/// The remote engine's address when neither [`ConnectOptions::endpoint`]
/// nor `SMOL_CLOUD_URL` gives one: a `smol serve` on this host.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7100";

impl ConnectOptions {
    /// The embedded engine in this process, store under `SMOL_HOME`.
    pub fn local() -> Self {
        ConnectOptions::default()
    }

    /// The remote engine: a `smol serve` at `SMOL_CLOUD_URL` (else
    /// [`DEFAULT_ENDPOINT`], or [`ConnectOptions::endpoint`]), with the API
    /// key `api_key` (`smol key create NAME` prints one).
    pub fn cloud(api_key: impl Into<String>) -> Self {
        ConnectOptions {
            cloud_api_key: Some(api_key.into()),
            endpoint: std::env::var("SMOL_CLOUD_URL")
                .ok()
                .filter(|u| !u.is_empty()),
            home: None,
        }
    }

    /// The remote engine's URL (`http://host:port`), instead of
    /// `SMOL_CLOUD_URL`.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// Cloud when `SMOL_CLOUD_TOKEN` is set and not empty, else local.
    pub fn from_env() -> Self {
        match std::env::var("SMOL_CLOUD_TOKEN") {
            Ok(token) if !token.is_empty() => ConnectOptions::cloud(token),
            _ => ConnectOptions::local(),
        }
    }

    /// The local store's root directory, instead of `SMOL_HOME`
    /// (default `~/.local/share/smol`).
    pub fn home(mut self, dir: impl Into<PathBuf>) -> Self {
        self.home = Some(dir.into());
        self
    }

    pub fn is_cloud(&self) -> bool {
        self.cloud_api_key.is_some()
    }

    /// For what only the local engine does (restoring a snapshot from a
    /// directory of this host).
    pub(crate) fn require_local(&self, what: &str) -> Result<()> {
        if self.is_cloud() {
            return Err(Error::Unsupported(format!(
                "{what} on the remote engine (use ConnectOptions::local())"
            )));
        }
        Ok(())
    }

    /// The remote engine's client, or `None` for the local engine.
    pub(crate) fn remote_client(&self) -> Result<Option<crate::backend::remote::Client>> {
        let Some(key) = &self.cloud_api_key else {
            return Ok(None);
        };
        let endpoint = self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT);
        crate::backend::remote::Client::new(endpoint, key).map(Some)
    }
}

impl fmt::Debug for ConnectOptions {
    // Never print the API key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("target", &if self.is_cloud() { "cloud" } else { "local" })
            .field("endpoint", &self.endpoint)
            .field("home", &self.home)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: Error) -> &'static str {
        match e {
            Error::InvalidConfig { field, .. } => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "0", "web-1", "a.b_c-d", &"x".repeat(63)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "A",
            "aB",
            "a b",
            "a/b",
            "é",
            &"x".repeat(64),
            "a\0",
        ] {
            let e = validate_name(bad).unwrap_err();
            assert_eq!(field_of(e), "name", "{bad:?}");
        }
        let msg = validate_name("Web").unwrap_err().to_string();
        assert!(msg.contains("\"Web\""), "{msg}");
    }

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generate_name();
        validate_name(&a).unwrap();
        assert_ne!(a, generate_name());
    }

    #[test]
    fn resources() {
        MachineConfig::default().validate().unwrap();
        assert_eq!(
            field_of(MachineConfig::default().cpus(0).validate().unwrap_err()),
            "resources.cpus"
        );
        assert_eq!(
            field_of(MachineConfig::default().cpus(1000).validate().unwrap_err()),
            "resources.cpus"
        );
        let e = MachineConfig::default()
            .memory_mb(8)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("8 MiB"), "{e}");
        assert_eq!(field_of(e), "resources.memory_mb");
        assert_eq!(
            field_of(MachineConfig::default().disk_mb(1).validate().unwrap_err()),
            "resources.disk_mb"
        );
        assert_eq!(
            field_of(
                MachineConfig::default()
                    .name("Bad!")
                    .validate()
                    .unwrap_err()
            ),
            "name"
        );
    }

    #[test]
    fn images_are_checked() {
        let c = MachineConfig {
            image: Some("alpine".into()),
            ..Default::default()
        };
        c.validate().unwrap();
        let c = MachineConfig {
            image: Some("Not An Image".into()),
            ..Default::default()
        };
        assert_eq!(field_of(c.validate().unwrap_err()), "image");
    }

    #[test]
    fn mounts_are_checked() {
        let with = |mounts: Vec<MountSpec>| MachineConfig {
            mounts,
            ..Default::default()
        };
        with(vec![
            MountSpec::new("/srv", "/data"),
            MountSpec::new("/srv", "/data2").read_only(),
            MountSpec::new("relative/dir", "/tmp/share"),
        ])
        .validate()
        .unwrap();
        for (mounts, needle) in [
            (vec![MountSpec::new("/srv", "data")], "not an absolute path"),
            (vec![MountSpec::new("/srv", "/data/")], "not normalised"),
            (vec![MountSpec::new("/srv", "/a/../b")], "not normalised"),
            (vec![MountSpec::new("/srv", "/a/./b")], "not normalised"),
            (vec![MountSpec::new("/srv", "/")], "reserved"),
            (vec![MountSpec::new("/srv", "/tmp")], "reserved"),
            (vec![MountSpec::new("/srv", "/run")], "reserved"),
            (vec![MountSpec::new("/srv", "/proc/x")], "under /proc"),
            (vec![MountSpec::new("/srv", "/dev/shm")], "under /dev"),
            (vec![MountSpec::new("/srv", "/sys")], "reserved"),
            (vec![MountSpec::new("", "/data")], "empty"),
            (
                vec![MountSpec::new("/a", "/data"), MountSpec::new("/b", "/data")],
                "\"/data\" is given twice",
            ),
            (
                vec![
                    MountSpec::new("/a", "/data/x"),
                    MountSpec::new("/b", "/data"),
                ],
                "\"/data/x\" is inside the target \"/data\"",
            ),
            (
                vec![MountSpec::new("/a", "/srv"); MAX_MOUNTS + 1],
                "at most 8",
            ),
        ] {
            let e = with(mounts).validate().unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
            assert_eq!(field_of(e), "mounts");
        }
        // A prefix that is not a parent is another directory.
        with(vec![
            MountSpec::new("/a", "/data"),
            MountSpec::new("/b", "/database"),
        ])
        .validate()
        .unwrap();
        let json = serde_json::to_string(&MountSpec::new("/s", "/t")).unwrap();
        assert_eq!(json, r#"{"source":"/s","target":"/t","read_only":false}"#);
        let back: MountSpec = serde_json::from_str(r#"{"source":"/s","target":"/t"}"#).unwrap();
        assert!(!back.read_only);
    }

    #[test]
    fn the_egress_list_needs_a_network_and_networks() {
        let with = |list: &[&str], network: bool| MachineConfig {
            egress_allow: Some(list.iter().map(|s| s.to_string()).collect()),
            resources: ResourceSpec {
                network,
                ..Default::default()
            },
            ..Default::default()
        };
        with(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"], true)
            .validate()
            .unwrap();
        with(&[], true).validate().unwrap();
        let e = with(&["10.0.0.0/8"], false).validate().unwrap_err();
        assert!(e.to_string().contains("resources.network"), "{e}");
        let e = with(&["10.0.0.0/33"], true).validate().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
        assert_eq!(
            field_of(with(&["example.com"], true).validate().unwrap_err()),
            "egress_allow"
        );
        MachineConfig::default().validate().unwrap();
    }

    #[test]
    fn port_mappings_are_checked() {
        let with = |ports: Vec<PortSpec>| MachineConfig {
            ports,
            ..Default::default()
        };
        with(vec![
            PortSpec::new(8080, 80),
            PortSpec::new(0, 80),
            PortSpec::new(0, 80),
        ])
        .validate()
        .unwrap();
        let e = with(vec![PortSpec::new(8080, 0)]).validate().unwrap_err();
        assert!(e.to_string().contains("guest port 0"), "{e}");
        let e = with(vec![PortSpec::new(8080, 80), PortSpec::new(8080, 81)])
            .validate()
            .unwrap_err();
        assert!(
            e.to_string().contains("127.0.0.1:8080 is mapped twice"),
            "{e}"
        );
        // The same port on two addresses is two listeners.
        with(vec![
            PortSpec::new(8080, 80),
            PortSpec::new(8080, 81).address("::1".parse().unwrap()),
        ])
        .validate()
        .unwrap();
        let many = vec![PortSpec::new(0, 80); MAX_PORTS + 1];
        assert_eq!(field_of(with(many).validate().unwrap_err()), "ports");
        let json = serde_json::to_string(&PortSpec::new(1, 2)).unwrap();
        assert_eq!(json, r#"{"host":1,"guest":2}"#);
    }

    #[test]
    fn config_serde_round_trip_and_defaults() {
        let c = MachineConfig::default()
            .name("x")
            .persistent(true)
            .disk_mb(64);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<MachineConfig>(&json).unwrap(), c);
        let partial: MachineConfig =
            serde_json::from_str(r#"{"name":"y","resources":{"cpus":2}}"#).unwrap();
        assert_eq!(partial.resources.cpus, 2);
        assert_eq!(partial.resources.memory_mb, 128);
    }

    #[test]
    fn connect_options() {
        let c = ConnectOptions::cloud("secret-key");
        assert!(c.is_cloud());
        assert!(!format!("{c:?}").contains("secret"));
        assert!(matches!(c.require_local("x"), Err(Error::Unsupported(_))));
        ConnectOptions::local().require_local("x").unwrap();
    }
}
