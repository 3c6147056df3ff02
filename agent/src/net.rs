//! The guest's outbound network (`resources.network`): the virtio-net
//! interface is configured by DHCP from the host's passt, through busybox
//! `udhcpc` and a lease script the agent writes, and the gateway (which
//! passt maps to the host's loopback) is named `host.smol.internal` in
//! /etc/hosts. Sent by the host after every boot and restore of a machine
//! with a network (`Request::ConfigureNetwork`): a restored guest asks its
//! new passt again.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::unistd::Pid;

use crate::protocol::{AgentError, ErrorKind, NetworkInfo, Response};
use crate::reaper::{ChildExit, Reaper};
use crate::server::{send_error, send_response, Duplex, ServeError};

/// The name of the host's loopback in the guest.
pub const HOST_ALIAS: &str = "host.smol.internal";
/// Longest wait for a lease (udhcpc's own retries fit well inside).
const DHCP_DEADLINE: Duration = Duration::from_secs(60);
const RUN_DIR: &str = "/run/smol";
/// Largest /etc/hosts kept when the alias line is rewritten.
const MAX_HOSTS_FILE: u64 = 1 << 20;

/// Applies a lease: address, default route and DNS; then records what it
/// applied for the agent. The MTU passt offers (65520) is not applied: the
/// device's receive buffers hold standard frames.
const LEASE_SCRIPT: &str = r#"#!/bin/sh
# Written by smol-agent: applies a DHCP lease from udhcpc.
case "$1" in
deconfig)
  ip -4 addr flush dev "$interface"
  ip link set "$interface" up
  ;;
bound|renew)
  ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up || exit 1
  ip route del default 2>/dev/null
  for r in $router; do ip route add default via "$r" dev "$interface"; break; done
  : > /etc/resolv.conf.smol
  for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf.smol; done
  mv /etc/resolv.conf.smol /etc/resolv.conf
  set -- $router
  printf 'ip=%s\nrouter=%s\ndns=%s\n' "$ip" "$1" "$dns" > /run/smol/lease
  ;;
esac
exit 0
"#;

pub fn serve_configure<S: Duplex>(s: &mut S) -> Result<(), ServeError> {
    match configure() {
        Ok(info) => send_response(s, &Response::Network(info))?,
        Err(e) => send_error(s, &e)?,
    }
    Ok(())
}

fn configure() -> Result<NetworkInfo, AgentError> {
    let io = |what: &str, e: std::io::Error| AgentError::new(ErrorKind::Io, format!("{what}: {e}"));
    let iface = ethernet_interface()?;
    std::fs::create_dir_all(RUN_DIR).map_err(|e| io("creating /run/smol", e))?;
    let script = Path::new(RUN_DIR).join("udhcpc.script");
    std::fs::write(&script, LEASE_SCRIPT).map_err(|e| io("writing the lease script", e))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("making the lease script executable", e))?;
    let lease = Path::new(RUN_DIR).join("lease");
    let _ = std::fs::remove_file(&lease);
    let log = Path::new(RUN_DIR).join("udhcpc.log");
    let out = std::fs::File::create(&log).map_err(|e| io("creating the udhcpc log", e))?;
    let err = out.try_clone().map_err(|e| io("the udhcpc log", e))?;
    // Through busybox itself: the applet's link may not be there (see
    // exec::BUSYBOX).
    let mut cmd = Command::new(crate::exec::BUSYBOX);
    // Foreground, quit once bound, fail if no lease after the tries.
    cmd.arg("udhcpc")
        .args(["-f", "-q", "-n", "-t", "10", "-T", "1", "-i", &iface, "-s"])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let (pid, waiter) = Reaper::get()
        .spawn(|| cmd.spawn().map(|child| Pid::from_raw(child.id() as i32)))
        .map_err(|e: std::io::Error| {
            AgentError::new(ErrorKind::NotFound, format!("running udhcpc: {e}"))
        })?;
    let exit = waiter.wait(Some(DHCP_DEADLINE));
    let tail = || log_tail(&log);
    match exit {
        Some(ChildExit::Exited(0)) => {}
        None => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(AgentError::new(
                ErrorKind::Timeout,
                format!(
                    "no DHCP lease on {iface} within {DHCP_DEADLINE:?}: {}",
                    tail()
                ),
            ));
        }
        Some(other) => {
            return Err(AgentError::new(
                ErrorKind::Io,
                format!("udhcpc on {iface} failed ({other:?}): {}", tail()),
            ))
        }
    }
    let text = std::fs::read_to_string(&lease).map_err(|e| io("reading the lease", e))?;
    let info = parse_lease(&iface, &text)?;
    set_host_alias(Path::new("/etc/hosts"), &info.gateway)
        .map_err(|e| io("writing /etc/hosts", e))?;
    Ok(info)
}

