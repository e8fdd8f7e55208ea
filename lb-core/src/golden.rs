//! The golden packet table (Katran's test fixtures, ARCHITECTURE "Testing"): for each row, a
//! description, a frame, the [`Action`] the forwarding decision must take on it and the exact
//! bytes it must emit. One table, three users: the decision's tests (`forward::tests`), the
//! pipeline benchmark (`benches/pipeline.rs`) and the fuzz targets' seed corpus (`fuzz/corpus`,
//! written from the table by `golden::tests::fuzz_seeds_are_the_table`).
//!
//! Behind the `golden` cargo feature (and `cfg(test)`), not a `#[doc(hidden)] pub mod`: the
//! production binary neither ships the table nor builds its frames, and a crate that wants it
//! says so in its `Cargo.toml` (the workspace root's dev-dependency does, for its benches).
//!
//! **Invariant.** Every row's input is a frame whose IPv4 header checksum is right unless the
//! row is about a wrong one, and each row is decided by a fresh [`WorkerState`] ([`worker`]) on
//! [`snapshot`] at time 0: rows do not depend on one another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};

use crate::config::Config;
use crate::conntrack::{ConnTable, ConnTableConfig};
use crate::forward::{Action, DropReason, WorkerState, process};
use crate::packet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, Link};
use crate::snapshot::Snapshot;

/// One VIP per encapsulation combination, each with one backend, so the expected output is
/// exact; plus a three-backend VIP for steering tests.
pub const CONFIG: &str = r#"
        [node]
        address_v4 = "198.18.11.2"
        address_v6 = "2001:db8:11::2"
        mtu = 1500
        ttl = 63
        [[vip]]
        name = "v4-in-v4"
        address = "198.18.100.1"
        protocol = "tcp"
        port = 80
        encap = "ipip"
        [[vip.backend]]
        address = "198.18.21.2"
        [[vip]]
        name = "v4-in-v6"
        address = "198.18.100.1"
        protocol = "tcp"
        port = 81
        encap = "ipip"
        [[vip.backend]]
        address = "2001:db8:21::2"
        [[vip]]
        name = "v6-in-v6"
        address = "2001:db8:100::1"
        protocol = "tcp"
        port = 80
        encap = "ipip"
        [[vip.backend]]
        address = "2001:db8:21::2"
        [[vip]]
        name = "v6-in-v4"
        address = "2001:db8:100::1"
        protocol = "tcp"
        port = 81
        encap = "ipip"
        [[vip.backend]]
        address = "198.18.21.2"
        [[vip]]
        name = "gre-v4"
        address = "198.18.100.1"
        protocol = "udp"
        port = "all"
        encap = "gre"
        [[vip.backend]]
        address = "198.18.22.2"
        [[vip]]
        name = "gre-v6"
        address = "2001:db8:100::1"
        protocol = "udp"
        port = "all"
        encap = "gre"
        [[vip.backend]]
        address = "2001:db8:22::2"
        [[vip]]
        name = "pool"
        address = "198.18.100.2"
        protocol = "tcp"
        port = 80
        encap = "ipip"
        [[vip.backend]]
        address = "198.18.21.2"
        [[vip.backend]]
        address = "198.18.22.2"
        [[vip.backend]]
        address = "198.18.23.2"
"#;

/// The golden table's egress SNAT: the three-backend VIP's address, ports from 1024.
pub const SNAT: &str = "[[snat]]\naddress = \"198.18.100.2\"\nfirst_port = 1024\n";

/// The client.
pub const CLIENT: [u8; 4] = [198, 18, 1, 2];
/// The address of the one-backend IPv4 VIPs.
pub const VIP: [u8; 4] = [198, 18, 100, 1];
/// The address of the three-backend VIP (and of the SNAT space).
pub const POOL: [u8; 4] = [198, 18, 100, 2];
/// The IPv6 client.
pub const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// The address of the one-backend IPv6 VIPs.
pub const VIP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// A host on the Internet, for SNAT return traffic.
pub const INTERNET: [u8; 4] = [198, 19, 0, 2];

/// The snapshot the table is decided on: [`CONFIG`] and [`SNAT`].
///
/// # Panics
/// Never: the config is a constant that compiles (`tests::the_table_holds`).
#[must_use]
pub fn snapshot() -> Snapshot {
    let text = format!("{CONFIG}\n{SNAT}");
    Snapshot::compile(&Config::from_toml(&text, "golden.toml").expect("valid"), 1).expect("builds")
}

