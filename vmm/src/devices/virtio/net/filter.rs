//! The egress allow-list: which Ethernet frames from the guest may reach
//! the back end.
//!
//! With a list set, a frame passes only if it is ARP, IPv4 or IPv6 to an
//! address inside one of the list's networks, or one of the few things the
//! guest needs from passt itself to configure its interface: DHCP (IPv4 to
//! 255.255.255.255, UDP to port 67) and NDP, DHCPv6 and router discovery
//! (IPv6 to `ff02::/16` or `fe80::/10`). Everything else (other
//! ethertypes, VLAN-tagged frames, truncated headers) is dropped.
//!
//! Frames are guest-controlled bytes: every field is read through a
//! bounds check, and nothing here allocates per frame.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Ethernet header: destination, source, ethertype.
pub const ETH_HEADER_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const DHCP_SERVER_PORT: u16 = 67;
/// Destinations whose first drop was logged, at most: past that, new
/// destinations are dropped without a log line (the counter still counts).
const MAX_LOGGED_DESTINATIONS: usize = 1024;

/// A network in CIDR notation: an address and a prefix length.
///
/// The address is kept with its host bits cleared, so `10.1.2.3/8` and
/// `10.0.0.0/8` are the same network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a string or address is not an [`IpNet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    #[error("{0:?} is not an ip address or network (like 10.0.0.0/8 or fd00::/8)")]
    BadAddress(String),
    #[error("{input:?}: prefix length must be a number from 0 to {max}")]
    BadPrefix { input: String, max: u8 },
}

impl IpNet {
    /// The network of `addr` with `prefix` leading bits.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<IpNet, IpNetError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(IpNetError::BadPrefix {
                input: format!("{addr}/{prefix}"),
                max,
            });
        }
        Ok(IpNet {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// The network holding only `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> IpNet {
        IpNet {
            addr,
            prefix: max_prefix(addr),
        }
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside the network. An IPv4 network holds no IPv6
    /// address and the other way round.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with all but its first `prefix` bits cleared (`prefix` is at
/// most the address length).
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        // A shift by the whole width (prefix 0) keeps nothing.
        IpAddr::V4(a) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & keep))
        }
        IpAddr::V6(a) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & keep))
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// `10.0.0.0/8`, `1.2.3.4` (a /32), `fd00::/8`, `::1` (a /128).
    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        let bad = || IpNetError::BadAddress(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let Some(prefix) = prefix else {
            return Ok(IpNet::host(addr));
        };
        let max = max_prefix(addr);
        // Digits only: `u8::from_str` would take "+8".
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IpNetError::BadPrefix {
                input: s.to_string(),
                max,
            });
        }
        let prefix: u8 = prefix.parse().map_err(|_| IpNetError::BadPrefix {
            input: s.to_string(),
            max,
        })?;
        IpNet::new(addr, prefix).map_err(|_| IpNetError::BadPrefix {
            input: s.to_string(),
            max,
        })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a frame is, as far as the filter cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Arp,
    Ip(IpAddr),
    /// IPv4 UDP to the DHCP server port, whatever the address (renewals
    /// go to the server's unicast address).
    DhcpServer,
    /// A frame the filter cannot read as ARP or IP: shorter than its
    /// headers, VLAN-tagged, or another ethertype.
    Other(u16),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Arp => f.write_str("arp"),
            Destination::Ip(ip) => write!(f, "{ip}"),
            Destination::DhcpServer => f.write_str("udp port 67"),
            Destination::Other(ethertype) => write!(f, "ethertype {ethertype:#06x}"),
        }
    }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// Reads where `frame` goes. Truncated headers are [`Destination::Other`]
/// with the ethertype (0 when even that is missing).
pub fn destination(frame: &[u8]) -> Destination {
    let Some(ethertype) = be16(frame, 12) else {
        return Destination::Other(0);
    };
    let ip = &frame[ETH_HEADER_LEN..];
    match ethertype {
        ETHERTYPE_ARP => Destination::Arp,
        ETHERTYPE_IPV4 => ipv4_destination(ip).unwrap_or(Destination::Other(ethertype)),
        ETHERTYPE_IPV6 => ipv6_destination(ip).unwrap_or(Destination::Other(ethertype)),
        other => Destination::Other(other),
    }
}