/// The first interface that is not the loopback (the virtio-net one).
fn ethernet_interface() -> Result<String, AgentError> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map_err(|e| AgentError::new(ErrorKind::Io, format!("listing /sys/class/net: {e}")))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next().ok_or_else(|| {
        AgentError::new(
            ErrorKind::Unsupported,
            "the machine has no network device (resources.network is off)",
        )
    })
}

fn parse_lease(iface: &str, text: &str) -> Result<NetworkInfo, AgentError> {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let (address, gateway) = (field("ip"), field("router"));
    if address.parse::<std::net::Ipv4Addr>().is_err()
        || gateway.parse::<std::net::Ipv4Addr>().is_err()
    {
        return Err(AgentError::new(
            ErrorKind::Io,
            format!("the DHCP lease on {iface} has no usable address or gateway: {text:?}"),
        ));
    }
    Ok(NetworkInfo {
        interface: iface.to_string(),
        address,
        gateway,
        dns: field("dns")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    })
}

/// Rewrites `hosts` with one `<gateway> host.smol.internal` line (atomic).
fn set_host_alias(hosts: &Path, gateway: &str) -> std::io::Result<()> {
    let mut old = String::new();
    match std::fs::File::open(hosts) {
        Ok(f) => {
            f.take(MAX_HOSTS_FILE).read_to_string(&mut old)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut text: String = old
        .lines()
        .filter(|l| !l.split_whitespace().skip(1).any(|n| n == HOST_ALIAS))
        .map(|l| format!("{l}\n"))
        .collect();
    if !text
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("localhost"))
    {
        text.insert_str(0, "127.0.0.1\tlocalhost\n::1\tlocalhost\n");
    }
    text.push_str(&format!("{gateway}\t{HOST_ALIAS}\n"));
    let tmp = hosts.with_extension("smol-new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, hosts)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        "udhcpc printed nothing".into()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_parsed_and_checked() {
        let info = parse_lease(
            "eth0",
            "ip=10.0.2.15\nrouter=10.0.2.2\ndns=1.1.1.1 9.9.9.9\n",
        )
        .unwrap();
        assert_eq!(info.address, "10.0.2.15");
        assert_eq!(info.gateway, "10.0.2.2");
        assert_eq!(info.dns, ["1.1.1.1", "9.9.9.9"]);
        let e = parse_lease("eth0", "ip=\nrouter=10.0.2.2\n").unwrap_err();
        assert!(e.message.contains("eth0"), "{}", e.message);
        assert!(parse_lease("eth0", "ip=1.2.3.4\nrouter=x; rm -rf /\n").is_err());
    }

    #[test]
    fn the_host_alias_replaces_an_old_one_and_keeps_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let hosts = t.path().join("hosts");
        set_host_alias(&hosts, "10.0.2.2").unwrap();
        let text = std::fs::read_to_string(&hosts).unwrap();
        assert!(
            text.contains("127.0.0.1\tlocalhost")
                && text.ends_with("10.0.2.2\thost.smol.internal\n"),
            "{text}"
        );
        std::fs::write(
            &hosts,
            "127.0.0.1 localhost\n1.2.3.4 host.smol.internal\n5.6.7.8 db\n",
        )
        .unwrap();
        set_host_alias(&hosts, "10.0.2.3").unwrap();
        let text = std::fs::read_to_string(&hosts).unwrap();
        assert_eq!(
            text,
            "127.0.0.1 localhost\n5.6.7.8 db\n10.0.2.3\thost.smol.internal\n"
        );
    }
}