/// A fresh worker with a small connection table (1024 slots).
#[must_use]
pub fn worker() -> WorkerState {
    WorkerState::new(ConnTable::new(ConnTableConfig {
        capacity: 1024,
        ..ConnTableConfig::default()
    }))
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Golden {
    /// What the row is about.
    pub description: &'static str,
    /// Whether `input` starts with an Ethernet header.
    pub link: Link,
    /// The frame.
    pub input: Vec<u8>,
    /// The decision.
    pub expected: Action,
    /// The whole output packet, as hex ("" for a drop or a pass); `LB_BLESS=1` prints the actual
    /// ones.
    pub output_hex: &'static str,
}

impl Golden {
    /// Decides the row on a fresh worker: the action and the bytes it emits.
    #[must_use]
    pub fn decide(&self, snapshot: &Snapshot) -> (Action, Vec<u8>) {
        let mut state = worker();
        let mut out = vec![0u8; 65535 + 48];
        let action = process(&self.input, self.link, snapshot, &mut state, 0, &mut out);
        out.truncate(action.output_len());
        (action, out)
    }
}

/// An IPv4 TCP packet (a SYN or an ACK) with `payload` bytes, TTL 64.
#[must_use]
pub fn tcp4(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    syn: bool,
    payload: usize,
) -> Vec<u8> {
    tcp4_ttl(src, dst, 64, sport, dport, syn, payload)
}

/// [`tcp4`] with a TTL.
#[must_use]
pub fn tcp4_ttl(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    sport: u16,
    dport: u16,
    syn: bool,
    payload: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ipv4(src, dst, ttl).tcp(sport, dport, 1, 65535);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut out, &vec![0xab; payload])
        .expect("writing to a Vec");
    out
}

/// An IPv6 TCP SYN from the IPv6 client to the IPv6 VIP with `payload` bytes.
#[must_use]
pub fn tcp6(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    tcp6_from(CLIENT6, 64, sport, dport, payload)
}

/// An IPv6 TCP SYN from `src`, with a hop limit, to the IPv6 VIP.
#[must_use]
pub fn tcp6_from(src: [u8; 16], hop_limit: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, VIP6, hop_limit)
        .tcp(sport, dport, 1, 65535)
        .syn()
        .write(&mut out, &vec![0xab; payload])
        .expect("writing to a Vec");
    out
}

/// An IPv4 UDP datagram "query" from the client to the IPv4 VIP.
#[must_use]
pub fn udp4(sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, VIP, 64)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .expect("writing to a Vec");
    out
}

/// An IPv6 UDP datagram "query" from the IPv6 client to the IPv6 VIP.
#[must_use]
pub fn udp6(sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(CLIENT6, VIP6, 64)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .expect("writing to a Vec");
    out
}

/// Rewrites the checksum of the IPv4 header at the start of `ip` (options included).
pub fn fix_ipv4_checksum(ip: &mut [u8]) {
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    ip[10..12].fill(0);
    let mut sum: u32 = ip[..header_len]
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = u16::try_from(sum).unwrap_or(u16::MAX);
    ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
}

/// Sets the IPv4 flags-and-fragment-offset field and fixes the header checksum.
#[must_use]
pub fn with_flags(mut ip: Vec<u8>, flags_fragment: u16) -> Vec<u8> {
    ip[6..8].copy_from_slice(&flags_fragment.to_be_bytes());
    fix_ipv4_checksum(&mut ip);
    ip
}

/// Sets or clears DF (and the fragment fields), fixing the checksum.
#[must_use]
pub fn with_df(ip: Vec<u8>, df: bool) -> Vec<u8> {
    with_flags(ip, if df { 0x4000 } else { 0 })
}

/// Inserts IPv4 `options` (a multiple of 4 bytes) after the 20-byte header of `ip`, fixing the
/// header length, the total length and the checksum.
#[must_use]
pub fn with_options(ip: &[u8], options: &[u8]) -> Vec<u8> {
    let mut out = ip[..20].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&ip[20..]);
    out[0] = 0x40 | u8::try_from((20 + options.len()) / 4).unwrap_or(15);
    let total = u16::try_from(out.len()).unwrap_or(u16::MAX);
    out[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// An Ethernet II frame of `ethertype` around `payload`.
#[must_use]
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn v6(a: &str) -> IpAddr {
    IpAddr::V6(a.parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::UNSPECIFIED))
}