fn ipv4_destination(ip: &[u8]) -> Option<Destination> {
    let version_ihl = *ip.first()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 || ip.len() < header_len {
        return None;
    }
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    // Only the first fragment carries the UDP header.
    let first_fragment = be16(ip, 6)? & 0x1fff == 0;
    if ip[9] == IPPROTO_UDP && first_fragment {
        if let Some(DHCP_SERVER_PORT) = be16(ip, header_len + 2) {
            return Some(Destination::DhcpServer);
        }
    }
    Some(Destination::Ip(IpAddr::V4(dst)))
}

fn ipv6_destination(ip: &[u8]) -> Option<Destination> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    Some(Destination::Ip(IpAddr::V6(Ipv6Addr::from(dst))))
}

/// What the guest may always reach for its own configuration, besides
/// ARP and DHCP: NDP, router discovery and DHCPv6 (link-local multicast)
/// and passt's link-local address.
fn link_local_v6() -> [IpNet; 2] {
    [
        IpNet {
            addr: IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0)),
            prefix: 16,
        },
        IpNet {
            addr: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)),
            prefix: 10,
        },
    ]
}

/// The allow-list applied to every TX frame, and what it dropped.
#[derive(Debug, Default)]
pub struct EgressFilter {
    /// `None` lets everything through.
    allow: Option<Vec<IpNet>>,
    dropped: u64,
    /// Destinations whose first drop was logged.
    logged: HashSet<Destination>,
}

impl EgressFilter {
    pub fn new(allow: Option<Vec<IpNet>>) -> EgressFilter {
        EgressFilter {
            allow,
            dropped: 0,
            logged: HashSet::new(),
        }
    }

    /// Whether `frame` may leave; a refused frame is counted, and the first
    /// refusal for each destination is logged.
    pub fn allows(&mut self, frame: &[u8]) -> bool {
        let Some(allow) = &self.allow else {
            return true;
        };
        let dest = destination(frame);
        let pass = match dest {
            Destination::Arp | Destination::DhcpServer => true,
            Destination::Ip(IpAddr::V4(ip)) if ip == Ipv4Addr::BROADCAST => true,
            Destination::Ip(ip) => {
                allow.iter().any(|net| net.contains(ip))
                    || link_local_v6().iter().any(|net| net.contains(ip))
            }
            Destination::Other(_) => false,
        };
        if !pass {
            self.dropped += 1;
            if self.logged.len() < MAX_LOGGED_DESTINATIONS && self.logged.insert(dest) {
                tracing::debug!(destination = %dest, "virtio-net: egress not allowed, dropping");
            }
        }
        pass
    }