/// The table.
#[must_use]
pub fn table() -> Vec<Golden> {
    let ip = |description, input, expected, output_hex| Golden {
        description,
        link: Link::Ip,
        input,
        expected,
        output_hex,
    };
    let encap = |vip, to: IpAddr, len| Action::Encap {
        vip,
        backend: 0,
        to,
        len,
    };
    let drop = |description, input, reason| ip(description, input, Action::Drop(reason), "");
    let with_udp_length = |length: u16| {
        let mut p = udp4(5353, 53);
        p[24..26].copy_from_slice(&length.to_be_bytes());
        p
    };
    let mut time_exceeded = Vec::new();
    PacketBuilder::ipv4([198, 18, 9, 9], VIP, 64)
        .icmpv4(Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(
            &mut time_exceeded,
            &tcp4(VIP, CLIENT, 80, 40000, false, 0)[..22],
        )
        .expect("writing to a Vec");
    let mut echo = Vec::new();
    PacketBuilder::ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .expect("writing to a Vec");
    let mut bad_checksum = tcp4(CLIENT, VIP, 40000, 80, true, 0);
    bad_checksum[10] ^= 0x01;
    let mut fragmentation_needed = Vec::new();
    PacketBuilder::ipv4([198, 18, 9, 9], POOL, 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(
            &mut fragmentation_needed,
            &tcp4(POOL, CLIENT, 80, 40001, false, 0)[..28],
        )
        .expect("writing to a Vec");
    let ip6 = |s: &str| {
        s.parse::<Ipv6Addr>()
            .map(|a| a.octets())
            .unwrap_or_default()
    };
    vec![
        // Encapsulated: every encapsulation and family combination.
        ip(
            "IPv4 TCP SYN, IPv4-in-IPv4",
            tcp4(CLIENT, VIP, 40000, 80, true, 0),
            encap(0, v4([198, 18, 21, 2]), 60),
            "4500003c000040003f048f95c6120b02c61215024500002800004000400649a8c6120102c61264019c40005000000001000000005002ffff22290000",
        ),
        ip(
            "IPv4 TCP SYN, IPv4-in-IPv6",
            tcp4(CLIENT, VIP, 40000, 81, true, 0),
            encap(1, v6("2001:db8:21::2"), 80),
            "600000000028043f20010db800110000000000000000000220010db80021000000000000000000024500002800004000400649a8c6120102c61264019c40005100000001000000005002ffff22280000",
        ),
        ip(
            "IPv6 TCP SYN, IPv6-in-IPv6",
            tcp6(40000, 80, 0),
            encap(2, v6("2001:db8:21::2"), 100),
            "60000000003c293f20010db800110000000000000000000220010db8002100000000000000000002600000000014064020010db800010000000000000000000220010db80100000000000000000000019c40005000000001000000005002ffffb6db0000",
        ),
        ip(
            "IPv6 TCP SYN, IPv6-in-IPv4",
            tcp6(40000, 81, 0),
            encap(3, v4([198, 18, 21, 2]), 80),
            "45000050000040003f298f5cc6120b02c6121502600000000014064020010db800010000000000000000000220010db80100000000000000000000019c40005100000001000000005002ffffb6da0000",
        ),
        ip(
            "IPv4 UDP, GRE over IPv4",
            udp4(5353, 53),
            encap(4, v4([198, 18, 22, 2]), 57),
            "45000039000040003f2f8e6dc6120b02c6121602000008004500002100004000401149a4c6120102c612640114e90035000da9a57175657279",
        ),
        ip(
            "IPv6 UDP, GRE over IPv6",
            udp6(5353, 53),
            encap(5, v6("2001:db8:22::2"), 97),
            "6000000000392f3f20010db800110000000000000000000220010db8002200000000000000000002000086dd60000000000d114020010db800010000000000000000000220010db801000000000000000000000114e90035000d3e587175657279",
        ),
        ip(
            "IPv4 TCP SYN with no-operation and end-of-list options, IPv4-in-IPv4",
            with_options(&tcp4(CLIENT, VIP, 40000, 80, true, 0), &[1, 1, 0, 0]),
            encap(0, v4([198, 18, 21, 2]), 64),
            "45000040000040003f048f91c6120b02c61215024600002c00004000400647a3c6120102c6126401010100009c40005000000001000000005002ffff22290000",
        ),
        Golden {
            description: "IPv4 TCP SYN in an Ethernet frame, IPv4-in-IPv4",
            link: Link::Ethernet,
            input: ethernet(ETHERTYPE_IPV4, &tcp4(CLIENT, VIP, 40000, 80, true, 0)),
            expected: encap(0, v4([198, 18, 21, 2]), 60),
            output_hex: "4500003c000040003f048f95c6120b02c61215024500002800004000400649a8c6120102c61264019c40005000000001000000005002ffff22290000",
        },
        ip(
            "ICMP fragmentation needed about a pool connection, to its backend",
            fragmentation_needed,
            Action::Encap {
                vip: 6,
                backend: 2,
                to: v4([198, 18, 23, 2]),
                len: 76,
            },
            "4500004c000040003f048d85c6120b02c6121702450000380000400040014195c6120909c612640203045af1000005784500002800004000400649a7c6126402c612010200509c4100000001",
        ),
        // SNAT return traffic.
        ip(
            "IPv4 TCP from the Internet to a SNAT port, to the port's owner",
            tcp4(INTERNET, POOL, 443, 40000, false, 20),
            Action::SnatReturn {
                to: v4([198, 18, 22, 2]),
                len: 80,
            },
            "45000050000040003f048e81c6120b02c61216024500003c0000400040064a92c6130002c612640201bb9c4000000001000000015010ffff6ce40000abababababababababababababababababababab",
        ),
        // An ICMP answer.
        ip(
            "IPv4 TCP of 1500 bytes with DF, too big once encapsulated: fragmentation needed",
            with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1460), true),
            Action::IcmpReply { len: 576 },
            "450002400000400040014795c6126401c61201020304215e000005c8450005dc00004000400643f4c6120102c61264019c40005000000001000000015010ffff94de0000abababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababababab",
        ),
        // Passed to the host.
        Golden {
            description: "ARP: not IP, the host's",
            link: Link::Ethernet,
            input: ethernet(0x0806, &[0; 28]),
            expected: Action::Pass,
            output_hex: "",
        },
        ip(
            "IPv4 TCP to an address with no VIP: the host's",
            tcp4(CLIENT, [198, 18, 100, 99], 40000, 80, true, 0),
            Action::Pass,
            "",
        ),
        ip(
            "ICMP echo to a VIP address: the host's",
            echo,
            Action::Pass,
            "",
        ),
        ip(
            "IPv4 TCP to the SNAT address below its ports: the host's",
            tcp4(INTERNET, POOL, 443, 1000, false, 0),
            Action::Pass,
            "",
        ),
        // Dropped, one row per reason a frame alone can give.
        drop(
            "IPv4 cut in its TCP header",
            tcp4(CLIENT, VIP, 40000, 80, true, 0)[..30].to_vec(),
            DropReason::Truncated,
        ),
        drop("IP version 7", vec![0x75; 40], DropReason::Malformed),
        drop("UDP length 0", with_udp_length(0), DropReason::Malformed),
        drop(
            "UDP length shorter than the IP payload",
            with_udp_length(8),
            DropReason::Malformed,
        ),
        drop(
            "UDP length longer than the IP payload",
            with_udp_length(14),
            DropReason::Truncated,
        ),
        drop(
            "IPv4 header checksum wrong",
            bad_checksum,
            DropReason::BadChecksum,
        ),
        drop(
            "ICMP time exceeded quoting too little for the ports",
            time_exceeded,
            DropReason::BadIcmpQuote,
        ),
        drop(
            "IPv4 TCP fragment to an address with two TCP port VIPs",
            with_flags(tcp4(CLIENT, VIP, 40000, 80, false, 64), 0x2000),
            DropReason::FragmentVipAmbiguous,
        ),
        drop(
            "IPv4 TCP of 1500 bytes without DF, too big once encapsulated",
            with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1460), false),
            DropReason::TooBigFragmentable,
        ),
        Golden {
            description: "IPv4 header in an IPv6 (0x86DD) frame",
            link: Link::Ethernet,
            input: ethernet(ETHERTYPE_IPV6, &tcp4(CLIENT, VIP, 40000, 80, true, 0)),
            expected: Action::Drop(DropReason::VersionMismatch),
            output_hex: "",
        },
        Golden {
            description: "IPv6 header in an IPv4 (0x0800) frame",
            link: Link::Ethernet,
            input: ethernet(ETHERTYPE_IPV4, &tcp6(40000, 80, 0)),
            expected: Action::Drop(DropReason::VersionMismatch),
            output_hex: "",
        },
        drop(
            "IPv4 option of length 0",
            with_options(&tcp4(CLIENT, VIP, 40000, 80, true, 0), &[7, 0, 0, 0]),
            DropReason::BadIpOptions,
        ),
        drop(
            "IPv4 option of length 1",
            with_options(&tcp4(CLIENT, VIP, 40000, 80, true, 0), &[7, 1, 0, 0]),
            DropReason::BadIpOptions,
        ),
        drop(
            "IPv4 option overrunning the header",
            with_options(&tcp4(CLIENT, VIP, 40000, 80, true, 0), &[1, 7, 8, 0]),
            DropReason::BadIpOptions,
        ),
        drop(
            "IPv4 source is the VIP itself",
            tcp4(VIP, VIP, 40000, 80, true, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv4 source 255.255.255.255",
            tcp4([255; 4], VIP, 40000, 80, true, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv4 source in 0.0.0.0/8",
            tcp4([0, 0, 0, 1], VIP, 40000, 80, true, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv4 source in 127.0.0.0/8",
            tcp4([127, 0, 0, 1], VIP, 40000, 80, true, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv4 multicast source",
            tcp4([224, 0, 0, 1], VIP, 40000, 80, true, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv4 martian source of SNAT return traffic",
            tcp4([127, 0, 0, 1], POOL, 443, 40000, false, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv6 source ::",
            tcp6_from([0; 16], 64, 40000, 80, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv6 source ::1",
            tcp6_from(ip6("::1"), 64, 40000, 80, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv6 multicast source",
            tcp6_from(ip6("ff02::1"), 64, 40000, 80, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv6 source is the VIP itself",
            tcp6_from(VIP6, 64, 40000, 80, 0),
            DropReason::MartianSource,
        ),
        drop(
            "IPv4 TTL 0",
            tcp4_ttl(CLIENT, VIP, 0, 40000, 80, true, 0),
            DropReason::TtlExpired,
        ),
        drop(
            "IPv6 hop limit 0",
            tcp6_from(CLIENT6, 0, 40000, 80, 0),
            DropReason::TtlExpired,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_table_holds() {
        let s = snapshot();
        let bless = std::env::var_os("LB_BLESS").is_some();
        for g in table() {
            let (action, out) = g.decide(&s);
            let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
            if bless {
                eprintln!("{}: {action:?}\n{hex}", g.description);
                continue;
            }
            assert_eq!(action, g.expected, "{}", g.description);
            assert_eq!(hex, g.output_hex, "{}", g.description);
        }
    }

    /// Every drop reason a frame alone can give has a row (the others need a config or a
    /// state: `no_vip`, `no_backend`, `no_source_address`, `too_big_rate_limited`, `internal`).
    #[test]
    fn every_frame_drop_reason_has_a_row() {
        let table = table();
        for reason in DropReason::ALL {
            let needs_more = matches!(
                reason,
                DropReason::NoVip
                    | DropReason::NoBackend
                    | DropReason::NoSourceAddress
                    | DropReason::TooBigRateLimited
                    | DropReason::Internal
            );
            let has_row = table.iter().any(|g| g.expected == Action::Drop(reason));
            assert!(needs_more || has_row, "no row drops as {}", reason.name());
        }
        for kind in ["Encap", "SnatReturn", "IcmpReply", "Pass", "Drop"] {
            assert!(
                table
                    .iter()
                    .any(|g| format!("{:?}", g.expected).starts_with(kind)),
                "no {kind} row"
            );
        }
    }

    /// The rows' inputs as fuzz seeds: `fuzz/corpus/parse/seed-golden-NN-…` (the frame) and
    /// `fuzz/corpus/process/seed-golden-NN-…` (a selector byte for the link, then the frame: see
    /// `fuzz/fuzz_targets/process.rs`). `LB_BLESS=1` writes them; otherwise they must be there,
    /// the same, and no other `seed-golden-` seed.
    #[test]
    fn fuzz_seeds_are_the_table() {
        let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let bless = std::env::var_os("LB_BLESS").is_some();
        for (target, with_selector) in [("parse", false), ("process", true)] {
            let dir = corpus.join(target);
            let mut expected = std::collections::BTreeMap::new();
            for (i, g) in table().into_iter().enumerate() {
                let slug: String = g
                    .description
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '-'
                        }
                    })
                    .collect();
                let name = format!("seed-golden-{i:02}-{}", slug.trim_matches('-'));
                let mut seed = Vec::new();
                if with_selector {
                    seed.push(u8::from(g.link == Link::Ethernet));
                }
                seed.extend_from_slice(&g.input);
                expected.insert(name, seed);
            }
            let present: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with("seed-golden-"))
                .collect();
            for name in &present {
                if !expected.contains_key(name) {
                    assert!(bless, "stale seed {target}/{name}: run with LB_BLESS=1");
                    std::fs::remove_file(dir.join(name)).unwrap();
                }
            }
            for (name, seed) in expected {
                let path = dir.join(&name);
                if bless {
                    std::fs::write(&path, &seed).unwrap();
                } else {
                    assert_eq!(
                        std::fs::read(&path).ok(),
                        Some(seed),
                        "{target}/{name}: run with LB_BLESS=1"
                    );
                }
            }
        }
    }
}