    /// Frames refused so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_networks_and_hosts() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("1.2.3.4").to_string(), "1.2.3.4/32");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("fd00::1/8").to_string(), "fd00::/8");
        assert_eq!(net("::1").to_string(), "::1/128");
        assert_eq!(net("2001:db8::/32").prefix(), 32);
        assert_eq!(net("::/0").addr(), "::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn names_bad_input() {
        for bad in ["", "10.0.0", "10.0.0.0/", "x/8", "10.0.0.0/8/8", "1.2.3.4 "] {
            let err = bad.parse::<IpNet>().unwrap_err();
            assert!(
                matches!(
                    err,
                    IpNetError::BadAddress(_) | IpNetError::BadPrefix { .. }
                ),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(
            "10.0.0.0/33".parse::<IpNet>(),
            Err(IpNetError::BadPrefix {
                input: "10.0.0.0/33".into(),
                max: 32
            })
        );
        assert!(matches!(
            "::/129".parse::<IpNet>(),
            Err(IpNetError::BadPrefix { max: 128, .. })
        ));
        assert!(matches!(
            "10.0.0.0/+8".parse::<IpNet>(),
            Err(IpNetError::BadPrefix { .. })
        ));
        assert!(matches!(
            "10.0.0.0/-1".parse::<IpNet>(),
            Err(IpNetError::BadPrefix { .. })
        ));
        assert!(matches!(
            "10.0.0.0/256".parse::<IpNet>(),
            Err(IpNetError::BadPrefix { .. })
        ));
        assert!(matches!(
            "nonsense".parse::<IpNet>(),
            Err(IpNetError::BadAddress(s)) if s == "nonsense"
        ));
        let e = IpNet::new("1.2.3.4".parse().unwrap(), 40).unwrap_err();
        assert!(e.to_string().contains("1.2.3.4/40"), "{e}");
    }

    #[test]
    fn contains_by_prefix_and_family() {
        let ten = net("10.0.0.0/8");
        assert!(ten.contains("10.255.0.1".parse().unwrap()));
        assert!(!ten.contains("11.0.0.1".parse().unwrap()));
        assert!(!ten.contains("::a00:1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(!net("0.0.0.0/0").contains("::1".parse().unwrap()));
        let host = net("192.0.2.7");
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        assert!(!host.contains("192.0.2.6".parse().unwrap()));
        let v6 = net("2001:db8::/32");
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        assert!(net("::/0").contains("2001:db9::5".parse().unwrap()));
        assert!(net("10.0.0.0/31").contains("10.0.0.1".parse().unwrap()));
        assert!(!net("10.0.0.0/31").contains("10.0.0.2".parse().unwrap()));
    }

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An IPv4 packet of protocol `proto` to `dst` with `l4` after a
    /// 20-byte header.
    fn ipv4(dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 2, 15];
        ip.extend_from_slice(&dst);
        let total = (ip.len() + l4.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(l4);
        eth(ETHERTYPE_IPV4, &ip)
    }

    fn udp(src_port: u16, dst_port: u16) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&src_port.to_be_bytes());
        u.extend_from_slice(&dst_port.to_be_bytes());
        u.extend_from_slice(&[0, 8, 0, 0]);
        u
    }

    fn ipv6(dst: &str) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64];
        ip.extend_from_slice(&[0; 16]);
        ip.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&udp(546, 547));
        eth(ETHERTYPE_IPV6, &ip)
    }

    fn filter(list: &[&str]) -> EgressFilter {
        EgressFilter::new(Some(list.iter().map(|s| net(s)).collect()))
    }

    #[test]
    fn no_list_allows_everything() {
        let mut f = EgressFilter::new(None);
        assert!(f.allows(&ipv4([8, 8, 8, 8], 6, &[0; 20])));
        assert!(f.allows(&eth(0x8100, &[0; 50])));
        assert!(f.allows(&[1, 2, 3]));
        assert_eq!(f.dropped(), 0);
    }

    #[test]
    fn list_allows_listed_destinations_only() {
        let mut f = filter(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(f.allows(&ipv4([10, 9, 8, 7], 6, &[0; 20])));
        assert!(!f.allows(&ipv4([11, 0, 0, 1], 6, &[0; 20])));
        assert!(!f.allows(&ipv4([192, 0, 2, 1], 17, &udp(5000, 53))));
        assert!(f.allows(&ipv6("2001:db8::1")));
        assert!(!f.allows(&ipv6("2001:db9::1")));
        assert_eq!(f.dropped(), 3);
        // The empty list allows only what the guest needs for itself.
        let mut none = filter(&[]);
        assert!(!none.allows(&ipv4([10, 0, 0, 1], 6, &[0; 20])));
        assert_eq!(none.dropped(), 1);
    }

    #[test]
    fn arp_dhcp_and_ndp_always_pass_a_list() {
        let mut f = filter(&[]);
        assert!(f.allows(&eth(ETHERTYPE_ARP, &[0; 28])));
        // DHCP discover (broadcast) and renewal (unicast to the server).
        assert!(f.allows(&ipv4([255, 255, 255, 255], 17, &udp(68, 67))));
        assert!(f.allows(&ipv4([192, 0, 2, 1], 17, &udp(68, 67))));
        assert!(f.allows(&ipv4([255, 255, 255, 255], 6, &[0; 20])));
        // Neighbour solicitation, DHCPv6 solicit, passt's link-local.
        assert!(f.allows(&ipv6("ff02::1:ff00:1")));
        assert!(f.allows(&ipv6("ff02::1:2")));
        assert!(f.allows(&ipv6("fe80::1")));
        // Not other multicast, nor port 67 over TCP.
        assert!(!f.allows(&ipv6("ff05::1:3")));
        assert!(!f.allows(&ipv4([224, 0, 0, 251], 17, &udp(5353, 5353))));
        assert!(!f.allows(&ipv4([192, 0, 2, 1], 6, &udp(68, 67))));
        assert_eq!(f.dropped(), 3);
    }

    #[test]
    fn unreadable_frames_are_dropped_with_a_list() {
        let mut f = filter(&["0.0.0.0/0", "::/0"]);
        // VLAN-tagged (802.1Q and 802.1ad), other ethertypes.
        let mut tagged = vec![0, 0x64];
        tagged.extend_from_slice(&ipv4([10, 0, 0, 1], 6, &[0; 20])[12..]);
        assert!(!f.allows(&eth(0x8100, &tagged)));
        assert!(!f.allows(&eth(0x88a8, &tagged)));
        assert!(!f.allows(&eth(0x88cc, &[0; 40])));
        // Short frames at every length up to a whole IPv4 and IPv6 header.
        let v4 = ipv4([10, 0, 0, 1], 6, &[]);
        for len in 0..v4.len() {
            assert!(!f.allows(&v4[..len]), "ipv4 cut at {len}");
        }
        assert!(f.allows(&v4));
        let v6 = ipv6("2001:db8::1");
        for len in 0..ETH_HEADER_LEN + 40 {
            assert!(!f.allows(&v6[..len]), "ipv6 cut at {len}");
        }
        assert!(f.allows(&v6));
        // A bad version or header length.
        let mut v5 = v4.clone();
        v5[ETH_HEADER_LEN] = 0x55;
        assert!(!f.allows(&v5));
        let mut short_ihl = v4.clone();
        short_ihl[ETH_HEADER_LEN] = 0x44;
        assert!(!f.allows(&short_ihl));
        let mut long_ihl = v4.clone();
        long_ihl[ETH_HEADER_LEN] = 0x4f;
        assert!(!f.allows(&long_ihl));
    }

    #[test]
    fn udp_port_67_needs_the_udp_header() {
        let mut f = filter(&[]);
        // Cut inside the UDP header: the port cannot be read.
        let dhcp = ipv4([192, 0, 2, 1], 17, &udp(68, 67));
        assert!(!f.allows(&dhcp[..ETH_HEADER_LEN + 20 + 3]));
        assert!(f.allows(&dhcp[..ETH_HEADER_LEN + 20 + 4]));
        // A later fragment has no UDP header where the port would be.
        let mut frag = dhcp.clone();
        frag[ETH_HEADER_LEN + 6..ETH_HEADER_LEN + 8].copy_from_slice(&1u16.to_be_bytes());
        assert!(!f.allows(&frag));
        // Options move the UDP header.
        let mut ip = vec![0x46, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 2, 15];
        ip.extend_from_slice(&[192, 0, 2, 1]);
        ip.extend_from_slice(&[1, 1, 1, 1]);
        ip.extend_from_slice(&udp(68, 67));
        assert!(f.allows(&eth(ETHERTYPE_IPV4, &ip)));
        ip[0] = 0x45;
        assert!(!f.allows(&eth(ETHERTYPE_IPV4, &ip)), "port read at 20");
    }

    #[test]
    fn logs_each_destination_once_and_stays_bounded() {
        let mut f = filter(&[]);
        for _ in 0..3 {
            assert!(!f.allows(&ipv4([8, 8, 8, 8], 6, &[0; 20])));
        }
        assert_eq!(f.logged.len(), 1);
        for i in 0..2000u32 {
            let b = i.to_be_bytes();
            assert!(!f.allows(&ipv4([9, b[1], b[2], b[3]], 6, &[0; 20])));
        }
        assert_eq!(f.logged.len(), MAX_LOGGED_DESTINATIONS);
        assert_eq!(f.dropped(), 2003);
    }
}
